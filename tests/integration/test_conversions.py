"""Moves between compatible engines of different formats, with real sidecars and real NIXL (no
vLLM): a TP=2 engine with 16-token blocks and TP=1 and TP=2 engines with 32-token blocks,
all in the CPU backend's ``amx`` packing. Each store holds what vLLM's kernel would have
written for the same K and V (:func:`tests.harness.stores.packed_chunk`); after a move, every
destination rank holds exactly its own format's bytes — heads joined or split, blocks
regrouped — and what a conversion produced moves on again (its checksum computed here)."""

from __future__ import annotations

import pytest
import torch

from tests.harness.api import LOC
from tests.harness.stores import chunk_bytes, keys_of, packed_chunk, put_bytes
from vllm_kvmove.hashing import chunk_spans

HEADS = 2  # the model's KV heads
AMX = dict(backend="cpu_attn/amx", head_size=16, total_kv_heads=HEADS)


@pytest.fixture(scope="module")
def engines(fleet):
    """``tp2`` (TP=2, 16-token blocks), ``one`` (TP=1, 32-token blocks) and ``tp2b`` (TP=2,
    32-token blocks), in-process sidecars of one model."""
    out = {"tp2": [fleet.add_sidecar("tp2", rank=r, world_size=2, wait=r == 1, block_size=16,
                                     num_kv_heads=1, **AMX) for r in (0, 1)],
           "one": [fleet.add_sidecar("one", block_size=32, num_kv_heads=2, **AMX)],
           "tp2b": [fleet.add_sidecar("tp2b", rank=r, world_size=2, wait=r == 1, block_size=32,
                                      num_kv_heads=1, **AMX) for r in (0, 1)]}
    assert len({sc.fingerprint for scs in out.values() for sc in scs}) == 1  # compatible
    return out


def canonical(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, HEADS, n, 16)  # the tiny layout's 2 layers
    return (torch.randint(-2**15, 2**15, shape, dtype=torch.int16, generator=g),
            torch.randint(-2**15, 2**15, shape, dtype=torch.int16, generator=g))


def expected(sidecars, k, v, tokens) -> dict[tuple[int, bytes], bytes]:
    """What each rank of an engine holds for ``tokens``: ``{(rank, key): bytes}``."""
    out = {}
    for rank, sc in enumerate(sidecars):
        for s in chunk_spans(tokens, sc.layout.chunk_size, sc.fingerprint):
            out[rank, s.key] = packed_chunk(sc.layout, len(sidecars), rank, k, v, s.start,
                                            s.num_tokens).numpy().tobytes()
    return out


def seed(sidecars, k, v, tokens) -> None:
    for rank, sc in enumerate(sidecars):
        for s in chunk_spans(tokens, sc.layout.chunk_size, sc.fingerprint):
            put_bytes(sc.store, s.key, s.num_tokens,
                      packed_chunk(sc.layout, len(sidecars), rank, k, v, s.start, s.num_tokens))


def move(fleet, src: str, dst: str, tokens, copy: bool = False) -> dict:
    r = fleet.http.post("/move", params={"wait": 30}, json={
        "old_position": [src, LOC], "new_position": [dst, LOC], "tokens": tokens, "copy": copy})
    assert r.status_code == 200, r.text
    return r.json()


def test_tp2_to_tp1_joins_heads_and_regroups_blocks(fleet, engines):
    tokens = list(range(100, 100 + 72))  # two full 32-token chunks and an 8-token tail
    k, v = canonical(len(tokens), seed=1)
    seed(engines["tp2"], k, v, tokens)
    fleet.wait_lookup(tokens, {"tp2": 72})
    st = move(fleet, "tp2", "one", tokens)
    assert st["status"] == "done", st
    for (rank, key), data in expected(engines["one"], k, v, tokens).items():
        assert chunk_bytes(engines["one"][rank], key) == data
    for sc in engines["tp2"]:
        assert not any(sc.store.contains(key) for key in keys_of(sc, tokens))
    assert fleet.wait_lookup(tokens, {"one": 72}) == {"one": 72}
    # Each rank's shard read whole: bytes moved = both source shards.
    assert st["bytes"] == st["total_bytes"] == sum(
        sc.layout.valid_bytes(s.num_tokens) for sc in engines["tp2"]
        for s in chunk_spans(tokens, 32, sc.fingerprint))


def test_tp1_to_tp2_splits_heads_and_a_converted_chunk_moves_on(fleet, engines):
    tokens = list(range(100, 100 + 72))  # what the test above moved to "one"
    fleet.wait_lookup(tokens, {"one": 72})
    k, v = canonical(len(tokens), seed=1)
    st = move(fleet, "one", "tp2", tokens, copy=True)  # back to 16-token blocks, split
    assert st["status"] == "done", st
    for (rank, key), data in expected(engines["tp2"], k, v, tokens).items():
        assert chunk_bytes(engines["tp2"][rank], key) == data
    st = move(fleet, "tp2", "tp2b", tokens)  # converted chunks, converted again (blocks 16 -> 32)
    assert st["status"] == "done", st
    for (rank, key), data in expected(engines["tp2b"], k, v, tokens).items():
        assert chunk_bytes(engines["tp2b"][rank], key) == data
    assert fleet.wait_lookup(tokens, {"one": 72, "tp2b": 72}) == {"one": 72, "tp2b": 72}
    for scs in engines.values():
        for sc in scs:
            assert sc.store.stats()["held_chunks"] == 0


def test_an_engine_whose_heads_do_not_split_is_refused_naming_why(fleet, engines):
    # Two ranks claiming the model's two heads each: no conversion can fill them.
    bad = [fleet.add_sidecar("bad-split", rank=r, world_size=2, wait=r == 1, block_size=32,
                             num_kv_heads=2, **AMX) for r in (0, 1)]
    tokens = list(range(100, 100 + 72))
    before = [sc.store.snapshot() for sc in bad + engines["one"]]
    r = fleet.http.post("/move", json={"old_position": ["one", LOC],
                                       "new_position": ["bad-split", LOC], "tokens": tokens})
    assert r.status_code == 409 and r.json()["error"]["kind"] == "incompatible", r.text
    message = r.json()["error"]["message"]
    assert "tensor_parallel_size: 1 != 2" in message and "does not split 2 heads over 2" in message
    assert [sc.store.snapshot() for sc in bad + engines["one"]] == before
    for sc in bad:
        sc.stop()
