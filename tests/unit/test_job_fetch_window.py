"""A job's fetch window: when one batch fails (or the job is cancelled), batches already sent
to the destination are waited for (not abandoned), no new batch starts, and the source's lease
ends only after the destination settled every batch it was sent. The sidecars are faked at the
``command`` callable of :func:`sidecar.controller.jobs.run_transfer` (the one door through
which a job talks to sidecars)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar import protocol
from sidecar.controller.jobs import Job, JobCancelled, JobFailed, Lane, Source, run_transfer
from sidecar.httpkit import ApiError

MiB = 1 << 20


class FakeSidecars:
    """Answers LeaseChunks with four 1 MiB chunks; each FetchChunks (one chunk per batch) after
    ``delays[i]`` seconds, failing the batches in ``failing``; records what happened when.
    Assigns request ids as the channel does; ``held``: the lease ids of the fetches that hold
    chunks at the destination (a move's)."""

    def __init__(self, delays: list[float], failing: set[int]):
        self.delays, self.failing = delays, failing
        self.log: list[tuple[str, float, object]] = []
        self.t0 = time.monotonic()
        self.req_ids = iter(range(1000, 2000))
        self.held: set[int] = set()
        self.lease_delay = self.end_delay = 0.0  # how long the source takes to answer these

    async def command(self, instance_id: str, msg, timeout=None, depends_on=()) -> protocol.Reply:
        now = lambda: time.monotonic() - self.t0  # noqa: E731
        msg.req_id = next(self.req_ids)
        if isinstance(msg, protocol.LeaseChunks):
            await asyncio.sleep(self.lease_delay)
            chunks = [protocol.ChunkDesc(key=k, num_tokens=16, addr=i * MiB, nbytes=MiB, checksum=i)
                      for i, k in enumerate(msg.keys)]
            return protocol.Reply(req_id=msg.req_id, ok=True, chunks=chunks, count=len(chunks))
        if isinstance(msg, protocol.FetchChunks):
            (c,) = msg.chunks
            i = c.checksum
            self.log.append(("fetch sent", now(), i))
            await asyncio.sleep(self.delays[i])
            self.log.append(("fetch settled", now(), i))
            if i in self.failing:
                return protocol.Reply(req_id=msg.req_id, ok=False, error_kind="transfer",
                                      error=f"batch {i} broke")
            if msg.hold:
                self.held.add(msg.req_id)
            return protocol.Reply(req_id=msg.req_id, ok=True, count=1, bytes=MiB)
        if isinstance(msg, protocol.EndLease) and instance_id == "src":
            await asyncio.sleep(self.end_delay)
            self.log.append(("end lease", now(), msg.delete))
            return protocol.Reply(req_id=msg.req_id, ok=True)
        if isinstance(msg, protocol.EndLease):  # at the destination: a fetch's hold
            assert not msg.delete, msg
            held = msg.lease_id in self.held
            self.held.discard(msg.lease_id)
            self.log.append(("end destination lease" if held else "end unheld destination lease",
                             now(), msg.lease_id))
            return protocol.Reply(req_id=msg.req_id, ok=True)
        raise AssertionError(msg)


SOURCE = protocol.PeerInfo("src", "agent-src", "127.0.0.1:1", "1")
LANES = [Lane("dst", (Source("src", SOURCE),))]  # an engine without tensor parallelism: one lane


async def transfer(job: Job, fake: FakeSidecars) -> Exception | None:
    """Run the job's steps against the fakes, in 1 MiB batches; the exception it ended with
    (after what the job left to the background: the destination's leases)."""
    try:
        await run_transfer(job, LANES, fake.command, fetch_batch_bytes=MiB, lease_s=60)
    except (JobFailed, JobCancelled) as e:
        return e
    finally:
        await asyncio.sleep(0.01)
    return None


def source_lease_end(fake: FakeSidecars) -> tuple[float, bool]:
    """When the source's lease ended, and whether it deleted the chunks."""
    (t, delete), = [(t, d) for what, t, d in fake.log if what == "end lease"]
    return t, delete


def new_job(n: int, kind: str = "move") -> Job:
    return Job(event_id="e1", kind=kind, source="src", destination="dst",
               keys=[bytes([i]) * 16 for i in range(n)], num_tokens=64)


def run_job(delays: list[float], failing: set[int], kind: str = "move", lease_delay: float = 0.0,
            end_delay: float = 0.0) -> tuple[Job, FakeSidecars, Exception | None]:
    async def main():
        job, fake = new_job(len(delays), kind), FakeSidecars(delays, failing)
        fake.lease_delay, fake.end_delay = lease_delay, end_delay
        return job, fake, await transfer(job, fake)

    return asyncio.run(main())


def test_a_failed_batch_waits_for_the_batch_in_flight_and_starts_no_other():
    # Batch 0 fails at once; batch 1, already sent, settles 0.3 s later; 2 and 3 never start.
    job, fake, err = run_job([0.0, 0.3, 0.0, 0.0], failing={0})
    assert isinstance(err, JobFailed) and "batch 0 broke" in str(err)
    sent = [i for what, _, i in fake.log if what == "fetch sent"]
    assert sent == [0, 1]
    settled_1 = next(t for what, t, i in fake.log if what == "fetch settled" and i == 1)
    end_at, delete = next((t, d) for what, t, d in fake.log if what == "end lease")
    assert end_at >= settled_1  # the source kept its lease while batch 1 was being read
    assert delete is False  # a failed move deletes nothing at the source
    assert job.bytes == MiB  # batch 1's bytes are counted: they did arrive


def test_the_cause_reported_is_the_first_batch_that_failed():
    job, fake, err = run_job([0.2, 0.0, 0.0, 0.0], failing={0, 1})
    assert isinstance(err, JobFailed) and "batch 0 broke" in str(err)
    assert [i for what, _, i in fake.log if what == "fetch sent"] == [0, 1]


@pytest.mark.parametrize("kind", ["move", "copy"])
def test_all_batches_succeed_then_release(kind):
    job, fake, err = run_job([0.01, 0.0, 0.02, 0.0], failing=set(), kind=kind)
    assert err is None and job.bytes == 4 * MiB
    assert [what for what, _, _ in fake.log].count("fetch settled") == 4
    # The source's lease ends after every fetch settled; a move deletes at the source, a copy
    # keeps its chunks.
    end_at, delete = source_lease_end(fake)
    assert end_at >= max(t for what, t, _ in fake.log if what == "fetch settled")
    assert delete is (kind == "move")
    # A move's destination held every batch until the source's delete was done; a copy's did
    # not hold them at all.
    ended = [(t, lid) for what, t, lid in fake.log if what == "end destination lease"]
    assert len(ended) == (4 if kind == "move" else 0) and not fake.held
    assert all(t >= end_at for t, _ in ended)


def test_a_failed_move_ends_the_destination_leases_of_every_batch_it_sent():
    """Batch 1 arrived and is held there; batch 0 failed here, but a fetch given up on may
    still complete at the destination later, so its lease is ended too (a no-op there now, a
    tombstone that releases it if it completes)."""
    job, fake, err = run_job([0.0, 0.1, 0.0, 0.0], failing={0})
    assert isinstance(err, JobFailed) and source_lease_end(fake)[1] is False
    whats = [what for what, _, _ in fake.log]
    assert whats.count("end destination lease") == 1 and whats.count("end unheld destination lease") == 1
    assert not fake.held


def run_cancelled(cancel_at: str) -> tuple[Job, FakeSidecars, Exception | None]:
    """A move of four 1 MiB batches (0.2 s each) cancelled ``"before"`` it starts or
    ``"in flight"`` (while batches 0 and 1 are being fetched)."""
    async def main():
        job, fake = new_job(4), FakeSidecars([0.2] * 4, failing=set())
        job.begin()
        if cancel_at == "before":
            job.request_cancel()
        else:
            asyncio.get_running_loop().call_later(0.05, job.request_cancel)
        return job, fake, await transfer(job, fake)

    return asyncio.run(main())


def test_a_cancel_lets_the_batches_in_flight_finish_and_starts_no_other():
    job, fake, err = run_cancelled("in flight")
    assert isinstance(err, JobCancelled) and "2097152 of 4194304 bytes" in str(err)
    assert [i for what, _, i in fake.log if what == "fetch sent"] == [0, 1]
    assert [i for what, _, i in fake.log if what == "fetch settled"] == [0, 1]
    assert source_lease_end(fake)[1] is False  # the source keeps them all
    assert not fake.held  # and the destination's holds on the two batches ended
    assert job.bytes == 2 * MiB


def test_a_cancel_before_the_start_leases_nothing():
    job, fake, err = run_cancelled("before")
    assert isinstance(err, JobCancelled) and "before it started" in str(err) and fake.log == []


@pytest.mark.parametrize("status", ["done", "failed", "cancelled"])
def test_an_ended_job_or_a_store_op_cannot_be_cancelled(status):
    ended = Job(event_id="e1", kind="copy", source="a", destination="b", keys=[], num_tokens=0,
                status=status)
    with pytest.raises(ApiError) as e:
        ended.request_cancel()
    assert e.value.kind == "conflict" and status in str(e.value)
    pin = Job(event_id="e2", kind="pin", source="a", destination="", keys=[], num_tokens=0,
              status="running")
    with pytest.raises(ApiError, match="cannot be cancelled"):
        pin.request_cancel()


def test_the_job_reports_the_time_of_each_phase():
    # Lease 0.1 s; four 0.1 s batches two at a time (>= 0.2 s); the end of the lease 0.15 s.
    job, _, err = run_job([0.1] * 4, failing=set(), lease_delay=0.1, end_delay=0.15)
    assert err is None
    st = job.to_status()
    assert st.phases is job.phases
    assert st.phases.lease_s >= 0.1 and st.phases.transfer_s >= 0.2 and \
        st.phases.release_s >= 0.15
    # A job that failed in its transfer reports the phases it went through.
    job, _, err = run_job([0.0, 0.1, 0.0, 0.0], failing={0})
    assert isinstance(err, JobFailed)
    assert job.phases.transfer_s >= 0.1 and job.phases.release_s is not None
    # Other kinds have none.
    assert Job(event_id="e2", kind="pin", source="src", destination="", keys=[],
               num_tokens=0).to_status().phases is None
