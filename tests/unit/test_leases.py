"""The sidecar's LeaseTable: holds that end with their lease, by expiry, or even before they
began."""

from __future__ import annotations

from sidecar.agent.commands import LeaseTable
from tests.harness.stores import put_chunk, tiny_layout
from vllm_kvmove.store import ChunkStore


def key(i: int) -> bytes:
    return bytes([i]) * 16


def make_store(layout, slots: int) -> ChunkStore:
    return ChunkStore(layout, slots * layout.chunk_bytes)


def test_a_lease_ended_before_it_began_is_released_when_it_begins():
    """The controller ends the lease of a fetch it gave up on; the fetch completes later, here:
    its holds go at once (a tombstone waited for it), nothing stays held."""
    store = make_store(tiny_layout(), 4)
    put_chunk(store, key(1), 32, 1)
    leases = LeaseTable(store)
    assert leases.end(7, delete=False) == 0  # not begun: a tombstone
    store.hold([key(1)])
    assert leases.add(7, [key(1)], lease_s=60) is False
    assert store.stats()["held_chunks"] == 0 and len(leases) == 0
    store.hold([key(1)])
    assert leases.add(8, [key(1)], lease_s=60) is True  # another lease: kept
    assert leases.end(8, delete=False) == 1 and store.stats()["held_chunks"] == 0


def test_expired_leases_release_their_holds_and_a_new_controller_ends_them_all():
    store = make_store(tiny_layout(), 4)
    for i in (1, 2, 3):
        put_chunk(store, key(i), 32, i)
    leases = LeaseTable(store)
    store.hold([key(1)])
    leases.add(1, [key(1)], lease_s=0.0)
    store.hold([key(2), key(3)])
    leases.add(2, [key(2), key(3)], lease_s=60)
    assert leases.expire() == 1 and store.stats()["held_chunks"] == 2
    assert leases.end_all("controller restarted") == 1 and store.stats()["held_chunks"] == 0
