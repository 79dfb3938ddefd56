"""A sidecar without an engine: a real store, NIXL agent and control-plane client in their own
process, for fault-injection tests and benchmarks (kill it, stop it, measure it) where a vLLM
engine is not what is being tested.

Usage::

    python -m sidecar.standalone --config '{"instance_id": "s1", ...}' \\
        --layout '{"model": "m", "dtype": "bfloat16", ...}' [--fill SEED:FIRST:COUNT ...]

``--fill`` stores every chunk of the token sequence ``range(FIRST, FIRST + COUNT)`` with
synthetic bytes from :func:`synthetic_chunk` (deterministic in ``SEED`` and the chunk index,
so a test can regenerate what any chunk must contain). The process prints ``READY`` once it
serves and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

import torch

from sidecar.runtime import start_sidecar
from vllm_kvmove.config import build_config
from vllm_kvmove.hashing import chunk_spans
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.store import ChunkStore


_TILE = 1 << 16


def synthetic_chunk(layout: KVLayout, num_tokens: int, seed: int) -> torch.Tensor:
    """The valid bytes of a synthetic chunk (uint8), a pure function of its arguments: a seeded
    random 64 KiB tile, repeated (cheap enough to fill GiBs; distinct per seed)."""
    n = layout.valid_bytes(num_tokens)
    g = torch.Generator().manual_seed(seed)
    tile = torch.randint(0, 256, (min(n, _TILE),), dtype=torch.uint8, generator=g)
    return tile.repeat(-(-n // tile.numel()))[:n]


def fill_store(store: ChunkStore, fingerprint: str, seed: int, tokens: list[int]) -> list[bytes]:
    """Store every chunk of ``tokens`` (chunk i gets ``synthetic_chunk(..., seed + i)``)."""
    keys = []
    for i, span in enumerate(chunk_spans(tokens, store.layout.chunk_size, fingerprint)):
        slot = store.reserve(span.key, span.num_tokens)
        if slot is not None:
            data = synthetic_chunk(store.layout, span.num_tokens, seed + i)
            start = slot * store.slot_bytes
            store.pool[start:start + data.numel()].copy_(data)
            store.commit(span.key)
        keys.append(span.key)
    return keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="vllm-kvmove config keys, as JSON")
    p.add_argument("--layout", required=True, help="KVLayout fields, as JSON")
    p.add_argument("--fill", action="append", default=[], metavar="SEED:FIRST:COUNT")
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(json.loads(a.config))
    layout = KVLayout(**json.loads(a.layout))
    store = ChunkStore(layout, config.capacity_bytes, shared=config.same_host_copy)
    for spec in a.fill:
        seed, first, count = (int(x) for x in spec.split(":"))
        fill_store(store, layout.fingerprint(), seed, list(range(first, first + count)))
    sidecar = start_sidecar(config, store, layout)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    sidecar.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
