"""Promise 9: each chunk carries a checksum verified at the destination before the chunk becomes
visible; a corrupted chunk fails the move and leaves the destination unchanged."""

from __future__ import annotations

import pytest

from sidecar.agent.fetch import PIECE_BYTES
from tests.harness.api import LOC
from tests.harness.stores import fill
from vllm_kvmove.transfer import ReadRange, split_ranges

# "small": 4 chunks of the tiny test layout, read and hashed in one piece. "pieces": 4 chunks
# of 12 MiB (12 layers x 8 KV heads x 128, 256-token chunks; the last one partial, 6 MiB), so
# the destination reads and hashes the 42 MiB batch over NIXL in PIECE_BYTES (32 MiB) pieces,
# and the victim chunk (bytes 24-36 MiB) straddles two of them.
LAYOUTS = {"small": ({}, 100, 32),
           "pieces": (dict(num_layers=12, num_kv_heads=8, head_size=128, block_size=128,
                           chunk_size=256), 3 * 256 + 100, 256)}


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_corrupted_chunk_fails_the_move_and_changes_nothing(fleet, case):
    layout, n, chunk = LAYOUTS[case]
    src = fleet.add_sidecar(f"integ-src-{case}", slots=8, **layout)
    dst = fleet.add_sidecar(f"integ-dst-{case}", slots=8, **layout)
    tokens = list(range(200, 200 + n))  # 4 chunks, the last one partial
    keys = list(fill(src, tokens, seed=3))
    assert len(keys) == 4 and src.layout.chunk_size == chunk
    fleet.wait_lookup(tokens, {f"integ-src-{case}": n})
    infos = src.store.hold(keys)  # checksums are computed and cached at the first hold...
    src.store.release(keys)
    victim = infos[2]
    # What the destination reads: the chunks back to back, cut into verification pieces.
    pieces = split_ranges([ReadRange(0, 0, i.nbytes) for i in infos], PIECE_BYTES)
    straddles = sum(any(i == 2 for i, _ in piece) for piece in pieces) == 2
    assert straddles == (case == "pieces"), [[(i, r.nbytes) for i, r in p] for p in pieces]
    src.store.pool[victim.offset + victim.nbytes - 1] ^= 0x01  # ...then one bit flips
    before = dst.store.snapshot()
    r = fleet.http.post("/move", json={"old_position": [f"integ-src-{case}", LOC],
                                       "new_position": [f"integ-dst-{case}", LOC], "tokens": tokens})
    st = fleet.wait_job(r.json()["event_id"])
    assert st["status"] == "failed" and st["error_kind"] == "integrity"
    assert victim.key.hex() in st["error"] and "checksum" in st["error"]
    assert dst.store.snapshot() == before  # not one chunk of the batch became visible
    assert all(src.store.contains(k) for k in keys)  # the source keeps everything
    assert src.store.stats()["held_chunks"] == 0 and dst.store.stats()["writing_chunks"] == 0
    assert dst.store.stats()["free_slots"] == dst.store.num_slots
    # Mended, the same move goes through: the pieces' hashes add up to the whole's.
    src.store.pool[victim.offset + victim.nbytes - 1] ^= 0x01
    r = fleet.http.post("/move", json={"old_position": [f"integ-src-{case}", LOC],
                                       "new_position": [f"integ-dst-{case}", LOC], "tokens": tokens,
                                       "copy": True})
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
    expect = {f"integ-src-{case}": n, f"integ-dst-{case}": n}
    assert fleet.wait_lookup(tokens, expect) == expect
    assert dst.counters.same_host_fetches == 0  # over NIXL: the pipelined, pieced path
