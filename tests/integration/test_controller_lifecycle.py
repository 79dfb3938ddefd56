"""Sidecars outlive the controller: they register when it appears, and again after a crash."""

from __future__ import annotations

import time

from tests.integration.conftest import Fleet
from tests.integration.test_controller_sidecars import LOC, fill


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
        t0 = time.monotonic()
        fleet.start_controller()
        fleet.wait_registered("early-a")
        fleet.wait_registered("early-b")
        assert fleet.wait_lookup(tokens, {"early-a": 70}) == {"early-a": 70}
        assert fleet.wait_lookup(more, {"early-b": 40}) == {"early-b": 40}
        resync_s = time.monotonic() - t0
        assert resync_s < 10, resync_s

        r = fleet.http.post("/move", json={"old_position": ["early-a", LOC],
                                           "new_position": ["early-b", LOC], "tokens": tokens})
        assert r.status_code == 200, r.text
        assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
        assert fleet.wait_lookup(tokens, {"early-b": 70}) == {"early-b": 70}
    finally:
        fleet.close()


def test_event_gap_triggers_resync(tmp_path):
    """Events the controller never saw (dropped while the PUSH socket was away) are healed."""
    fleet = Fleet(tmp_path)
    try:
        a = fleet.add_sidecar("gappy")
        first = list(range(10, 40))
        fill(a, first, seed=1)
        assert fleet.wait_lookup(first, {"gappy": 30}) == {"gappy": 30}
        # Lose a batch of events on purpose: drain them from the store before the sidecar
        # sends them (it flushes every 20 ms, so retry until the drain wins the race).
        for attempt in range(20):
            second = list(range(1000 * attempt + 40, 1000 * attempt + 80))
            fill(a, second, seed=2)
            if a.store.drain_events():
                break
        else:
            raise AssertionError("could not lose an event batch")
        third = list(range(80, 90))
        fill(a, third, seed=3)  # the next batch starts past the controller's last seq
        assert fleet.wait_lookup(second, {"gappy": 40}) == {"gappy": 40}
        assert fleet.wait_lookup(third, {"gappy": 10}) == {"gappy": 10}
    finally:
        fleet.close()
