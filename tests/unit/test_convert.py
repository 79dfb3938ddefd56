"""Chunk conversion (vllm_kvmove.convert) against vLLM's own CPU cache-write kernel: chunks
built the way an engine's cache holds them — written by ``cpu_attn_reshape_and_cache`` for
each engine's block size, packing (``vec``, ``amx``) and tensor-parallel rank — convert into
exactly the bytes the other engine's kernel would have written for the same K and V."""

from __future__ import annotations

import pytest
import torch

from tests.harness.stores import tiny_layout
from vllm_kvmove.convert import (conversion_obstacles, convert_chunk, head_range, pack,
                                 source_ranks, unpack)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.fixture(scope="module")
def kernel():
    """vLLM's CPU cache-write op."""
    platforms = pytest.importorskip("vllm.platforms")
    platforms.current_platform.import_kernels()
    return torch.ops._C.cpu_attn_reshape_and_cache


def layout(backend: str, block_size: int, heads: int, total: int = 0, dtype: str = "bfloat16",
           head_size: int = 64):
    return tiny_layout(backend=f"cpu_attn/{backend}", block_size=block_size, num_kv_heads=heads,
                       total_kv_heads=total or heads, dtype=dtype, head_size=head_size,
                       chunk_size=256, num_layers=2)


def engine_chunk(kernel, lay, world: int, rank: int, k, v, num_tokens: int) -> torch.Tensor:
    """The valid bytes of a chunk of ``num_tokens`` tokens as an engine of layout ``lay`` (rank
    ``rank`` of ``world``) holds it: each layer's K/V for the rank's heads written by vLLM's
    kernel into shuffled blocks of a paged cache, then the chunk's blocks in order
    ([blocks][layers][slab]). ``k``, ``v``: ``[layers, tokens, all heads, head_size]``."""
    heads = head_range(lay, world, rank)
    nb, bs = lay.blocks_for(num_tokens), lay.block_size
    ids = torch.randperm(nb + 2)[:nb]  # the chunk's blocks, somewhere in the cache
    slots = (ids.repeat_interleave(bs) * bs + torch.arange(nb * bs) % bs)[:num_tokens]
    rows = []
    for layer in range(lay.num_layers):
        cache = torch.zeros(nb + 2, lay.num_kv_heads, bs, 2 * lay.head_size,
                            dtype=_DTYPES[lay.dtype])
        kc, vc = cache.view(nb + 2, lay.num_kv_heads, 2 * bs, lay.head_size).chunk(2, dim=2)
        kernel(k[layer, :num_tokens, heads.start:heads.stop].contiguous(),
               v[layer, :num_tokens, heads.start:heads.stop].contiguous(), kc, vc, slots,
               lay.backend.split("/")[1], 1.0, 1.0, "auto")
        rows.append(cache[ids].view(torch.uint8).reshape(nb, 1, -1))
    return torch.cat(rows, dim=1).reshape(-1).clone()


def kv(lay, tokens: int = 256):
    shape = (lay.num_layers, tokens, lay.total_kv_heads, lay.head_size)
    g = torch.Generator().manual_seed(tokens)
    return (torch.randn(shape, generator=g).to(_DTYPES[lay.dtype]),
            torch.randn(shape, generator=g).to(_DTYPES[lay.dtype]))


@pytest.mark.parametrize("backend, dtype", [("vec", "float16"), ("vec", "float32"),
                                            ("vec", "bfloat16"), ("amx", "bfloat16")])
@pytest.mark.parametrize("block_size", [32, 128])
def test_pack_writes_what_the_kernel_writes_and_unpack_reads_it_back(kernel, backend, dtype,
                                                                     block_size):
    lay = layout(backend, block_size, heads=2, dtype=dtype)
    k, v = kv(lay)
    chunk = engine_chunk(kernel, lay, 1, 0, k, v, 256)
    # Canonical [layers, heads, tokens, head_size], as integers of the element's width.
    as_int = {2: torch.int16, 4: torch.int32}[lay.dtype_bytes]
    kc = k.permute(0, 2, 1, 3).contiguous().view(as_int)
    vc = v.permute(0, 2, 1, 3).contiguous().view(as_int)
    out = torch.zeros_like(chunk)
    pack(kc, vc, lay, out)
    assert torch.equal(out, chunk)
    ku, vu = unpack(chunk, lay, lay.blocks_per_chunk)
    assert torch.equal(ku, kc) and torch.equal(vu, vc)


CASES = {  # (source: backend, block size, tensor parallelism) -> (destination: ...)
    "TP2 -> TP1": (("amx", 128, 2), ("amx", 128, 1)),
    "TP1 -> TP2": (("amx", 128, 1), ("amx", 128, 2)),
    "block 32 -> 128": (("amx", 32, 1), ("amx", 128, 1)),
    "block 128 -> 32, TP2 -> TP1": (("amx", 128, 2), ("amx", 32, 1)),
    "vec block 32 -> amx block 128, TP1 -> TP2": (("vec", 32, 1), ("amx", 128, 2)),
}


@pytest.mark.parametrize("num_tokens", [256, 100])  # a full chunk, a partial one
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_converted_chunk_is_what_the_destination_kernel_writes(kernel, case, num_tokens):
    (sb, sbs, sw), (db, dbs, dw) = CASES[case]
    src = layout(sb, sbs, heads=4 // sw, total=4, dtype="float16" if sb == "vec" else "bfloat16")
    dst = layout(db, dbs, heads=4 // dw, total=4)
    if src.dtype != dst.dtype:  # one dtype per pair (the fingerprint would differ otherwise)
        src = layout(sb, sbs, heads=4 // sw, total=4)
    assert src.fingerprint() == dst.fingerprint() and conversion_obstacles(src, sw, dst, dw) == []
    k, v = kv(src)
    shards = {r: engine_chunk(kernel, src, sw, r, k, v, num_tokens) for r in range(sw)}
    for rank in range(dw):
        needed = source_ranks(src, sw, dst, dw, rank)
        out = torch.full((dst.valid_bytes(num_tokens),), 0xAB, dtype=torch.uint8)
        convert_chunk([(r, shards[r]) for r in needed], src, sw, dst, dw, rank, num_tokens, out)
        assert torch.equal(out, engine_chunk(kernel, dst, dw, rank, k, v, num_tokens)), rank


def test_which_source_ranks_a_destination_rank_reads():
    four = layout("amx", 128, heads=4)
    two = layout("amx", 128, heads=2, total=4)
    assert source_ranks(two, 2, four, 1, 0) == [0, 1]  # join
    assert source_ranks(four, 1, two, 2, 1) == [0]  # split
    assert source_ranks(two, 2, two, 2, 1) == [1]
    # A model with one KV head at TP=2: each rank holds a replica; one is enough.
    rep = layout("amx", 128, heads=1, total=1)
    assert head_range(rep, 2, 0) == head_range(rep, 2, 1) == range(0, 1)
    assert source_ranks(rep, 2, rep, 1, 0) == [0]


def test_a_conversion_that_is_not_known_is_refused_naming_the_fields():
    test_backend = tiny_layout(block_size=16)
    other = tiny_layout(block_size=32)
    (why,) = conversion_obstacles(test_backend, 1, other, 1)
    assert "block_size: 16 != 32" in why and "no conversion is known for backend 'test'" in why
    assert conversion_obstacles(test_backend, 1, test_backend, 1) == []  # nothing to convert
    four, two = layout("amx", 128, heads=4), layout("amx", 128, heads=2, total=4)
    assert conversion_obstacles(four, 1, two, 2) == []
    (why,) = conversion_obstacles(four, 1, two, 4)  # 2 heads per rank cannot be TP=4 of 4
    assert "tensor_parallel_size: 1 != 4" in why and "does not split 4 heads over 4" in why
