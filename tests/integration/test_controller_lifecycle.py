"""Sidecars outlive the controller: they register when it appears, and again after a crash."""

from __future__ import annotations

import asyncio
import time

from tests.harness.api import LOC
from tests.harness.fleet import Fleet
from tests.harness.stores import fill


def test_engines_before_controller_and_controller_restart(tmp_path):
    fleet = Fleet(tmp_path, start_controller=False)
    try:
        a = fleet.add_sidecar("early-a", wait=False)
        b = fleet.add_sidecar("early-b", wait=False)
        tokens = list(range(500, 570))
        fill(a, tokens, seed=11)  # stored while no controller runs: events are dropped

        fleet.start_controller()
        fleet.wait_registered("early-a")
        fleet.wait_registered("early-b")
        assert fleet.wait_lookup(tokens, {"early-a": 70}) == {"early-a": 70}

        fleet.kill_controller()  # SIGKILL: no goodbye to anyone
        more = list(range(900, 940))
        fill(b, more, seed=12)  # changes while the controller is down
        fleet.start_controller()
        t0 = time.monotonic()  # the controller serves: from here the sidecars' resync runs
        fleet.wait_registered("early-a")
        fleet.wait_registered("early-b")
        # README, promise 4: lookups match the stores again within 1 s of the restart (a
        # heartbeat, 0.2 s here, meets "unknown instance", then Register and Snapshot).
        # Bounded at 5 s: margin for a loaded 2-core machine.
        assert fleet.wait_lookup(tokens, {"early-a": 70}, timeout=5) == {"early-a": 70}
        assert fleet.wait_lookup(more, {"early-b": 40}, timeout=5) == {"early-b": 40}
        resync_s = time.monotonic() - t0
        assert resync_s < 5, resync_s

        r = fleet.http.post("/move", json={"old_position": ["early-a", LOC],
                                           "new_position": ["early-b", LOC], "tokens": tokens})
        assert r.status_code == 200, r.text
        assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
        assert fleet.wait_lookup(tokens, {"early-b": 70}) == {"early-b": 70}
    finally:
        fleet.close()


def test_event_gap_triggers_resync(tmp_path):
    """Events the controller never saw (dropped while the PUSH socket was away) are healed:
    the next batch starts past the controller's last seq, it asks for a resync, and the
    snapshot brings the lost chunks back into the index."""
    fleet = Fleet(tmp_path)
    try:
        a = fleet.add_sidecar("gappy")
        first = list(range(10, 40))
        fill(a, first, seed=1)
        assert fleet.wait_lookup(first, {"gappy": 30}) == {"gappy": 30}
        second = list(range(40, 80))

        async def lose_a_batch() -> int:
            # On the sidecar's own loop, so its event pusher cannot run in between: the
            # events of these chunks are drained and dropped before anyone could send them.
            fill(a, second, seed=2)
            return len(a.store.drain_events())

        assert asyncio.run_coroutine_threadsafe(lose_a_batch(), a.loop).result(5) == 2
        third = list(range(80, 90))
        fill(a, third, seed=3)  # the next batch starts past the controller's last seq
        assert fleet.wait_lookup(second, {"gappy": 40}) == {"gappy": 40}
        assert fleet.wait_lookup(third, {"gappy": 10}) == {"gappy": 10}
        assert "gappy: event gap" in fleet.controller.log_path.read_text()
    finally:
        fleet.close()
