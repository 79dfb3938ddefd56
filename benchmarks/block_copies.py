"""The connector's save and load copies (``vllm_kvmove.layout.copy_blocks``) against plain
PyTorch indexing of the same byte rows — what the connector did before — on an engine-sized
cache: 16 layers × 1,024 blocks × 64 KiB (1 GiB), a chunk of 16 blocks (16 MiB), block ids
consecutive (a fresh engine) or scattered (an engine whose cache has churned: vLLM's usual
case). Medians of 9, each trial on new random blocks.

    .venv/bin/python benchmarks/block_copies.py
"""

from __future__ import annotations

import random
import time

import torch

from vllm_kvmove.layout import block_index, copy_blocks

LAYERS, SLAB, BLOCKS, PER_CHUNK = 16, 65536, 1024, 16


def plain_indexing(dst, dst_idx, src, src_idx) -> None:
    """``dst[dst_idx] = src[src_idx]`` with PyTorch's own indexing of uint8 rows."""
    if isinstance(dst_idx, slice):
        dst[dst_idx].copy_(src[src_idx])
    else:
        dst.index_copy_(0, dst_idx, src[src_idx])


def gbps(copy, layers, chunk, rng, scattered: bool, save: bool) -> float:
    times = []
    for _ in range(9):
        if scattered:
            ids = rng.sample(range(BLOCKS), PER_CHUNK)
        else:
            first = rng.randrange(BLOCKS - PER_CHUNK)
            ids = list(range(first, first + PER_CHUNK))
        idx = block_index(ids)
        t0 = time.perf_counter()
        for li, kv in enumerate(layers):
            if save:
                copy(chunk[:, li], slice(0, PER_CHUNK), kv, idx)
            else:
                copy(kv, idx, chunk[:, li], slice(0, PER_CHUNK))
        times.append(time.perf_counter() - t0)
    return chunk.numel() / sorted(times)[len(times) // 2] / 1e9


def main() -> None:
    layers = [torch.randint(0, 255, (BLOCKS, SLAB), dtype=torch.uint8) for _ in range(LAYERS)]
    chunk = torch.empty(PER_CHUNK, LAYERS, SLAB, dtype=torch.uint8)
    rng = random.Random(0)
    chunk.zero_()  # pages faulted in before any timing
    for scattered in (False, True):
        for save in (True, False):
            before = gbps(plain_indexing, layers, chunk, rng, scattered, save)
            after = gbps(copy_blocks, layers, chunk, rng, scattered, save)
            print(f"{'scattered' if scattered else 'consecutive':11} ids, {'save' if save else 'load'}: "
                  f"plain indexing {before:6.2f} GB/s, copy_blocks {after:6.2f} GB/s ({after / before:.1f}×)")


if __name__ == "__main__":
    main()
