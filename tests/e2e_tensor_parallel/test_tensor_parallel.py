"""Two CPU engines with ``--tensor-parallel-size 2``, one without (and 32-token blocks), the
connector, and a controller.

Each rank's worker keeps a store and a sidecar of its own (the configured sidecar port +
rank), each holding its own shard of every chunk (the same keys, different bytes: its heads),
and registers with the controller as that rank of its engine. Shown here with the engines'
own word:

* a prompt served once is served again from the two stores after vLLM's own prefix cache is
  reset — ``vllm:external_prefix_cache_hits`` up by N-1, ``cached_tokens`` N-1, the same
  greedy output;
* the seed flow between the two engines: the controller lists each engine once (two ranks),
  ``POST /move`` moves every rank's shard to the same rank of the other engine, byte for byte,
  the source ends without them, and the destination serves the prompt from the moved KV
  (hits >= N-1, the source's greedy output);
* moves that convert (heads joined or split, blocks regrouped): TP=2 with 128-token blocks to
  TP=1 with 32-token blocks, and TP=1 with 32-token blocks to TP=2 with 128-token blocks —
  the same proof on the destination.

Its own package: its engines start after the e2e package's two engines stopped (memory)."""

from __future__ import annotations

import random
import time

import pytest

from tests.harness.api import LOC, lookup, wait_lookup
from tests.harness.engines import ConnectorFleet, chunk_keys, model_dir

N = 700
CHUNK = 256


# A controller, two TP=2 engines, ``tp2a`` and ``tp2b`` (vLLM's default block size), sharing
# the machine's two cores (rank r on core r), and ``one32``, without tensor parallelism, with
# 32-token blocks (core 0). ``tp2a`` saves in the background (``save_mode: background``: a
# saver thread per rank, chunks committed once copied, reused blocks fenced — the path a GPU
# engine's side stream takes); the others save inline.
ENGINES = {
    "tp2a": ("0|1", ["--tensor-parallel-size", "2"],
             {"chunk_size": CHUNK, "save_mode": "background"}),
    "tp2b": ("0|1", ["--tensor-parallel-size", "2"], {"chunk_size": CHUNK, "save_mode": "inline"}),
    "one32": ("0", ["--block-size", "32"], {"chunk_size": CHUNK, "save_mode": "auto"}),
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with ConnectorFleet.running(model_dir(), tmp_path_factory.mktemp("tp2"), ENGINES) as f:
        yield f


def test_each_engine_saves_as_configured(fleet):
    """Every rank of tp2a runs background saves; tp2b's (inline) and one32's (auto, a host
    cache) save on the forward thread — as each worker logged at start-up."""
    for iid, mode, ranks in (("tp2a", "background", 2), ("tp2b", "inline", 2),
                             ("one32", "inline", 1)):
        log = fleet.engines[iid].proc.log_path.read_text(errors="replace")
        assert log.count(f"kvmove saves: {mode} (cache on cpu)") == ranks, iid


@pytest.mark.timeout(600)
def test_each_rank_stores_its_shard_and_the_engine_is_served_from_both(fleet):
    """tp2a (background saves): each rank's store holds its shard of the prompt, and the
    engine is served from them after its own prefix cache is reset."""
    engine = fleet.engines["tp2a"]
    tokens = [random.Random(13).randrange(3, 4000) for _ in range(N)]
    reference = engine.complete(tokens, max_tokens=6)
    chunks = -(-N // CHUNK)
    deadline = time.monotonic() + 30
    while not all(fleet.rank_get("tp2a", r, "/store").json()["num_chunks"] >= chunks
                  for r in (0, 1)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # The same chunk keys on both ranks, each rank's own heads.
    keys = chunk_keys(fleet.http, tokens, "tp2a")
    for key in keys:
        shards = [fleet.rank_get("tp2a", r, f"/chunks/{key}").content for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) > 0 and shards[0] != shards[1]
    # Served again from the two stores.
    out, hits = engine.complete_from_store(tokens)
    print(f"\n[tp2] {N} tokens: {chunks} chunks on each of 2 ranks; after a prefix-cache reset "
          f"{hits:.0f} external hits, cached_tokens {out['usage']['prompt_tokens_details']['cached_tokens']}")
    assert hits == N - 1
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == N - 1
    assert out["choices"][0]["text"] == reference["choices"][0]["text"]


@pytest.mark.timeout(600)
def test_the_seed_flow_between_two_tensor_parallel_engines(fleet):
    src, dst = fleet.engines["tp2a"], fleet.engines["tp2b"]
    listed = fleet.instances()
    assert set(listed) == {"tp2a", "tp2b", "one32"}
    assert [(r["rank"], r["up"]) for r in listed["tp2b"]["ranks"]] == [(0, True), (1, True)]
    assert listed["tp2a"]["world_size"] == 2
    tokens = [random.Random(29).randrange(3, 4000) for _ in range(N)]
    reference = src.complete(tokens)
    assert wait_lookup(fleet.http, tokens, {"tp2a": N}, timeout=30) == {"tp2a": N}
    keys = chunk_keys(fleet.http, tokens, "tp2a")
    before = {(r, k): fleet.rank_get("tp2a", r, f"/chunks/{k}").content
              for r in (0, 1) for k in keys}
    t0 = time.perf_counter()
    r = fleet.http.post("/move", params={"wait": 60}, json={
        "old_position": ["tp2a", LOC], "new_position": ["tp2b", LOC], "tokens": tokens})
    wall = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["status"] == "done", st
    assert st["bytes"] == sum(len(b) for b in before.values())
    # Rank r's shard is at rank r of the destination, byte for byte; the source has none left.
    for (rank, key), data in before.items():
        assert fleet.rank_get("tp2b", rank, f"/chunks/{key}").content == data
        assert fleet.rank_get("tp2a", rank, f"/chunks/{key}").status_code == 404
    assert lookup(fleet.http, tokens) == {"tp2b": N}
    hits = dst.serve_and_check(tokens, tokens, reference["choices"][0]["text"])
    print(f"\n[tp2 move] {N} tokens, {len(keys)} chunks x 2 ranks, {st['bytes']} bytes in "
          f"{st['elapsed_s'] * 1e3:.1f} ms (POST to done {wall * 1e3:.1f} ms); destination hits "
          f"{hits:.0f}, same output")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("src_id, dst_id", [("tp2a", "one32"), ("one32", "tp2b")],
                         ids=["TP2-block128 to TP1-block32", "TP1-block32 to TP2-block128"])
def test_a_move_that_converts_passes_the_same_proof(fleet, src_id, dst_id):
    src, dst = fleet.engines[src_id], fleet.engines[dst_id]
    listed = fleet.instances()
    blocks = (listed[src_id]["layout"]["block_size"], listed[dst_id]["layout"]["block_size"])
    worlds = (listed[src_id]["world_size"], listed[dst_id]["world_size"])
    assert blocks in ((128, 32), (32, 128)) and sorted(worlds) == [1, 2], (blocks, worlds)
    rng = random.Random({"tp2a": 41, "one32": 43}[src_id])
    tokens = [rng.randrange(3, 4000) for _ in range(N)]
    reference = src.complete(tokens)
    assert wait_lookup(fleet.http, tokens, {src_id: N}, timeout=30) == {src_id: N}
    r = fleet.http.post("/move", params={"wait": 60}, json={
        "old_position": [src_id, LOC], "new_position": [dst_id, LOC], "tokens": tokens})
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["status"] == "done", st
    assert lookup(fleet.http, tokens) == {dst_id: N}
    hits = dst.serve_and_check(tokens, tokens, reference["choices"][0]["text"])
    print(f"\n[convert {src_id} -> {dst_id}] TP {worlds[0]} -> {worlds[1]}, blocks {blocks[0]} -> "
          f"{blocks[1]}: {N} tokens, {st['bytes']} bytes read in {st['elapsed_s'] * 1e3:.1f} ms; "
          f"destination hits {hits:.0f}, same output")
