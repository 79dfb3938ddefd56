"""The scheduler side's load plan (KVMoveConnector.update_state_after_alloc): which chunk
blocks go to which paged-cache blocks, and which chunk must be copied before the forward —
the one whose last block also receives the step's first computed token (with layer-wise
loads, the forward writes that token into the cache before the layer's attention waits for
the load, so a deferred copy of that block would overwrite it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_kvmove.connector import KVMoveConnector
from vllm_kvmove.hashing import chunk_spans

BLOCK, CHUNK = 128, 256


def _plan(prompt_len: int, local: int, external: int):
    conn = object.__new__(KVMoveConnector)  # the scheduler-side state only
    conn._block_size = BLOCK
    conn.layout = SimpleNamespace(blocks_per_chunk=CHUNK // BLOCK)
    conn._spans = {"r": chunk_spans(list(range(prompt_len)), CHUNK, "fp")}
    conn._query = {"r": (local, external)}
    conn._pending_loads = []
    ids = [1000 + b for b in range(-(-prompt_len // BLOCK))]
    blocks = SimpleNamespace(get_block_ids=lambda: (ids,))
    conn.update_state_after_alloc(SimpleNamespace(request_id="r"), blocks, external)
    return conn._pending_loads, conn._spans["r"]


def test_a_block_aligned_load_copies_everything_beside_the_forward():
    loads, spans = _plan(8065, 0, 8064)  # 63 whole blocks; the step computes token 8064
    assert [load.key for load in loads] == [s.key for s in spans[:32]]
    assert [b for load in loads for b in load.blocks] == \
        [(b % 2, 1000 + b) for b in range(63)]
    assert not any(load.before_forward for load in loads)


@pytest.mark.parametrize("prompt_len", [8000, 12, 300])
def test_the_chunk_whose_last_block_the_step_writes_is_copied_before_the_forward(prompt_len):
    loads, _ = _plan(prompt_len, 0, prompt_len - 1)  # ends mid-block
    assert [load.before_forward for load in loads] == [False] * (len(loads) - 1) + [True]
    last_block = (prompt_len - 1) // BLOCK
    assert loads[-1].blocks[-1] == (last_block % 2, 1000 + last_block)


def test_a_load_after_a_local_hit_starts_at_the_first_block_vllm_lacks():
    loads, spans = _plan(1000, 384, 256)  # vLLM holds 3 blocks; the store 2 more
    assert [load.key for load in loads] == [spans[1].key, spans[2].key]
    assert [b for load in loads for b in load.blocks] == [(1, 1003), (0, 1004)]
    assert not any(load.before_forward for load in loads)
