"""The scheduler's lookup across a tensor-parallel engine's ranks: one server per rank's
store; the answer is the prefix every rank holds, a rank that does not answer counts as
holding nothing (a miss, never a wrong hit), and a lone client answers as before."""

from __future__ import annotations

import time
import uuid

from tests.harness.stores import fill_synthetic, tiny_layout
from vllm_kvmove.hashing import chunk_spans
from vllm_kvmove.lookup import LookupClient, LookupServer, lookup_path, match_prefix_everywhere
from vllm_kvmove.store import ChunkStore

LAYOUT = tiny_layout()
TOKENS = list(range(100, 100 + 4 * LAYOUT.chunk_size))


def test_the_prefix_every_rank_holds_and_a_silent_rank_is_a_miss():
    iid = f"lk-{uuid.uuid4().hex[:8]}"
    keys = [s.key for s in chunk_spans(TOKENS, LAYOUT.chunk_size, LAYOUT.fingerprint())]
    stores = [ChunkStore(LAYOUT, 1 << 20) for _ in range(2)]
    fill_synthetic(stores[0], LAYOUT.fingerprint(), 1, TOKENS)  # rank 0: all four chunks
    fill_synthetic(stores[1], LAYOUT.fingerprint(), 2, TOKENS[:2 * LAYOUT.chunk_size])  # two
    servers = [LookupServer(s, lookup_path(iid, r)) for r, s in enumerate(stores)]
    clients = [LookupClient(lookup_path(iid, r), timeout_ms=300) for r in range(3)]
    try:
        assert clients[0].match_prefix(keys) == 4
        assert clients[1].match_prefix(keys) == 2
        assert match_prefix_everywhere(clients[:2], keys) == 2
        assert match_prefix_everywhere(clients[:2], keys[:1]) == 1
        assert match_prefix_everywhere(clients[:2], []) == 0
        t0 = time.monotonic()
        assert match_prefix_everywhere(clients, keys) == 0  # rank 2 has no server
        assert time.monotonic() - t0 < 1.0  # one timeout, not one per rank
        assert match_prefix_everywhere(clients[:2], keys) == 2  # the others still answer
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.close()


# -- an MLA engine's other ranks: holds and reads of rank 0's store -------------------------
import multiprocessing  # noqa: E402

import pytest  # noqa: E402

from tests.harness.stores import synthetic_chunk  # noqa: E402
from vllm_kvmove.lookup import Hold, Release, RankZeroStore  # noqa: E402


def test_holds_are_kept_per_rank_and_a_release_of_what_a_rank_does_not_hold_is_ignored():
    iid = f"lk-{uuid.uuid4().hex[:8]}"
    store = ChunkStore(LAYOUT, 1 << 20)
    keys = fill_synthetic(store, LAYOUT.fingerprint(), 1, TOKENS)
    server = LookupServer(store, lookup_path(iid))
    client = LookupClient(lookup_path(iid), timeout_ms=1000)
    try:
        slots = client.ask(Hold(keys[:2] + [b"x" * 16], rank=1), list[int], None)
        assert slots[2] == -1 and all(0 <= s < store.num_slots for s in slots[:2])
        assert store.stats()["held_chunks"] == 2
        client.ask(Release(keys[:2], rank=2), int, None)  # rank 2 holds nothing: ignored
        client.ask(Release(keys[2:], rank=1), int, None)  # keys rank 1 does not hold
        assert store.stats()["held_chunks"] == 2
        client.ask(Release(keys[:1] * 3, rank=1), int, None)  # named thrice, held once
        assert store.stats()["held_chunks"] == 1
        client.ask(Release(keys[:2], rank=1), int, None)
        client.ask(Release(keys[:2], rank=1), int, None)  # twice: the second is ignored
        assert store.stats()["held_chunks"] == 0
        assert store.delete(keys[:1]) == 1  # not held any more: deleted at once
        assert client.match_prefix(keys) == 0
    finally:
        client.close()
        server.close()


def _rank0(endpoint: str, conn) -> None:
    """Rank 0's worker: a shared store with TOKENS' chunks, its lookup server, until told."""
    store = ChunkStore(LAYOUT, 1 << 20, shared=True)
    keys = fill_synthetic(store, LAYOUT.fingerprint(), 7, TOKENS)
    server = LookupServer(store, endpoint)
    conn.send(keys)
    while (msg := conn.recv()) != "stop":
        conn.send(store.stats()[msg])
    server.close()


@pytest.mark.timeout(60)
def test_another_rank_reads_rank_zeros_chunks_from_its_mapped_pool_while_holding_them():
    endpoint = lookup_path(f"lk-{uuid.uuid4().hex[:8]}")
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_rank0, args=(endpoint, child), daemon=True)
    proc.start()
    replica = None
    try:
        keys = parent.recv()
        replica = RankZeroStore(endpoint, 1, LAYOUT, wait_s=20)
        slots = replica.hold(keys)
        parent.send("held_chunks")
        assert parent.recv() == len(keys) and None not in slots
        bpc = LAYOUT.blocks_per_chunk
        for i, (key, slot) in enumerate(zip(keys, slots)):
            want = synthetic_chunk(LAYOUT, LAYOUT.chunk_size, 7 + i).view(
                bpc, LAYOUT.num_layers, LAYOUT.block_slab_bytes)
            for li in range(LAYOUT.num_layers):
                got = replica.layer_rows(li)[slot * bpc:(slot + 1) * bpc].tolist()
                assert got == want[:, li].tolist()
        replica.release(keys)
        parent.send("held_chunks")
        assert parent.recv() == 0
        assert replica.hold([b"y" * 16]) == [None]
    finally:
        if replica is not None:
            replica.close()
        parent.send("stop")
        proc.join(10)
