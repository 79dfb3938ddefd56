"""Bandwidth caps (:mod:`sidecar.controller.pacing`): grants start no sooner than the cap
allows, a cancelled wait gives back its turn, an idle limit banks at most ``burst_s``, batches
shrink to a tenth of a second at the cap — and a capped job's fetches reach the destination
paced, with a cancel honoured while a batch waits for its turn."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar.controller.jobs import JobCancelled, run_transfer
from sidecar.controller.pacing import RateLimit, grant_bytes
from tests.unit.test_job_fetch_window import LANES, FakeSidecars, MiB, new_job


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_grants_start_at_the_cap_and_an_idle_limit_banks_only_its_burst(monkeypatch):
    clock = FakeClock()
    slept: list[float] = []

    async def fake_sleep(s):
        slept.append(s)
        clock.now += s

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    lim = RateLimit(1000, burst_s=0.5, clock=clock)

    async def main():
        starts = []
        for _ in range(5):
            await lim.take(100)
            starts.append(clock.now - 100)
        assert starts == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
        clock.now += 10  # idle: 0.5 s of credit banked (500 bytes) on top of the grant due now
        assert [await lim.take(250) for _ in range(4)] == pytest.approx([0, 0, 0, 0.25])

    asyncio.run(main())


def test_a_cancelled_wait_gives_its_turn_back():
    async def main():
        lim = RateLimit(1000)
        await lim.take(500)  # the next grant waits 0.5 s
        waiting = asyncio.create_task(lim.take(500))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        t0 = time.monotonic()
        await lim.take(100)  # waits for the first grant only, not the cancelled one
        assert time.monotonic() - t0 < 0.6

    asyncio.run(main())


def test_batches_shrink_to_a_twentieth_of_a_second_at_the_slowest_cap():
    assert grant_bytes([], 256 * MiB) == 256 * MiB
    assert grant_bytes([RateLimit(100 * MiB), RateLimit(40 * MiB)], 256 * MiB) == 2 * MiB
    assert grant_bytes([RateLimit(100 * MiB)], MiB) == MiB
    with pytest.raises(ValueError):
        RateLimit(0)


def test_a_capped_job_sends_its_batches_paced_and_a_cancel_stops_the_waiting_ones():
    async def main():
        # Eight 1 MiB batches at 10 MiB/s (grants of 0.5 MiB: one chunk each): one every
        # 0.1 s, the whole job ~0.7 s.
        job, fake = new_job(8, "copy"), FakeSidecars([0.0] * 8, failing=set())
        await run_transfer(job, LANES, fake.command, fetch_batch_bytes=64 * MiB, lease_s=60,
                           limits=(RateLimit(10 * MiB),))
        sent = [t for what, t, _ in fake.log if what == "fetch sent"]
        assert len(sent) == 8 and job.bytes == 8 * MiB  # from 64 MiB down to one chunk each
        gaps = [b - a for a, b in zip(sent, sent[1:])]
        assert min(gaps) > 0.08 and sent[-1] - sent[0] > 0.65, gaps

        # A cancel while batches wait for their turn: none of them is sent after it.
        job, fake = new_job(8, "copy"), FakeSidecars([0.0] * 8, failing=set())
        task = asyncio.create_task(run_transfer(job, LANES, fake.command, fetch_batch_bytes=MiB,
                                                lease_s=60, limits=(RateLimit(10 * MiB),)))
        await asyncio.sleep(0.25)
        job.request_cancel()
        cancelled_at = time.monotonic() - fake.t0
        with pytest.raises(JobCancelled):
            await task
        sent = [t for what, t, _ in fake.log if what == "fetch sent"]
        assert 2 <= len(sent) <= 4 and max(sent) < cancelled_at, sent

    asyncio.run(main())


def test_a_background_grant_lets_a_later_foreground_one_go_first():
    """A drain's batch (background) waiting for the cap does not keep a turn: an operator's
    move asking meanwhile is granted first; without the flag, first come first served."""
    async def scenario(background: bool) -> list[str]:
        limit = RateLimit(10 * MiB)
        order: list[str] = []

        async def take(name: str, bg: bool) -> None:
            await limit.take(MiB, background=bg)
            order.append(name)

        await limit.take(MiB)  # the cap is busy for 0.1 s
        waiting = asyncio.create_task(take("drain", background))
        await asyncio.sleep(0.02)
        await asyncio.gather(waiting, take("move", False))
        return order

    assert asyncio.run(scenario(background=True)) == ["move", "drain"]
    assert asyncio.run(scenario(background=False)) == ["drain", "move"]
