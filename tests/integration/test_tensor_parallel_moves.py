"""Tensor-parallel instances with real sidecars and real NIXL (no vLLM): each rank of an engine
is a sidecar with a store of its own holding its shard; the controller speaks for the engine
as a whole — one ``/instances`` entry, lookups that count a chunk only where every rank holds
it, moves rank to rank (byte-exact per rank, the source deleted at every rank only once every
rank of the destination holds), pins at every rank, and a rank that leaves takes the engine
down. LMCache's per-worker endpoints report one worker per rank."""

from __future__ import annotations

import pytest

from tests.harness.api import LOC
from tests.harness.stores import chunk_bytes, fill


@pytest.fixture(scope="module")
def engines(fleet):
    """Two TP=2 "engines" (``tpa``, ``tpb``: two in-process sidecars each) and one without
    tensor parallelism (``solo``), all of the same per-rank layout."""
    ranks = {iid: [fleet.add_sidecar(iid, rank=r, world_size=2, wait=r == 1) for r in (0, 1)]
             for iid in ("tpa", "tpb")}
    ranks["solo"] = [fleet.add_sidecar("solo")]
    return ranks


def listed(fleet) -> dict[str, dict]:
    return {i["instance_id"]: i for i in fleet.http.get("/instances").json()["instances"]}


def test_an_engine_is_listed_once_with_its_ranks(fleet, engines):
    tpa = listed(fleet)["tpa"]
    assert tpa["up"] is True and tpa["world_size"] == 2
    assert [(r["rank"], r["up"]) for r in tpa["ranks"]] == [(0, True), (1, True)]
    assert tpa["sidecar_url"] == tpa["ranks"][0]["sidecar_url"] != tpa["ranks"][1]["sidecar_url"]
    assert tpa["capacity_bytes"] == sum(r["capacity_bytes"] for r in tpa["ranks"])
    workers = fleet.http.post("/query_worker_info", json={"instance_id": "tpa"}).json()
    assert sorted(w["worker_id"] for w in workers["worker_infos"]) == [0, 1]
    health = fleet.http.post("/health", json={"instance_id": "tpa"}).json()
    assert health["error_codes"] == {"0": 0, "1": 0}
    r = fleet.http.post("/health", json={"instance_id": "tpa", "worker_ids": [2]})
    assert r.status_code == 400 and "0..1" in r.json()["error"]["message"]


def test_a_move_goes_rank_to_rank_byte_exact_and_deletes_every_source_rank(fleet, engines):
    (a0, a1), (b0, b1) = engines["tpa"], engines["tpb"]
    tokens = list(range(1000, 1000 + 100))  # 3 full chunks + a 4-token tail
    shards = [fill(a0, tokens, seed=10), fill(a1, tokens, seed=20)]
    assert shards[0].keys() == shards[1].keys() and shards[0] != shards[1]
    assert fleet.wait_lookup(tokens, {"tpa": 100}) == {"tpa": 100}
    r = fleet.http.post("/move", params={"wait": 30}, json={
        "old_position": ["tpa", LOC], "new_position": ["tpb", LOC], "tokens": tokens})
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["status"] == "done", st
    assert st["bytes"] == st["total_bytes"] == sum(len(v) for s in shards for v in s.values())
    for dst, src_bytes, src in ((b0, shards[0], a0), (b1, shards[1], a1)):
        for key, data in src_bytes.items():
            assert chunk_bytes(dst, key) == data  # rank r's shard went to rank r
            assert not src.store.contains(key)
    assert fleet.wait_lookup(tokens, {"tpb": 100}) == {"tpb": 100}
    assert listed(fleet)["tpb"]["num_chunks"] >= 4
    for sc in (a0, a1, b0, b1):
        assert sc.store.stats()["held_chunks"] == 0


def test_a_prefix_one_rank_lacks_is_not_the_engines(fleet, engines):
    (a0, a1) = engines["tpa"]
    tokens = list(range(5000, 5000 + 96))
    fill(a0, tokens, seed=1)
    fill(a1, tokens[:64], seed=2)  # rank 1 holds the first two chunks only
    assert fleet.wait_lookup(tokens, {"tpa": 64}) == {"tpa": 64}
    st = fleet.http.post("/move", params={"wait": 30}, json={
        "old_position": ["tpa", LOC], "new_position": ["tpb", LOC], "tokens": tokens,
        "copy": True}).json()
    assert st["status"] == "done" and st["num_tokens"] == 64 and st["num_chunks"] == 2


def test_pins_and_clears_reach_every_rank(fleet, engines):
    (b0, b1) = engines["tpb"]
    tokens = list(range(1000, 1000 + 100))  # what the move above brought to tpb
    fleet.wait_lookup(tokens, {"tpb": 100})
    r = fleet.http.post("/pin", json={"instance_id": "tpb", "tokens": tokens})
    assert r.status_code == 200 and r.json()["num_chunks"] == 4, r.text
    assert b0.store.stats()["pinned_chunks"] == b1.store.stats()["pinned_chunks"] == 4
    fleet.http.post("/unpin", json={"instance_id": "tpb", "tokens": tokens})
    assert b0.store.stats()["pinned_chunks"] == b1.store.stats()["pinned_chunks"] == 0
    r = fleet.http.post("/clear", json={"instance_id": "tpb", "tokens": tokens})
    assert r.status_code == 200, r.text
    fleet.wait_lookup(tokens, {})
    assert b0.store.stats()["num_chunks"] == b1.store.stats()["num_chunks"] == 2  # the copy's


def test_engines_of_different_tensor_parallelism_are_refused_naming_it(fleet, engines):
    tokens = list(range(5000, 5000 + 96))
    r = fleet.http.post("/move", json={"old_position": ["tpa", LOC], "new_position": ["solo", LOC],
                                       "tokens": tokens})
    assert r.status_code == 409 and r.json()["error"]["kind"] == "incompatible"
    assert "tensor_parallel_size: 2 != 1" in r.json()["error"]["message"]


def test_a_rank_that_leaves_takes_the_engine_down(fleet, engines, capsys):
    (b0, b1) = engines["tpb"]
    tokens = list(range(5000, 5000 + 96))
    assert fleet.wait_lookup(tokens, {"tpa": 64, "tpb": 64})
    b1.stop()  # its Goodbye: the controller forgets rank 1
    assert fleet.wait_lookup(tokens, {"tpa": 64}) == {"tpa": 64}
    tpb = listed(fleet)["tpb"]
    assert tpb["up"] is False and [r["rank"] for r in tpb["ranks"]] == [0]
    assert fleet.http.post("/health", json={"instance_id": "tpb"}).json()["error_codes"] == \
        {"0": 0, "1": 1}
    r = fleet.http.post("/move", json={"old_position": ["tpa", LOC], "new_position": ["tpb", LOC],
                                       "tokens": tokens})
    assert r.status_code == 503 and "rank(s) [1] of 2 not registered" in r.json()["error"]["message"]
    assert fleet.http.get("/health").json()["instances_up"] == 2  # tpa and solo
    assert fleet.kvmove("instances") == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "up (TP 2)" in rows["tpa"] and "down (1/2 ranks)" in rows["tpb"]
