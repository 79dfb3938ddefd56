import pytest

from tests.harness.stores import put_chunk
from vllm_kvmove.store import ChunkBusy, ChunkMissing, ChunkStore, StoreFull


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def make_store(layout, slots: int) -> ChunkStore:
    return ChunkStore(layout, slots * layout.chunk_bytes)


def test_pool_is_one_region_of_whole_slots(layout):
    store = ChunkStore(layout, 3 * layout.chunk_bytes + 5)
    assert store.num_slots == 3
    assert store.pool_bytes == 3 * layout.chunk_bytes


@pytest.mark.parametrize("shared", [False, True])
def test_chunks_reserved_one_after_another_get_adjacent_slots_even_after_a_clear(layout, shared):
    # Adjacent slots let a same-host peer copy a run of chunks as one big memcpy.
    store = ChunkStore(layout, 8 * layout.chunk_bytes, shared=shared)
    assert (store.shared_pool is not None) == shared
    for i in (5, 1, 7, 0, 3):
        put_chunk(store, key(i), 32, i)
    store.delete([key(7), key(0), key(3)])
    store.delete([key(5)])
    assert [store.reserve(key(100 + i), 32) for i in range(5)] == [0, 2, 3, 4, 5]


def test_reserved_chunk_is_invisible_until_commit(layout):
    store = make_store(layout, 2)
    assert store.reserve(key(1), 32) is not None
    assert store.match_prefix([key(1)]) == 0
    with pytest.raises(ChunkMissing):
        store.hold([key(1)])
    assert store.snapshot() == (0, [])
    store.commit(key(1))
    assert store.match_prefix([key(1)]) == 1
    assert store.snapshot() == (1, [(key(1), 32)])


def test_abort_frees_the_slot_without_events(layout):
    store = make_store(layout, 1)
    store.reserve(key(1), 32)
    store.abort(key(1))
    assert store.stats()["free_slots"] == 1
    assert store.drain_events() == []


def test_reserve_of_a_key_in_the_store_returns_none_and_may_hold_it(layout):
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 0)
    assert store.reserve(key(1), 32) is None
    assert store.stats()["held_chunks"] == 0
    assert store.reserve(key(1), 32, hold=True) is None
    assert store.stats()["held_chunks"] == 1
    put_chunk(store, key(2), 32, 2)
    put_chunk(store, key(3), 32, 3)  # evicts key(2): key(1) is older, but held
    assert store.contains(key(1)) and not store.contains(key(2))
    store.release([key(1)])
    assert store.stats()["held_chunks"] == 0


def test_a_reservation_never_counts_as_held_and_a_second_writer_is_refused(layout):
    """A chunk another writer reserved but has not written is not in the store: reserving it
    again raises ChunkBusy (answering None would tell a fetch it is already there, and a move
    would then delete its source while the first writer may still abort)."""
    store = make_store(layout, 3)
    assert store.reserve(key(1), 32) is not None
    with pytest.raises(ChunkBusy):
        store.reserve(key(1), 32)
    store.abort(key(1))
    assert store.reserve(key(1), 32) is not None  # free again once the first writer gave up
    store.commit(key(1), hold=True)  # committed and held at once
    assert store.stats()["held_chunks"] == 1
    assert store.delete([key(1)]) == 1  # deleted while held: invisible, awaiting its release
    with pytest.raises(ChunkBusy):
        store.reserve(key(1), 32)
    store.release([key(1)])
    assert store.reserve(key(1), 32) is not None


def test_match_prefix_stops_at_first_gap(layout):
    store = make_store(layout, 4)
    put_chunk(store, key(1), 32, 0)
    put_chunk(store, key(3), 32, 0)
    assert store.match_prefix([key(1), key(2), key(3)]) == 1


def test_lru_eviction_skips_held_chunks(layout):
    store = make_store(layout, 3)
    for i in (1, 2, 3):
        put_chunk(store, key(i), 32, i)
    store.hold([key(1)])  # oldest, but held
    put_chunk(store, key(4), 32, 4)  # evicts key(2), the oldest not held
    held = {k for k, _ in store.snapshot()[1]}
    assert held == {key(1), key(3), key(4)}
    assert store.evictions == 1


def test_lru_eviction_skips_pinned_chunks_until_unpinned_and_delete_removes_them(layout):
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 1)
    put_chunk(store, key(2), 32, 2)
    assert store.set_pinned([key(1), key(9)]) == 1  # an operator's pin; unknown keys ignored
    assert store.stats()["pinned_chunks"] == 1 and store.stats()["available_slots"] == 1
    put_chunk(store, key(3), 32, 3)  # evicts key(2): key(1) is older, but pinned
    assert {k for k, _ in store.snapshot()[1]} == {key(1), key(3)}
    store.hold([key(3)])
    with pytest.raises(StoreFull):
        store.reserve(key(4), 32)  # one chunk pinned, the other held
    assert store.set_pinned([key(1)], False) == 1
    assert store.reserve(key(4), 32) is not None  # unpinned: evictable again
    store.abort(key(4))
    store.set_pinned([key(3)])
    assert store.delete([key(3)]) == 1  # an explicit delete removes a pinned chunk too
    store.release([key(3)])
    assert store.stats()["pinned_chunks"] == 0 and not store.contains(key(3))


def test_touch_on_reserve_hit_refreshes_lru(layout):
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 1)
    put_chunk(store, key(2), 32, 2)
    assert store.reserve(key(1), 32) is None  # a save of a held chunk refreshes it
    put_chunk(store, key(3), 32, 3)
    assert {k for k, _ in store.snapshot()[1]} == {key(1), key(3)}


def test_eviction_takes_a_prompt_from_its_end(layout):
    """A prompt's chunks saved in order (each naming the one before it) are evicted tail
    first: what stays is a usable prefix, not a tail whose head is gone. Using a tail chunk
    (a load, a save hitting it) uses its head too; parent links that loop end the walk."""
    store = make_store(layout, 5)
    prompt = [key(i) for i in range(4)]
    for i, k in enumerate(prompt):
        put_chunk(store, k, 32, i, parent=prompt[i - 1] if i else None)
    put_chunk(store, key(10), 32, 10)  # another prompt, newer
    put_chunk(store, key(11), 32, 11)  # evicts the first prompt's last chunk
    assert store.match_prefix(prompt) == 3 and not store.contains(prompt[3])
    put_chunk(store, key(12), 32, 12)
    assert store.match_prefix(prompt) == 2
    # Loading the prompt's first two chunks (held in prompt order) leaves its head newest.
    store.hold(prompt[:2])
    store.release(prompt[:2])
    put_chunk(store, key(13), 32, 13)  # evicts key(10), the oldest other chunk
    assert store.match_prefix(prompt) == 2 and not store.contains(key(10))
    # A save hitting the second chunk refreshes the first as well.
    put_chunk(store, key(14), 32, 14)  # evicts key(11)
    assert store.reserve(prompt[1], 32) is None
    for i in (15, 16):
        put_chunk(store, key(i), 32, i)  # evict key(12), key(13)
    assert store.match_prefix(prompt) == 2
    # Parents that loop (a hostile peer's links) end the walk.
    a, b = key(20), key(21)
    put_chunk(store, a, 32, 20, parent=b)
    put_chunk(store, b, 32, 21, parent=a)
    store.hold([a, b])
    store.release([a, b])
    assert store.contains(a) and store.contains(b)


def test_store_full_when_everything_is_held(layout):
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 1)
    put_chunk(store, key(2), 32, 2)
    store.hold([key(1), key(2)])
    with pytest.raises(StoreFull):
        store.reserve(key(3), 32)
    store.release([key(1)])
    assert store.reserve(key(3), 32) is not None


def test_hold_is_all_or_nothing(layout):
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 1)
    with pytest.raises(ChunkMissing):
        store.hold([key(1), key(2)])
    assert store.stats()["held_chunks"] == 0


def test_delete_of_held_chunk_is_deferred_to_last_release(layout):
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 1)
    store.hold([key(1)])
    store.hold([key(1)])
    assert store.delete([key(1)]) == 1
    assert store.match_prefix([key(1)]) == 0  # invisible at once
    store.release([key(1)])
    assert store.stats()["free_slots"] == 1  # still held once: slot not reused
    store.release([key(1)])
    assert store.stats()["free_slots"] == 2
    assert store.stats()["held_chunks"] == 0


def test_hold_describes_valid_bytes_and_checksum(layout):
    store = make_store(layout, 2)
    data = put_chunk(store, key(1), 20, 7)  # partial chunk: 2 blocks of 16 tokens
    (info,) = store.hold([key(1)])
    assert info.nbytes == layout.valid_bytes(20) == len(data)
    import xxhash
    assert info.checksum == xxhash.xxh3_64_intdigest(data)
    assert store.pool[info.offset:info.offset + info.nbytes].numpy().tobytes() == data


def test_events_have_consecutive_sequence_numbers(layout):
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 1)
    put_chunk(store, key(2), 32, 2)
    put_chunk(store, key(3), 32, 3)  # evicts key(1)
    store.delete([key(2)])
    events = store.drain_events()
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [(e.kind, e.key) for e in events] == [
        ("admit", key(1)), ("admit", key(2)), ("evict", key(1)), ("admit", key(3)), ("evict", key(2))]
    assert store.drain_events() == []
    assert store.snapshot() == (5, [(key(3), 32)])


def test_clear_removes_everything_and_leaks_nothing(layout):
    store = make_store(layout, 4)
    for i in range(4):
        put_chunk(store, key(i), 32, i)
    store.hold([key(0)])
    assert store.clear() == 4
    store.release([key(0)])
    st = store.stats()
    assert (st["num_chunks"], st["held_chunks"], st["free_slots"]) == (0, 0, 4)


def test_reserve_rejects_bad_token_counts(layout):
    store = make_store(layout, 1)
    for n in (0, 33):
        with pytest.raises(ValueError):
            store.reserve(key(1), n)


def test_fill_checksums_works_the_backlog_off_the_save_path(layout):
    import xxhash
    store = make_store(layout, 4)
    data = {key(i): put_chunk(store, key(i), 32, i) for i in range(3)}
    store.delete([key(1)])
    assert store.fill_checksums() == 2  # the deleted one is skipped
    assert store.fill_checksums() == 0
    infos = store.hold([key(0), key(2)], checksums=False)  # already known: no hashing needed
    assert [i.checksum for i in infos] == [xxhash.xxh3_64_intdigest(data[key(0)]),
                                           xxhash.xxh3_64_intdigest(data[key(2)])]
    assert store.stats()["held_chunks"] == 2


def test_hold_computes_missing_checksums_on_the_executor_and_says_what_it_will_hash(layout):
    import concurrent.futures
    import threading
    import xxhash
    store = make_store(layout, 6)
    data = {key(i): put_chunk(store, key(i), 32 if i < 4 else 20, i) for i in range(5)}
    assert store.fill_checksums(max_chunks=1) == 1  # key(0)'s is known, four are missing
    keys = [key(i) for i in range(5)]
    assert store.unsummed_bytes(keys + [key(9)]) == 3 * layout.valid_bytes(32) + \
        layout.valid_bytes(20)
    on = []

    class Recording(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            def run(*a, **k):
                on.append(threading.current_thread().name)
                return fn(*a, **k)
            return super().submit(run, *args, **kwargs)

    with Recording(2, thread_name_prefix="hash") as pool:
        infos = store.hold(keys, executor=pool)
    assert [i.checksum for i in infos] == [xxhash.xxh3_64_intdigest(data[k]) for k in keys]
    assert len(on) == 4 and all(n.startswith("hash") for n in on)  # only the missing ones
    assert store.unsummed_bytes(keys) == 0  # recorded: a later lease hashes nothing
    assert store.stats()["held_chunks"] == 5


def test_a_hold_whose_hashing_fails_holds_nothing(layout, monkeypatch):
    import vllm_kvmove.store as store_module
    store = make_store(layout, 2)
    put_chunk(store, key(1), 32, 1)
    put_chunk(store, key(2), 32, 2)

    def broken(data):
        raise MemoryError("no")
    monkeypatch.setattr(store_module, "checksum", broken)
    with pytest.raises(MemoryError):
        store.hold([key(1), key(2)])
    assert store.stats()["held_chunks"] == 0


def test_on_events_is_called_after_commit_and_delete(layout):
    store = make_store(layout, 2)
    calls = []
    store.on_events = lambda: calls.append(store.stats()["seq"])
    put_chunk(store, key(1), 32, 1)
    store.delete([key(1)])
    assert calls == [1, 2]


def test_stats_counts_stay_equal_to_a_full_recount_under_random_operations():
    """stats() is kept incrementally; after every operation it must equal a recount."""
    import random

    from tests.harness.stores import tiny_layout
    from vllm_kvmove.store import ChunkStore, StoreError

    def recount(st):
        c = dict(writing=0, chunks=0, tokens=0, held=0, pinned=0, evictable=0)
        for e in st._entries.values():
            if not e.ready:
                c["writing"] += 1
                continue
            if not e.doomed:
                c["chunks"] += 1
                c["tokens"] += e.num_tokens
            c["held"] += bool(e.holds)
            c["pinned"] += e.pinned
            c["evictable"] += not e.holds and not e.pinned
        return c

    rng = random.Random(5)
    layout = tiny_layout()
    st = ChunkStore(layout, 12 * layout.chunk_bytes)
    keys = [bytes([i]) * 16 for i in range(20)]
    holds: list[bytes] = []
    for step in range(3000):
        op, k = rng.randrange(9), rng.choice(keys)
        try:
            if op == 0:
                if st.reserve(k, rng.randint(1, layout.chunk_size)) is not None and rng.random() < 0.8:
                    st.commit(k, None if rng.random() < 0.5 else 7)
            elif op == 1:
                st.abort(k)
            elif op == 2:
                st.hold([k], checksums=rng.random() < 0.5)
                holds.append(k)
            elif op == 3 and holds:
                st.release([holds.pop(rng.randrange(len(holds)))])
            elif op == 4:
                st.set_pinned([k], rng.random() < 0.5)
            elif op == 5:
                st.delete([k])
            elif op == 6:
                st.fill_checksums(3)
            elif op == 7 and rng.random() < 0.05:
                st.clear()
            elif op == 8:
                st.commit(k)
        except (StoreError, ValueError):
            pass
        got, want = st.stats(), recount(st)
        assert (got["writing_chunks"], got["num_chunks"], got["num_tokens"], got["held_chunks"],
                got["pinned_chunks"], got["available_slots"] - got["free_slots"]) == (
            want["writing"], want["chunks"], want["tokens"], want["held"], want["pinned"],
            want["evictable"]), (step, op)
    assert st.evictions > 0  # the run went through evictions too



@pytest.mark.parametrize("shared", [False, True])
def test_prefault_commits_the_pool_without_touching_a_byte(layout, shared):
    """The pool's pages are committed ahead of need (a fresh destination's first copy then
    pays no page faults), a piece per call, and what chunks hold stays as written. Resident
    memory is checked for the shared pool (a new memfd: its pages are new); a private pool
    may reuse memory the allocator already holds resident in this process."""
    def resident_kib() -> int:
        with open("/proc/self/status") as f:
            return sum(int(line.split()[1]) for line in f
                       if line.startswith(("RssAnon:", "RssShmem:")))

    store = ChunkStore(layout, 32 << 20, shared=shared)  # big enough to see in RSS
    data = put_chunk(store, key(1), 32, 1)
    before = resident_kib()
    piece = store.pool_bytes // 4 + 1
    calls = 1
    while store.prefault(piece):
        calls += 1
    assert calls == 4 and not store.prefault(piece)
    grown = resident_kib() - before
    if shared:
        assert grown >= 0.9 * store.pool_bytes / 1024, grown
    (info,) = store.hold([key(1)])
    assert store.pool[info.offset:info.offset + info.nbytes].numpy().tobytes() == data
