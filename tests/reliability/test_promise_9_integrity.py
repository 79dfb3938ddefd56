"""Promise 9: each chunk carries a checksum verified at the destination before the chunk becomes
visible; a corrupted chunk fails the move and leaves the destination unchanged."""

from __future__ import annotations

from tests.integration.test_controller_sidecars import LOC, fill


def test_corrupted_chunk_fails_the_move_and_changes_nothing(fleet):
    src, dst = fleet.add_sidecar("integ-src"), fleet.add_sidecar("integ-dst")
    tokens = list(range(200, 300))  # 4 chunks, the last one partial
    keys = list(fill(src, tokens, seed=3))
    fleet.wait_lookup(tokens, {"integ-src": 100})
    infos = src.store.pin(keys)  # checksums are computed and cached at the first pin...
    src.store.unpin(keys)
    victim = infos[2]
    src.store.pool[victim.offset + victim.nbytes // 2] ^= 0x01  # ...then one bit flips
    before = dst.store.snapshot()
    r = fleet.http.post("/move", json={"old_position": ["integ-src", LOC],
                                       "new_position": ["integ-dst", LOC], "tokens": tokens})
    st = fleet.wait_job(r.json()["event_id"])
    assert st["status"] == "failed" and st["error_kind"] == "integrity"
    assert victim.key.hex() in st["error"] and "checksum" in st["error"]
    assert dst.store.snapshot() == before  # not one chunk of the batch became visible
    assert all(src.store.contains(k) for k in keys)  # the source keeps everything
    assert src.store.stats()["pinned_chunks"] == 0 and dst.store.stats()["writing_chunks"] == 0
    assert dst.store.stats()["free_slots"] == dst.store.num_slots
