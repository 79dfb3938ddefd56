"""A sidecar without an engine: a real store, NIXL agent and control-plane client in their own
process, for fault-injection tests and benchmarks (kill it, stop it, measure it) where a vLLM
engine is not what is being tested.

Usage::

    python -m tests.harness.standalone --config '{"instance_id": "s1", ...}' \\
        --layout '{"model": "m", "dtype": "bfloat16", ...}' [--fill SEED:FIRST:COUNT ...]

``--fill`` stores every chunk of the token sequence ``range(FIRST, FIRST + COUNT)`` with
synthetic bytes from :func:`tests.harness.stores.synthetic_chunk` (deterministic in ``SEED``
and the chunk index, so a test can regenerate what any chunk must contain). The process prints ``READY`` once it
serves and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from sidecar.agent import start_sidecar
from tests.harness.stores import fill_synthetic
from vllm_kvmove.config import build_config
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.store import ChunkStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="vllm-kvmove config keys, as JSON")
    p.add_argument("--layout", required=True, help="KVLayout fields, as JSON")
    p.add_argument("--fill", action="append", default=[], metavar="SEED:FIRST:COUNT")
    p.add_argument("--rank", type=int, default=0, help="tensor-parallel rank")
    p.add_argument("--world-size", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(json.loads(a.config))
    layout = KVLayout(**json.loads(a.layout))
    store = ChunkStore(layout, config.capacity_bytes, shared=config.same_host_copy)
    for spec in a.fill:
        seed, first, count = (int(x) for x in spec.split(":"))
        fill_synthetic(store, layout.fingerprint(), seed, list(range(first, first + count)))
    sidecar = start_sidecar(config, store, layout, rank=a.rank, world_size=a.world_size)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait()
    sidecar.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
