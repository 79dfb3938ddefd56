"""Promise 5: a sidecar that stops heartbeating is marked down, moves to or from it are refused
with 503, and it returns to service when it comes back. The sidecar is a real process, frozen
with SIGSTOP and thawed with SIGCONT."""

from __future__ import annotations

import os
import signal
import time

from tests.harness.api import LOC
from tests.harness.stores import fill, tiny_layout


def instance(fleet, iid):
    return {i["instance_id"]: i for i in fleet.http.get("/instances").json()["instances"]}[iid]


def wait_up(fleet, iid, up: bool, timeout: float = 10) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if instance(fleet, iid)["up"] is up:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{iid} never became {'up' if up else 'down'}")


def test_frozen_sidecar_is_down_refused_with_503_and_comes_back(fleet):
    layout = tiny_layout()
    proc = fleet.spawn_sidecar("frozen", layout, slots=16, fill=["7:40000:70"])
    live = fleet.add_sidecar("hb-live")
    tokens = list(range(40000, 40070))
    fleet.wait_lookup(tokens, {"frozen": 70})
    mine = list(range(41000, 41040))
    fill(live, mine, seed=3)
    fleet.wait_lookup(mine, {"hb-live": 40})
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        detect_s = wait_up(fleet, "frozen", False)
        # Down within the fleet's --heartbeat-timeout (3 s) of the last heartbeat; margin for
        # a loaded 2-core machine.
        assert detect_s < 3 + 3
        for body in ({"old_position": ["frozen", LOC], "new_position": ["hb-live", LOC], "tokens": tokens},
                     {"old_position": ["hb-live", LOC], "new_position": ["frozen", LOC], "tokens": mine}):
            r = fleet.http.post("/move", json=body)
            assert r.status_code == 503 and "down" in r.json()["error"]["message"]
        assert fleet.http.get("/health").status_code == 200
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_up(fleet, "frozen", True)
    r = fleet.http.post("/move", json={"old_position": ["frozen", LOC], "new_position": ["hb-live", LOC],
                                       "tokens": tokens})
    assert r.status_code == 200, r.text
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
    assert fleet.wait_lookup(tokens, {"hb-live": 70}) == {"hb-live": 70}
    print(f"\n[promise 5] frozen sidecar marked down after {detect_s:.2f} s")
