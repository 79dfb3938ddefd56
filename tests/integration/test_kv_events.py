"""The host tier's KV events on the sidecars' own PUB sockets (``kv_events_port``), with real
sidecars and NIXL (no vLLM engine: tests/e2e_kv_events has those), decoded with vLLM's own
``KVEventBatch`` decoder: a move names the moved blocks at the destination (``BlockStored``,
``medium="CPU"``, the engine's hash chain, the blocks' tokens) and at the source
(``BlockRemoved``) as it happens — no engine step needed — and a clear removes them."""

from __future__ import annotations

import pytest

from tests.harness.api import LOC
from tests.harness.kvevents import KVEventSubscriber
from tests.harness.processes import free_port
from tests.harness.stores import fill_named
from vllm_kvmove.blockhash import BlockHasher, external

HASHER = BlockHasher("sha256", "vllm-none-hash", 16)  # the tiny layout's 16-token blocks


@pytest.fixture(scope="module")
def pair(fleet):
    ports = {iid: free_port() for iid in ("ev-src", "ev-dst")}
    return {iid: fleet.add_sidecar(iid, block_hasher=HASHER, config={"kv_events_port": port})
            for iid, port in ports.items()}, ports


def subscriber(port: int) -> KVEventSubscriber:
    return KVEventSubscriber(f"tcp://127.0.0.1:{port}", b"kv@")


def at_least(n: int):
    return lambda events: len(events) >= n


def test_a_move_is_published_at_both_ends_as_it_happens(fleet, pair):
    sidecars, ports = pair
    tokens = list(range(7000, 7000 + 72))  # 2 full chunks (4 blocks) + 8 tokens (no block)
    subs = {iid: subscriber(port) for iid, port in ports.items()}
    try:
        named = fill_named(sidecars["ev-src"], tokens, HASHER)
        stored_at_src = subs["ev-src"].events(at_least(2))
        assert [e.medium for e in stored_at_src] == ["CPU", "CPU"]
        chain = [external(h) for h in HASHER.chain(tokens)]
        assert len(chain) == 4 and [h for e in stored_at_src for h in e.block_hashes] == chain
        fleet.wait_lookup(tokens, {"ev-src": 72})
        r = fleet.http.post("/move", params={"wait": 30}, json={
            "old_position": ["ev-src", LOC], "new_position": ["ev-dst", LOC], "tokens": tokens})
        assert r.json()["status"] == "done", r.text
        stored = subs["ev-dst"].events(at_least(2))
        assert [type(e).__name__ for e in stored] == ["BlockStored", "BlockStored"]
        assert [h for e in stored for h in e.block_hashes] == chain
        assert stored[0].parent_block_hash is None and stored[1].parent_block_hash == chain[1]
        assert stored[0].token_ids == tokens[:32] and stored[1].token_ids == tokens[32:64]
        assert {(e.block_size, e.medium, e.lora_id) for e in stored} == {(16, "CPU", None)}
        removed = subs["ev-src"].events(at_least(2))
        assert [type(e).__name__ for e in removed] == ["BlockRemoved", "BlockRemoved"]
        assert [h for e in removed for h in e.block_hashes] == chain
        assert named[2].hashes == ()  # the 8-token tail names no block: no event
        # A clear at the destination removes them there.
        assert fleet.http.post("/clear", json={"instance_id": "ev-dst"}).status_code == 200
        cleared = subs["ev-dst"].events(at_least(2))
        assert sorted(h for e in cleared for h in e.block_hashes) == sorted(chain)
        assert {type(e).__name__ for e in cleared} == {"BlockRemoved"}
        for sub in subs.values():  # vLLM's framing: batches numbered from 1, no gap
            assert sub.seqs == list(range(1, len(sub.seqs) + 1))
    finally:
        for s in subs.values():
            s.close()


def test_an_engine_that_does_not_name_its_blocks_publishes_nothing(fleet, pair):
    """A sidecar started without the engine's block hashing (its connector's KV events off,
    or hashes that cannot be reproduced) registers none: a move into it names no blocks, and
    its socket stays silent rather than publish blocks under wrong names."""
    port = free_port()
    fleet.add_sidecar("ev-plain", config={"kv_events_port": port})
    sub = subscriber(port)
    try:
        tokens = list(range(9000, 9000 + 32))
        fill_named(pair[0]["ev-src"], tokens, HASHER)
        fleet.wait_lookup(tokens, {"ev-src": 32})
        r = fleet.http.post("/move", params={"wait": 30}, json={
            "old_position": ["ev-src", LOC], "new_position": ["ev-plain", LOC],
            "tokens": tokens})
        assert r.json()["status"] == "done"
        assert fleet.wait_lookup(tokens, {"ev-plain": 32})
        assert sub.events(at_least(1), timeout=1.0) == []
    finally:
        sub.close()
