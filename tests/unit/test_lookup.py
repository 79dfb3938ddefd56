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
