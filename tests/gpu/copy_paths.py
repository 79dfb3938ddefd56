"""The connector's save and load copies on KV caches shaped as vLLM's attention backends lay
them out — LBHNC (the CPU backend's, and what vLLM's offloading and NIXL connectors ask GPU
backends for) and LBNHC (FlashAttention's "NHD" default: the view ``[blocks, heads, tokens,
2*head]`` permuted over ``[blocks, tokens, heads, 2*head]`` memory) — and on layers that share
one buffer (``stride(0)`` twice a slab). On any device: the cache on ``device``, the chunk in
host memory (pinned where CUDA is the device), as the store's pool is.

Then the background saves (:mod:`vllm_kvmove.saver`, the path ``save_mode: auto`` takes on
CUDA): a chunk saved on the side stream after work queued on the forward's stream holds the
bytes that work wrote (the side stream waited for it) while ``submit`` returned before the
device got there; a block the next step overwrites after a ``fence`` is saved as it was before
(the forward's stream waited for the save); the pool page-locked with ``cudaHostRegister``;
the background save's GB/s against a plain device-to-host copy. On the CPU the same checks
run through the saver thread.

For each case: save a chunk's blocks from the cache into the host chunk with
:func:`vllm_kvmove.layout.copy_blocks` over :func:`vllm_kvmove.layout.block_bytes` rows, check
every byte against a CPU reference (the blocks' physical bytes read back with a plain
``.cpu()``), load them into other blocks of a second cache and check those too, then time
both directions against a plain ``torch`` copy of the same number of bytes between the same
two memories.

Needs only torch and this repository (no vLLM, no pytest): on a bare GPU machine,

    python -m tests.gpu.copy_paths            # every case, CUDA if present, else CPU

``tests/gpu/test_copy_paths.py`` runs the same cases under pytest (CPU always, CUDA where
present). Runs in well under a minute.
"""

from __future__ import annotations

import sys
import time

import torch

from vllm_kvmove.layout import block_bytes, block_copier, block_index, copy_blocks
from vllm_kvmove.saver import pin_host_memory, save_queue

NUM_BLOCKS, HEADS, TOKENS, HEAD = 64, 8, 16, 128  # block size 16, 2*head_size 256 (bf16)
BLOCKS_PER_CHUNK = 16
LAYERS = 4


def make_cache(order: str, device: str, seed: int) -> list[torch.Tensor]:
    """Per-layer views ``[blocks, heads, tokens, 2*head]`` (bf16) filled with seeded values,
    laid out in memory as ``order``: "LBHNC", "LBNHC", or "shared" (LBHNC, every two layers
    interleaved in one buffer, so ``stride(0)`` is twice a slab)."""
    g = torch.Generator().manual_seed(seed)

    def filled(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16).to(device)

    if order == "LBHNC":
        return [filled(NUM_BLOCKS, HEADS, TOKENS, 2 * HEAD) for _ in range(LAYERS)]
    if order == "LBNHC":
        return [filled(NUM_BLOCKS, TOKENS, HEADS, 2 * HEAD).permute(0, 2, 1, 3)
                for _ in range(LAYERS)]
    if order == "shared":
        layers = []
        for _ in range(LAYERS // 2):
            buf = filled(NUM_BLOCKS, 2, HEADS, TOKENS, 2 * HEAD)
            layers += [buf[:, 0], buf[:, 1]]
        return layers
    raise ValueError(order)


def physical_block(t: torch.Tensor, block: int) -> bytes:
    """The bytes of one block as they lie in memory, read with a plain copy to the host."""
    b = t[block]
    # Undo the view's permutation: the dims sorted by stride, outermost first, are memory order.
    order = sorted(range(b.dim()), key=lambda d: -b.stride(d))
    return b.permute(*order).contiguous().cpu().view(torch.uint8).numpy().tobytes()


def check(order: str, device: str) -> dict[str, float]:
    """Save, verify, load, verify and time one case; returns GB/s of each direction and of
    the plain torch copies between the same memories. Raises AssertionError on a wrong byte."""
    src = make_cache(order, device, seed=1)
    dst = make_cache(order, device, seed=2)
    rows_src = [block_bytes(t) for t in src]
    rows_dst = [block_bytes(t) for t in dst]
    slab = rows_src[0].shape[1]
    pin = device.startswith("cuda")
    chunk = torch.empty(BLOCKS_PER_CHUNK, LAYERS, slab, dtype=torch.uint8, pin_memory=pin)
    scattered = [3 * i % NUM_BLOCKS for i in range(BLOCKS_PER_CHUNK)]  # not consecutive
    targets = list(range(NUM_BLOCKS - BLOCKS_PER_CHUNK, NUM_BLOCKS))  # consecutive

    def save() -> None:
        for li, rows in enumerate(rows_src):
            copy_blocks(chunk[:, li], slice(0, BLOCKS_PER_CHUNK), rows, block_index(scattered))

    def load() -> None:
        for li, rows in enumerate(rows_dst):
            copy_blocks(rows, block_index(targets), chunk[:, li], slice(0, BLOCKS_PER_CHUNK))

    save()
    sync(device)
    for li, t in enumerate(src):
        for i, b in enumerate(scattered):
            assert chunk[i, li].numpy().tobytes() == physical_block(t, b), (order, device, li, b)
    load()
    sync(device)
    for li, t in enumerate(dst):
        for i, b in enumerate(targets):
            assert physical_block(t, b) == physical_block(src[li], scattered[i]), (order, device, li, b)
    nbytes = chunk.numel()
    plain_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    plain_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    return {"save_GBps": rate(save, nbytes, device),
            "load_GBps": rate(load, nbytes, device),
            "plain_to_host_GBps": rate(lambda: plain_host.copy_(plain_dev), nbytes, device),
            "plain_to_device_GBps": rate(lambda: plain_dev.copy_(plain_host), nbytes, device)}


def check_background_saves(device: str) -> dict[str, float]:
    """The background save queue on an LBHNC cache on ``device``, as the connector drives it
    (submit after a step's forward, fence before the next one's); returns the save's GB/s
    (submit to completion, the page-locked pool) and a plain device-to-host copy's, and
    whether the pool could be page-locked (1.0) or not. Raises AssertionError on a wrong byte
    or a save that did not wait for the forward's work."""
    cuda = device.startswith("cuda")
    cache = make_cache("LBHNC", device, seed=3)
    rows = [block_bytes(t) for t in cache]
    slab = rows[0].shape[1]
    nbytes = BLOCKS_PER_CHUNK * LAYERS * slab
    pool = torch.empty(nbytes, dtype=torch.uint8)  # pageable, as the store's pool is
    pinned = pin_host_memory(pool.data_ptr(), nbytes) if cuda else False
    chunk = pool.view(BLOCKS_PER_CHUNK, LAYERS, slab)
    blocks = [3 * i % NUM_BLOCKS for i in range(BLOCKS_PER_CHUNK)]
    queue = save_queue("background", torch.device(device))

    def copies() -> list:
        return [block_copier(chunk[:, li], range(BLOCKS_PER_CHUNK), rows[li], blocks, cuda)
                for li in range(LAYERS)]

    def saved() -> list[list[bytes]]:
        return [[chunk[i, li].numpy().tobytes() for i in range(BLOCKS_PER_CHUNK)]
                for li in range(LAYERS)]

    def cache_now() -> list[list[bytes]]:
        return [[physical_block(cache[li], b) for b in blocks] for li in range(LAYERS)]

    try:
        # 1. The forward's work queued before the save (a long kernel, then writes to every
        #    block) is in the saved bytes, and submit did not wait for the device.
        ends: list[bool] = []
        if cuda:
            torch.cuda._sleep(200_000_000)  # ~0.1 s of device time on the forward's stream
        for t in cache:
            t.add_(1)
        queue.submit(copies(), blocks, ends.append)
        if cuda:
            assert queue.in_flight() == 1, "submit waited for the device"
        queue.flush()
        assert ends == [True]
        assert saved() == cache_now(), "the save did not wait for the forward's writes"
        before = cache_now()
        # 2. A fence: the next step overwrites a block the save reads; fenced, the overwrite
        #    waits for the save, which holds the bytes from before it.
        if cuda:
            torch.cuda._sleep(200_000_000)
        queue.submit(copies(), blocks, ends.append)
        assert queue.fence([NUM_BLOCKS + 1]) == 0  # no save reads that block
        assert queue.fence(blocks[:1]) == 1
        for t in cache:
            t.fill_(0)
        sync(device)
        queue.flush()
        assert ends == [True, True]
        assert saved() == before, "a fenced block was overwritten before its save read it"

        def save() -> None:
            queue.submit(copies(), blocks, ends.append)
            queue.flush()

        plain_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        plain_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        return {"save_GBps": rate(save, nbytes, device),
                "plain_to_host_GBps": rate(lambda: plain_host.copy_(plain_dev), nbytes, device),
                "pinned": float(pinned)}
    finally:
        queue.close()
        if pinned:
            torch.cuda.cudart().cudaHostUnregister(pool.data_ptr())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, nbytes: int, device: str, trials: int = 7) -> float:
    """Median GB/s of ``fn`` moving ``nbytes`` (after one warm-up)."""
    fn()
    sync(device)
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


ORDERS = ("LBHNC", "LBNHC", "shared")


def main() -> int:
    devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    print(f"torch {torch.__version__}; devices: {devices}"
          + (f" ({torch.cuda.get_device_name(0)})" if devices == ["cuda"] else ""))
    for device in devices:
        for order in ORDERS:
            r = check(order, device)
            print(f"{device} {order:6}: bytes identical; save {r['save_GBps']:.2f} GB/s "
                  f"(plain device→host {r['plain_to_host_GBps']:.2f}), load {r['load_GBps']:.2f} "
                  f"GB/s (plain host→device {r['plain_to_device_GBps']:.2f})")
        r = check_background_saves(device)
        print(f"{device} background saves: waited for the forward's writes, fenced blocks "
              f"saved before their overwrite; pool page-locked: {bool(r['pinned'])}; "
              f"{r['save_GBps']:.2f} GB/s submit to completion (plain device→host "
              f"{r['plain_to_host_GBps']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
