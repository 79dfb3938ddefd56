"""Save queues (vllm_kvmove.saver) and the connector's use of them: a background save returns
before its copy ran, the chunk is invisible until the copy completed, a step that reuses a
block a save still reads waits for that save (the fence), and a failed copy leaves nothing
behind. The CUDA side-stream queue runs in tests/gpu (skipped without CUDA)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from tests.harness.stores import tiny_layout
from vllm_kvmove.connector import ChunkSave, KVMoveConnector, KVMoveConnectorMetadata
from vllm_kvmove.layout import block_bytes
from vllm_kvmove.saver import InlineSaves, ThreadSaves, save_queue
from vllm_kvmove.store import ChunkStore


def gated(gate: threading.Event, log: list, name: str):
    def copy() -> None:
        assert gate.wait(10), "the gate never opened"
        log.append(name)
    return copy


def test_save_queue_by_mode_and_device():
    cpu = torch.device("cpu")
    assert isinstance(save_queue("auto", cpu), InlineSaves)
    assert isinstance(save_queue("inline", cpu), InlineSaves)
    q = save_queue("background", cpu)
    try:
        assert isinstance(q, ThreadSaves)
    finally:
        q.close()
    with pytest.raises(ValueError, match="save_mode 'later'"):
        save_queue("later", cpu)


def test_inline_saves_copy_inside_submit_and_report_a_failure():
    q, ends, log = InlineSaves(), [], []
    q.submit([lambda: log.append("a"), lambda: log.append("b")], [1, 2], ends.append)
    assert (log, ends, q.in_flight()) == (["a", "b"], [True], 0)

    def boom() -> None:
        raise OSError("copy failed")
    with pytest.raises(OSError):
        q.submit([boom], [3], ends.append)
    assert ends == [True, False]


def test_background_saves_return_at_once_and_end_in_order():
    q, gate, log, ends = ThreadSaves(), threading.Event(), [], []
    try:
        q.submit([gated(gate, log, "a1"), gated(gate, log, "a2")], [1, 2],
                 lambda ok: ends.append(("a", ok)))
        q.submit([gated(gate, log, "b")], [3], lambda ok: ends.append(("b", ok)))
        assert log == [] and ends == [] and q.in_flight() == 2
        gate.set()
        q.flush()
        assert log == ["a1", "a2", "b"]
        assert ends == [("a", True), ("b", True)]
        assert q.in_flight() == 0
    finally:
        gate.set()
        q.close()


def test_a_fence_waits_only_for_saves_reading_the_fenced_blocks():
    q, gate, log, ends = ThreadSaves(), threading.Event(), [], []
    try:
        q.submit([gated(gate, log, "a")], [4, 5], ends.append)
        t0 = time.monotonic()
        assert q.fence([6, 7]) == 0  # another request's blocks: no wait
        assert time.monotonic() - t0 < 0.5 and ends == []
        threading.Timer(0.3, gate.set).start()
        t0 = time.monotonic()
        assert q.fence([7, 5]) == 1  # block 5 is being read: wait for that save
        assert time.monotonic() - t0 >= 0.25
        assert ends == [True] and log == ["a"]
    finally:
        gate.set()
        q.close()


def test_a_failed_background_copy_ends_false_and_later_saves_go_on():
    q, ends = ThreadSaves(), []

    def boom() -> None:
        raise OSError("copy failed")
    try:
        q.submit([boom], [1], lambda ok: ends.append(("a", ok)))
        q.submit([lambda: None], [2], lambda ok: ends.append(("b", ok)))
        q.flush()
        assert ends == [("a", False), ("b", True)]
    finally:
        q.close()


def test_close_ends_every_save_submitted():
    q, ends = ThreadSaves(), []
    for i in range(20):
        q.submit([lambda: time.sleep(0.001)], [i], ends.append)
    q.close()
    assert ends == [True] * 20


# -- the connector's worker side over a real store and host "paged cache" ------------------
LAYOUT = tiny_layout()  # 2 layers, 2 blocks of 16 tokens a chunk, 512-byte block slabs
NUM_BLOCKS = 8


def worker(saver) -> tuple[KVMoveConnector, list[torch.Tensor]]:
    """A connector with only its worker-side save state: a store, the layers' byte rows (a
    host cache filled with each block's number) and ``saver``."""
    conn = object.__new__(KVMoveConnector)
    cache = [torch.empty(NUM_BLOCKS, LAYOUT.num_kv_heads, LAYOUT.block_size,
                         2 * LAYOUT.head_size, dtype=torch.bfloat16) for _ in range(2)]
    conn._layers = [block_bytes(t) for t in cache]
    for li, rows in enumerate(conn._layers):
        for b in range(NUM_BLOCKS):
            rows[b].fill_(10 * li + b)
    conn.store = ChunkStore(LAYOUT, 4 * LAYOUT.chunk_bytes)
    conn._saver, conn._loader, conn._loading, conn._rank0 = saver, None, [], None
    conn._connector_metadata = None
    return conn, conn._layers


def step(conn, **meta) -> None:
    conn.bind_connector_metadata(KVMoveConnectorMetadata(**meta))


def test_the_connector_commits_a_background_save_once_its_copy_completed():
    gate = threading.Event()
    saver = ThreadSaves()
    conn, rows = worker(saver)
    key = b"k" * 16
    try:
        # Hold the saver thread in a copy of its own so the chunk's save stays in flight.
        saver.submit([gated(gate, [], "blocker")], [], lambda ok: None)
        step(conn, saves=[ChunkSave(key, 32, [5, 2])])
        t0 = time.monotonic()
        conn.wait_for_save()
        assert time.monotonic() - t0 < 0.5  # the forward thread did not wait
        assert not conn.store.contains(key)  # reserved, invisible until its copy ends
        # The next step gives block 2 to another request: it must wait for the save.
        threading.Timer(0.3, gate.set).start()
        t0 = time.monotonic()
        conn.handle_preemptions(KVMoveConnectorMetadata(new_block_ids=[7, 2]))
        assert time.monotonic() - t0 >= 0.25
        assert conn.store.contains(key)
        for li in range(2):  # the chunk holds blocks 5 and 2 as they were
            rows[li][2].fill_(99)  # the "next forward" overwrites the reused block
        (info,) = conn.store.hold([key], checksums=False)
        try:
            view = conn.store.slot_view(info.offset // conn.store.slot_bytes)
            for li in range(2):
                assert view[0, li].unique().tolist() == [10 * li + 5]
                assert view[1, li].unique().tolist() == [10 * li + 2]
        finally:
            conn.store.release([key])
    finally:
        gate.set()
        saver.close()


def test_a_step_that_reuses_no_saved_block_does_not_wait():
    gate = threading.Event()
    saver = ThreadSaves()
    conn, _ = worker(saver)
    try:
        saver.submit([gated(gate, [], "blocker")], [], lambda ok: None)
        step(conn, saves=[ChunkSave(b"k" * 16, 20, [1, 3])])
        conn.wait_for_save()
        t0 = time.monotonic()
        conn.handle_preemptions(KVMoveConnectorMetadata(new_block_ids=[0, 4, 6]))
        assert time.monotonic() - t0 < 0.2
        assert saver.in_flight() == 2
    finally:
        gate.set()
        saver.close()


class FailingSaves(ThreadSaves):
    """Background saves whose last copy fails, as a device copy might."""

    def submit(self, copies, blocks, done) -> None:
        def boom() -> None:
            raise OSError("copy failed")
        super().submit([*copies, boom], blocks, done)


def test_a_failed_background_save_leaves_no_chunk_and_no_reservation():
    saver = FailingSaves()
    conn, _ = worker(saver)
    key = b"f" * 16
    try:
        step(conn, saves=[ChunkSave(key, 32, [0, 1])])
        conn.wait_for_save()
        saver.flush()
        assert not conn.store.contains(key)
        stats = conn.store.stats()
        assert (stats["num_chunks"], stats["writing_chunks"], stats["free_slots"]) == (0, 0, 4)
        assert conn.store.reserve(key, 32) is not None  # the key is free to save again
    finally:
        saver.close()


def test_the_plan_names_every_block_given_to_a_request_this_step():
    conn = object.__new__(KVMoveConnector)
    conn._pending_loads, conn._trackers, conn._spans = [], {}, {}
    conn._block_size, conn._block_hasher = 16, None
    conn.layout = SimpleNamespace(chunk_size=32)
    conn.fingerprint = "fp"
    out = SimpleNamespace(
        num_scheduled_tokens={"new": 20, "old": 1, "back": 16},
        scheduled_new_reqs=[SimpleNamespace(req_id="new", prompt_token_ids=list(range(20)),
                                            block_ids=([11, 12],), num_computed_tokens=0)],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=["old", "back"], new_block_ids=[None, ([3, 4],)],
            resumed_req_ids={"back"}, num_computed_tokens=[40, 0]))
    meta = conn.build_connector_meta(out)
    assert sorted(meta.new_block_ids) == [3, 4, 11, 12]
