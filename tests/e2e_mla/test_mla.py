"""Engines of a multi-head latent attention model (a small random-init DeepSeek-V2:
``examples/make_model.py --arch mla``; vLLM's CPU MLA backend, one 576-element latent vector
per token and layer) with the connector, and a controller. Shown with the engines' own word:

* a prompt served once is served again from the store after vLLM's own prefix cache is reset
  (``vllm:external_prefix_cache_hits`` up by N-1, the same greedy output);
* the seed flow between two MLA engines: the chunks moved byte for byte, the source without
  them, the destination served from the moved KV (hits >= N-1, the source's greedy output);
* an MLA engine with ``--tensor-parallel-size 2`` keeps one store (every rank caches the same
  latent vectors): rank 0 saves, registers as the engine's one store and is moved from and
  to; rank 1 loads from rank 0's pool — served again from it after a prefix-cache reset, and
  moves between it and a TP=1 MLA engine both ways, with the destination's own word.

Its own package: its engines start after the other packages' engines stopped (memory)."""

from __future__ import annotations

import random

import pytest

from tests.harness.api import LOC, wait_lookup
from tests.harness.engines import ConnectorFleet, chunk_keys, model_dir

N = 700


# A controller and three MLA engines: ``m1`` (core 0), ``m2`` (core 1), and ``tp2`` with
# ``--tensor-parallel-size 2`` (rank r on core r).
ENGINES = {"m1": ("0", [], {}), "m2": ("1", [], {}),
           "tp2": ("0|1", ["--tensor-parallel-size", "2"], {})}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with ConnectorFleet.running(model_dir("tiny-mla", arch="mla"),
                                tmp_path_factory.mktemp("mla"), ENGINES) as f:
        yield f


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4000) for _ in range(N)]


def test_an_mla_engine_registers_its_latent_layout(fleet):
    listed = fleet.instances()
    assert set(listed) == set(ENGINES)
    for i in listed.values():
        layout = i["layout"]
        assert (layout["kind"], layout["backend"], layout["num_kv_heads"],
                layout["total_kv_heads"], layout["head_size"]) == ("mla", "cpu_mla", 1, 1, 576)


def served_again_from_the_store(fleet, iid: str, seed: int) -> None:
    """Engine ``iid`` computes a prompt, stores it, and after its own prefix cache is reset
    serves it from the store: N-1 external hits, the same greedy output."""
    engine, tokens = fleet.engines[iid], prompt(seed)
    reference = engine.complete(tokens, max_tokens=8)
    assert wait_lookup(fleet.http, tokens, {iid: N}, timeout=30) == {iid: N}
    out, hits = engine.complete_from_store(tokens, max_tokens=8)
    assert hits == N - 1
    assert out["choices"][0]["text"] == reference["choices"][0]["text"]


@pytest.mark.timeout(600)
def test_an_mla_prompt_is_served_again_from_the_store(fleet):
    served_again_from_the_store(fleet, "m1", 41)


@pytest.mark.timeout(600)
def test_the_seed_flow_between_two_mla_engines(fleet):
    src, dst = fleet.engines["m1"], fleet.engines["m2"]
    tokens = prompt(43)
    reference = src.complete(tokens)
    assert wait_lookup(fleet.http, tokens, {"m1": N}, timeout=30) == {"m1": N}
    keys = chunk_keys(fleet.http, tokens, "m1")
    before = {k: src.chunk_bytes(k) for k in keys}
    assert all(before.values())
    r = fleet.http.post("/move", params={"wait": 60}, json={
        "old_position": ["m1", LOC], "new_position": ["m2", LOC], "tokens": tokens})
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["status"] == "done", st
    assert st["bytes"] == sum(len(b) for b in before.values())
    assert {k: dst.chunk_bytes(k) for k in keys} == before
    assert all(src.chunk_bytes(k) is None for k in keys)
    dst.serve_and_check(tokens, tokens, reference["choices"][0]["text"])


def test_a_tensor_parallel_mla_engine_is_one_store_that_every_rank_loads_from(fleet):
    """tp2 registers once, as one rank (its one store: rank 0's); rank 1 started no store or
    sidecar and loads from rank 0's; served again from that store after a prefix-cache reset
    (hits N-1, the same greedy output: rank 1's heads read the latent vectors it loaded)."""
    listed = fleet.instances()
    assert listed["tp2"]["world_size"] == 1 and len(listed["tp2"]["ranks"]) == 1
    log = fleet.engines["tp2"].proc.log_path.read_text(errors="replace")
    assert log.count("kvmove (rank 1 of 2, MLA): loads from rank 0's store") == 1
    assert log.count("kvmove store (rank 0 of 2)") == 1 and "kvmove store (rank 1" not in log
    served_again_from_the_store(fleet, "tp2", 47)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("src, dst, twin", [("m1", "tp2", "m1"), ("tp2", "m2", "m1")])
def test_moves_between_a_tensor_parallel_mla_engine_and_a_single_rank_one(fleet, src, dst, twin):
    """Both ways, the seed flow's proof: one copy of the chunks moved (the single store's
    bytes), byte for byte, the destination served from them (hits >= N-1) with the greedy
    output of ``twin`` — an engine of the destination's tensor parallelism that computed the
    prompt itself: a TP=2 engine's greedy output may differ from a TP=1 engine's on the same
    prompt and KV (its sums run in another order: seen here, "FIobj..." against "FIling..."
    from scratch, and the TP=1 engine served from the TP=2 engine's moved KV gave "FIling...",
    its own). Into tp2 the twin is the source itself, m1, whose output tp2 reproduces for
    this prompt (tp2 has no TP=2 twin here)."""
    source, dest = fleet.engines[src], fleet.engines[dst]
    tokens = prompt(53 if src == "m1" else 59)
    source.complete(tokens)
    reference = fleet.engines[twin].complete(tokens)
    held = {src: N, twin: N}  # the twin stored what it computed
    assert wait_lookup(fleet.http, tokens, held, timeout=30) == held
    keys = chunk_keys(fleet.http, tokens, src)
    before = {k: source.chunk_bytes(k) for k in keys}
    r = fleet.http.post("/move", params={"wait": 60}, json={
        "old_position": [src, LOC], "new_position": [dst, LOC], "tokens": tokens})
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["status"] == "done", st
    assert st["bytes"] == sum(len(b) for b in before.values())
    assert {k: dest.chunk_bytes(k) for k in keys} == before
    dest.serve_and_check(tokens, tokens, reference["choices"][0]["text"])
