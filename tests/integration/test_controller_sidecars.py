"""Controller + real sidecars + real NIXL between them (no vLLM): the move protocol."""

from __future__ import annotations

import random

import pytest

from tests.harness.api import LOC
from tests.harness.stores import chunk_bytes, fill, keys_of


def test_instances_lists_both(fleet, pair):
    inst = {i["instance_id"]: i for i in fleet.http.get("/instances").json()["instances"]}
    assert set(inst) >= {"a", "b"}
    assert inst["a"]["fingerprint"] == pair[0].fingerprint
    assert inst["a"]["up"] is True and inst["a"]["layout"]["chunk_size"] == 32


def test_move_is_byte_exact_and_deletes_source(fleet, pair):
    a, b = pair
    tokens = [random.Random(1).randrange(5000) for _ in range(100)]  # 3 full chunks + 4-token tail
    written = fill(a, tokens)
    assert fleet.wait_lookup(tokens, {"a": 100}) == {"a": 100}
    r = fleet.http.post("/move", json={"old_position": ["a", LOC], "new_position": ["b", LOC],
                                       "tokens": tokens})
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == 100
    st = fleet.wait_job(r.json()["event_id"])
    assert st["status"] == "done", st
    assert st["num_chunks"] == 4 and st["bytes"] == sum(len(v) for v in written.values())
    for k, data in written.items():
        assert chunk_bytes(b, k) == data
        assert not a.store.contains(k)
    assert fleet.wait_lookup(tokens, {"b": 100}) == {"b": 100}
    for s in (a, b):
        assert s.store.stats()["held_chunks"] == 0


def test_copy_keeps_both_and_lookup_lists_every_holder(fleet, pair):
    a, b = pair
    tokens = list(range(7, 7 + 40))
    written = fill(a, tokens, seed=50)
    fleet.wait_lookup(tokens, {"a": 40})
    r = fleet.http.post("/move", json={"old_position": ["a", LOC], "new_position": ["b", LOC],
                                       "tokens": tokens, "should_copy": True})
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
    assert fleet.wait_lookup(tokens, {"a": 40, "b": 40}) == {"a": 40, "b": 40}
    for k, data in written.items():
        assert chunk_bytes(a, k) == chunk_bytes(b, k) == data


def test_check_finish_lmcache_style(fleet, pair):
    a, _ = pair
    tokens = list(range(300, 310))
    fill(a, tokens, seed=9)
    fleet.wait_lookup(tokens, {"a": 10})
    eid = fleet.move("a", "b", tokens=tokens, copy=True).json()["event_id"]
    fleet.wait_job(eid)
    st = fleet.http.post("/check_finish", json={"event_id": eid}).json()
    assert st["status"] == "done" and st["num_tokens"] == 10 and st["kind"] == "copy"
    assert set(st) == {"event_id", "status", "kind", "source", "destination", "num_tokens",
                       "num_chunks", "bytes", "total_bytes", "elapsed_s", "error", "error_kind",
                       "max_bytes_per_s", "drain", "phases"}
    # Where the copy's time went: every phase ended, within the job's own time.
    phases = st["phases"]
    assert set(phases) == {"lease_s", "transfer_s", "release_s"}
    assert all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) <= st["elapsed_s"] + 1e-5, (phases, st["elapsed_s"])  # rounding


def test_prefix_longer_than_held_moves_the_held_part(fleet, pair):
    a, b = pair
    tokens = list(range(1000, 1080))
    fill(a, tokens[:64], seed=3)  # two full chunks only
    fleet.wait_lookup(tokens[:64], {"a": 64})
    r = fleet.http.post("/move", json={"old_position": ["a", LOC], "new_position": ["b", LOC],
                                       "tokens": tokens})
    assert r.json()["num_tokens"] == 64
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"


BAD = [
    ({"old_position": ["nope", LOC], "new_position": ["b", LOC], "tokens": [1]}, 404, "unknown instance"),
    ({"old_position": ["a", "LocalDiskBackend"], "new_position": ["b", LOC], "tokens": [1]}, 400, "location"),
    ({"old_position": ["a", LOC], "new_position": ["b", LOC], "tokens": []}, 400, "empty"),
    ({"old_position": ["a", LOC], "new_position": ["a", LOC], "tokens": [1]}, 400, "same instance"),
    ({"old_position": ["a", LOC], "new_position": ["b", LOC], "tokens": ["x"]}, 400, "tokens"),
    ({"old_position": ["a", LOC], "new_position": ["b", LOC], "tokens": [-1]}, 400, "token id"),
    ({"old_position": ["a", LOC], "new_position": ["b", LOC]}, 400, "exactly one"),
    ({"old_position": ["a"], "new_position": ["b", LOC], "tokens": [1]}, 400, "old_position"),
    ({"new_position": ["b", LOC], "tokens": [1]}, 400, "old_position"),
    ({"old_position": ["a", LOC], "new_position": ["b", LOC], "tokens": [4242, 4243]}, 404, "holds no KV"),
]


@pytest.mark.parametrize("body,status,msg", BAD)
def test_bad_moves_get_a_4xx_json_error_and_change_nothing(fleet, pair, body, status, msg):
    before = [s.store.snapshot() for s in pair]
    r = fleet.http.post("/move", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert msg in err["message"] and err["kind"]
    assert [s.store.snapshot() for s in pair] == before


@pytest.mark.parametrize("raw,ctype,status", [(b"{not json", "application/json", 400),
                                              (b"", "application/json", 400),
                                              (b"[1,2]", "application/json", 400),
                                              (b"tokens=1", "application/x-www-form-urlencoded", 415)])
def test_malformed_bodies(fleet, pair, raw, ctype, status):
    r = fleet.http.post("/move", content=raw, headers={"content-type": ctype})
    assert r.status_code == status and "error" in r.json()


def test_unknown_event_and_route(fleet):
    assert fleet.http.get("/events/deadbeef").status_code == 404
    assert fleet.http.post("/check_finish", json={"event_id": "x"}).json()["error"]["kind"] == "not_found"
    r = fleet.http.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"


def test_incompatible_layouts_are_refused_with_409(fleet, pair):
    a, _ = pair
    c = fleet.add_sidecar("c-other-dtype", dtype="float16")
    tokens = list(range(2000, 2010))
    fill(a, tokens, seed=1)
    fleet.wait_lookup(tokens, {"a": 10})
    r = fleet.http.post("/move", json={"old_position": ["a", LOC], "new_position": ["c-other-dtype", LOC],
                                       "tokens": tokens})
    assert r.status_code == 409
    assert "dtype" in r.json()["error"]["message"]
    assert c.store.stats()["num_chunks"] == 0


def test_lookup_bad_input(fleet, pair):
    assert fleet.http.post("/lookup", json={}).status_code == 400
    assert fleet.http.post("/lookup", json={"tokens": []}).status_code == 400
    r = fleet.http.post("/lookup", json={"tokens": [1, 2, 3]})
    assert r.status_code == 200 and r.json()["layout_info"] == {}


def test_pin_protects_from_eviction_unpin_and_clear(fleet):
    s = fleet.add_sidecar("small", slots=4)
    pinned = list(range(3000, 3032))  # one full chunk
    fill(s, pinned, seed=1)
    fleet.wait_lookup(pinned, {"small": 32})
    r = fleet.http.post("/pin", json={"instance_id": "small", "location": LOC, "tokens": pinned})
    assert r.status_code == 200, r.text
    assert r.json()["num_chunks"] == 1 and r.json()["num_tokens"] == 32
    assert s.store.stats()["pinned_chunks"] == 1
    others = [list(range(4000 + 100 * i, 4000 + 100 * i + 32)) for i in range(6)]
    for i, tokens in enumerate(others):  # more than the 4 slots hold: LRU eviction...
        fill(s, tokens, seed=i)
    # ...of the three oldest unpinned chunks, never of the pinned one (the oldest of all)
    assert s.store.stats()["evictions"] == 3
    assert {k for k, _ in s.store.snapshot()[1]} == {
        k for tokens in [pinned, *others[3:]] for k in keys_of(s, tokens)}
    assert fleet.wait_lookup(pinned, {"small": 32}) == {"small": 32}
    assert fleet.http.post("/unpin", json={"instance_id": "small", "tokens": pinned}).status_code == 200
    assert s.store.stats()["pinned_chunks"] == 0
    st = fleet.http.get(f"/events/{r.json()['event_id']}").json()
    assert st["kind"] == "pin" and st["status"] == "done"
    # clear by tokens, then the whole store
    c = fleet.http.post("/clear", json={"instance_id": "small", "tokens": pinned})
    assert c.json()["num_chunks"] == 1
    assert fleet.wait_lookup(pinned, {}) == {}
    c = fleet.http.post("/clear", json={"instance_id": "small", "location": LOC})
    assert c.status_code == 200 and c.json()["num_chunks"] == 3
    assert s.store.stats()["num_chunks"] == 0
    events = fleet.http.get("/events?limit=3").json()["events"]
    assert [e["kind"] for e in events] == ["clear", "clear", "unpin"]


def test_pin_bad_input(fleet, pair):
    assert fleet.http.post("/pin", json={"instance_id": "zzz", "tokens": [1]}).status_code == 404
    assert fleet.http.post("/pin", json={"instance_id": "a", "location": "Disk", "tokens": [1]}).status_code == 400
    assert fleet.http.post("/pin", json={"instance_id": "a"}).status_code == 400
    assert fleet.http.post("/pin", json={"instance_id": "a", "tokens": [77777]}).status_code == 404
    assert fleet.http.get("/events?limit=x").status_code == 400


def test_lmcache_health_and_query_worker_info(fleet, pair):
    a, _ = pair
    h = fleet.http.post("/health", json={"instance_id": "a"})
    assert h.status_code == 200 and h.json()["error_codes"] == {"0": 0} and h.json()["event_id"]
    assert fleet.http.post("/health", json={"instance_id": "nope"}).status_code == 404
    w = fleet.http.post("/query_worker_info", json={"instance_id": "a", "worker_ids": [0]})
    assert w.status_code == 200
    (info,) = w.json()["worker_infos"]
    assert info["instance_id"] == "a" and info["worker_id"] == 0
    assert info["port"] == a.config.sidecar_port and info["peer_init_url"] == a.transfer.p2p_url
    assert info["last_heartbeat_time"] >= info["registration_time"] > 1.7e9


def test_event_long_poll_answers_when_the_job_ends(fleet, pair):
    a, _ = pair
    tokens = list(range(7000, 7040))
    fill(a, tokens, seed=70)
    fleet.wait_lookup(tokens, {"a": 40})
    r = fleet.move("a", "b", tokens=tokens, copy=True)
    st = fleet.http.get(f"/events/{r.json()['event_id']}?wait=10").json()
    assert st["status"] == "done"  # one request, no polling
    for bad in ("-1", "61", "x", "nan"):
        assert fleet.http.get(f"/events/{st['event_id']}?wait={bad}").status_code == 400


def test_move_with_wait_answers_with_the_final_status(fleet, pair):
    a, b = pair
    tokens = list(range(7100, 7140))
    fill(a, tokens, seed=71)
    fleet.wait_lookup(tokens, {"a": 40})
    before = len(fleet.http.get("/events").json()["events"])
    for bad in ("-1", "61", "x", "nan"):  # refused before any job starts
        r = fleet.http.post(f"/move?wait={bad}", json={"old_position": ["a", LOC],
                                                       "new_position": ["b", LOC], "tokens": tokens})
        assert r.status_code == 400 and "wait" in r.json()["error"]["message"]
    assert len(fleet.http.get("/events").json()["events"]) == before
    r = fleet.http.post("/move?wait=10", json={"old_position": ["a", LOC], "new_position": ["b", LOC],
                                                "tokens": tokens})
    st = r.json()
    assert r.status_code == 200 and st["status"] == "done" and st["kind"] == "move", st
    assert st["num_tokens"] == 40 and st["event_id"]  # the fields of the plain answer, too
    assert fleet.wait_lookup(tokens, {"b": 40}) == {"b": 40}


def test_chunks_held_before_the_sidecar_started_are_hashed_without_waiting_for_an_event(
        fleet, monkeypatch):
    """A store that already holds chunks when its sidecar starts (filled before, as the
    standalone sidecars of the benchmarks are) gets their checksums at once, not at the event
    loop's fallback wake-up: a move right after registration then has none to compute."""
    import time
    import sidecar.agent.runtime as runtime
    from sidecar.agent import Sidecar
    from tests.harness.stores import put_chunk, tiny_layout
    from vllm_kvmove.config import build_config
    from vllm_kvmove.store import ChunkStore
    # No fallback wake-up in this test's lifetime: only the start-up pass can hash.
    monkeypatch.setattr(runtime, "_EVENT_FALLBACK_S", 3600.0)
    layout = tiny_layout()
    store = ChunkStore(layout, 8 * layout.chunk_bytes)
    for i in range(4):
        put_chunk(store, i.to_bytes(16, "big"), layout.chunk_size, i)
    assert store.checksums_pending()
    sc = Sidecar(build_config(fleet.sidecar_config("prefilled", layout, 8)), store, layout).start()
    try:
        sc.wait_ready(30)
        deadline = time.monotonic() + 20
        while store.checksums_pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not store.checksums_pending()
        assert store.unsummed_bytes([i.to_bytes(16, "big") for i in range(4)]) == 0
    finally:
        sc.stop()
