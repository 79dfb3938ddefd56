"""A CPU engine with ``--tensor-parallel-size 2`` and the connector, its host store alone (no
controller): each rank's worker keeps a store and a sidecar of its own (the configured sidecar
port + rank), each holding its own shard of every chunk (the same keys, different bytes: its
heads); a prompt served once is served again from the two stores after vLLM's own prefix
cache is reset — ``vllm:external_prefix_cache_hits`` up by N-1, ``cached_tokens`` N-1, the
same greedy output. (With a controller configured such an engine is refused at start-up:
tests/unit/test_parallelism.py.)"""

from __future__ import annotations

import random
import time

import httpx
import pytest

from tests.harness.engines import Engine, model_dir
from tests.harness.processes import LocalCluster, free_port

N = 700
CHUNK = 256


def consecutive_ports() -> int:
    """A free port whose successor is free too (rank 1's)."""
    while True:
        p, q = free_port(), free_port()
        if q == p + 1:
            return p


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    local = LocalCluster(model_dir(), tmp_path_factory.mktemp("tp2"))
    port, sidecar, p2p = free_port(), consecutive_ports(), consecutive_ports()
    extra = {"instance_id": "tp2", "controller_pull_url": "", "controller_reply_url": "",
             "sidecar_port": sidecar, "p2p_init_port": p2p, "chunk_size": CHUNK,
             "engine_url": f"http://127.0.0.1:{port}", "max_local_cpu_size": 0.25}
    proc = local.start_engine("tp2", port, cpu="0|1", extra_config=extra,
                              extra_args=["--tensor-parallel-size", "2"],
                              env={"VLLM_SERVER_DEV_MODE": "1"})  # /reset_prefix_cache
    try:
        local.wait_ready(proc, timeout=300)
        yield Engine("tp2", proc, f"http://127.0.0.1:{sidecar}", str(local.model_dir)), sidecar
    finally:
        local.stop_all()


def rank_store(sidecar_port: int, rank: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{sidecar_port + rank}/store", timeout=10).json()


@pytest.mark.timeout(600)
def test_each_rank_stores_its_shard_and_the_engine_is_served_from_both(tp2):
    engine, sidecar = tp2
    tokens = [random.Random(13).randrange(3, 4000) for _ in range(N)]
    reference = engine.complete(tokens, max_tokens=6)
    chunks = -(-N // CHUNK)
    deadline = time.monotonic() + 30
    while not all(rank_store(sidecar, r)["num_chunks"] == chunks for r in (0, 1)):
        assert time.monotonic() < deadline, [rank_store(sidecar, r) for r in (0, 1)]
        time.sleep(0.2)
    # The same chunk keys on both ranks, each rank's own heads.
    keys = [[c["key"] for c in httpx.get(f"http://127.0.0.1:{sidecar + r}/chunks?limit=100",
                                         timeout=10).json()["chunks"]] for r in (0, 1)]
    assert sorted(keys[0]) == sorted(keys[1]) and len(keys[0]) == chunks
    for key in keys[0]:
        shards = [httpx.get(f"http://127.0.0.1:{sidecar + r}/chunks/{key}", timeout=10).content
                  for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) > 0 and shards[0] != shards[1]
    # Served again from the two stores.
    out, hits = engine.complete_from_store(tokens)
    print(f"\n[tp2] {N} tokens: {chunks} chunks on each of 2 ranks; after a prefix-cache reset "
          f"{hits:.0f} external hits, cached_tokens {out['usage']['prompt_tokens_details']['cached_tokens']}")
    assert hits == N - 1
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == N - 1
    assert out["choices"][0]["text"] == reference["choices"][0]["text"]
