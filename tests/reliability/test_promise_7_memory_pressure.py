"""Promise 7: a move into a nearly full store evicts only unpinned least-recently-used chunks,
or fails cleanly with 507 when it cannot; pinned chunks are never evicted."""

from __future__ import annotations

import time

from tests.harness.api import LOC
from tests.harness.fleet import Fleet
from tests.harness.stores import fill
from tests.harness.stores import keys_of as keys


def instance(fleet, iid: str) -> dict:
    return {i["instance_id"]: i for i in fleet.http.get("/instances").json()["instances"]}[iid]


def wait_heartbeat(fleet, iid, available):
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5:
        if instance(fleet, iid)["available_bytes"] == available:
            return
        time.sleep(0.05)
    raise AssertionError(f"{iid} never reported {available} available bytes")


def test_move_into_full_store_evicts_lru_unpinned_only(fleet):
    src, dst = fleet.add_sidecar("mem-src"), fleet.add_sidecar("mem-dst", slots=4)
    old, pinned, recent = list(range(10, 42)), list(range(50, 82)), list(range(90, 122))
    extra = list(range(130, 162))
    fill(dst, old, seed=1)      # LRU order: old, pinned, recent, extra
    fill(dst, pinned, seed=2)
    fill(dst, recent, seed=3)
    fill(dst, extra, seed=4)
    fleet.wait_lookup(pinned, {"mem-dst": 32})
    assert fleet.http.post("/pin", json={"instance_id": "mem-dst", "tokens": pinned}).status_code == 200
    incoming = list(range(300, 364))  # two chunks: evicts the two oldest unpinned (old, recent)
    fill(src, incoming, seed=5)
    fleet.wait_lookup(incoming, {"mem-src": 64})
    r = fleet.http.post("/move", json={"old_position": ["mem-src", LOC],
                                       "new_position": ["mem-dst", LOC], "tokens": incoming})
    assert r.status_code == 200, r.text
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
    held = {k for k, _ in dst.store.snapshot()[1]}
    assert held == set(keys(dst, pinned) + keys(dst, extra) + keys(dst, incoming))
    assert dst.store.stats()["evictions"] == 2


def test_move_that_cannot_fit_is_507_and_changes_nothing(fleet):
    src, dst = fleet.add_sidecar("full-src"), fleet.add_sidecar("full-dst", slots=2)
    held = list(range(10, 74))  # fills both slots
    fill(dst, held, seed=1)
    fleet.wait_lookup(held, {"full-dst": 64})
    assert fleet.http.post("/pin", json={"instance_id": "full-dst", "tokens": held}).status_code == 200
    wait_heartbeat(fleet, "full-dst", 0)
    incoming = list(range(500, 532))
    fill(src, incoming, seed=2)
    fleet.wait_lookup(incoming, {"full-src": 32})
    before = (src.store.snapshot(), dst.store.snapshot())
    r = fleet.http.post("/move", json={"old_position": ["full-src", LOC],
                                       "new_position": ["full-dst", LOC], "tokens": incoming})
    assert r.status_code == 507 and r.json()["error"]["kind"] == "store_full"
    assert (src.store.snapshot(), dst.store.snapshot()) == before


def test_store_full_found_at_fetch_time_fails_the_job_cleanly(tmp_path):
    """The controller's view of a store's free space comes with heartbeats and replies, so it
    lags; the destination's own check at fetch time still holds. Here the destination
    heartbeats every 30 s (and the controller waits 60 s before calling it down), so when the
    move starts the controller still believes its registration — every slot free — although
    both slots are taken and held: the move passes the controller's 507 check and must fail at
    the fetch, cleanly."""
    fleet = Fleet(tmp_path, controller_args=("--heartbeat-timeout", "60"))
    try:
        src = fleet.add_sidecar("race-src")
        dst = fleet.add_sidecar("race-dst", slots=2, config={"heartbeat_interval_s": 30})
        incoming = list(range(800, 832))
        fill(src, incoming, seed=3)
        fleet.wait_lookup(incoming, {"race-src": 32})
        held = list(range(900, 964))
        fill(dst, held, seed=4)
        fleet.wait_lookup(held, {"race-dst": 64})
        dst.store.hold(keys(dst, held))  # behind the controller's back: no heartbeat tells it
        assert instance(fleet, "race-dst")["available_bytes"] == 2 * dst.store.slot_bytes
        r = fleet.http.post("/move", json={"old_position": ["race-src", LOC],
                                           "new_position": ["race-dst", LOC], "tokens": incoming})
        assert r.status_code == 200, r.text
        st = fleet.wait_job(r.json()["event_id"])
        assert st["status"] == "failed" and st["error_kind"] == "store_full", st
        assert set(keys(dst, held)) == {k for k, _ in dst.store.snapshot()[1]}
        assert dst.store.stats()["writing_chunks"] == 0
        assert src.store.contains(keys(src, incoming)[0])
        assert src.store.stats()["held_chunks"] == 0  # the source's lease ended
        # The failed fetch's reply carried a heartbeat: the controller knows now.
        assert instance(fleet, "race-dst")["available_bytes"] == 0
        dst.store.release(keys(dst, held))
    finally:
        fleet.close()
