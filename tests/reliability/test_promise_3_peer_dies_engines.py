"""Promise 3 with vLLM engines as the peers: a move of >= 64 MiB of real KV between two engines;
the destination engine is SIGKILLed mid-move, then (separately) the source engine.

After the destination dies the event ends ``failed`` with the cause within 10 s, the
controller keeps serving, the source still holds every chunk, and a request on the source
(its own prefix cache reset, so only our store can help) gets all N-1 tokens from the store:
``vllm:external_prefix_cache_hits`` rises by N-1 and the greedy output is unchanged. After the
source dies, the new destination shows only whole chunks (byte-identical to what the source
held) and a request on it is served from exactly that prefix, with the same output.
The moves are capped at 32 MiB/s (``max_bytes_per_s``), so that each lasts ~2 s and the kill
lands between the first chunk and the last on any machine.

The model has 64 KiB of KV per token (16 layers, 8 KV heads of 128, bf16; hidden size 256 keeps
the prefill cheap), the prompt 1,100 tokens: 68.75 MiB in nine 128-token chunks.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from tests.harness.api import kill_mid_move, lookup, wait_lookup, wait_settled
from tests.harness.engines import Engine, model_dir
from tests.harness.processes import LocalCluster, free_port

N = 1100
CHUNK = 128
CAP = 32 << 20


def big_kv_model() -> Path:
    return model_dir("kv64k-16l", layers=16, heads=8, kv_heads=8, head_dim=128, hidden=256)


class BigKVCluster:
    """A controller and engines with the connector on the 64 KiB/token model."""

    def __init__(self, workdir: Path):
        self.model = big_kv_model()
        self.local = LocalCluster(self.model, workdir)
        self.pull, self.reply = free_port(), free_port()
        ctl = self.local.start_controller(free_port(), self.pull, self.reply,
                                          extra_args=["--heartbeat-timeout", "3"])
        self.local.wait_ready(ctl, timeout=60)
        self.http = httpx.Client(base_url=ctl.url, timeout=60)

    def start_engines(self, *ids: str) -> list[Engine]:
        """Start engines (in parallel, one per core) and wait until they serve and registered."""
        engines = []
        for i, iid in enumerate(ids):
            port, sidecar_port = free_port(), free_port()
            extra = {"instance_id": iid, "controller_pull_url": f"localhost:{self.pull}",
                     "controller_reply_url": f"localhost:{self.reply}", "sidecar_port": sidecar_port,
                     "p2p_init_port": free_port(), "engine_url": f"http://127.0.0.1:{port}",
                     "max_local_cpu_size": 0.25, "chunk_size": CHUNK,
                     # Over NIXL, as between hosts (see test_promise_3_peer_dies.py for why).
                     "same_host_copy": False, "command_timeout_s": 10}
            proc = self.local.start_engine(iid, port, cpu=i % 2, extra_config=extra,
                                           env={"VLLM_SERVER_DEV_MODE": "1"})  # /reset_prefix_cache
            engines.append(Engine(iid, proc, f"http://127.0.0.1:{sidecar_port}", str(self.model)))
        for e in engines:
            self.local.wait_ready(e.proc, timeout=300)
        deadline = time.monotonic() + 30
        while not {e.instance_id for e in engines} <= self.up():
            assert time.monotonic() < deadline, "engines did not register"
            time.sleep(0.2)
        return engines

    def up(self) -> set[str]:
        return {i["instance_id"] for i in self.http.get("/instances").json()["instances"] if i["up"]}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    c = BigKVCluster(tmp_path_factory.mktemp("promise3-engines"))
    try:
        yield c
    finally:
        c.local.stop_all()


@pytest.mark.timeout(900)
def test_engines_destination_then_source_die_mid_move(big):
    src, dst = big.start_engines("p3-src", "p3-dst")
    tokens = [random.Random(3).randrange(3, 4000) for _ in range(N)]
    t0 = time.monotonic()
    reference = src.complete(tokens, max_tokens=6)
    print(f"\n[promise 3, engines] prefill of {N} tokens on the source: {time.monotonic() - t0:.1f} s")
    assert wait_lookup(big.http, tokens, {src.instance_id: N}, timeout=30) == {src.instance_id: N}
    keys = [c["key"] for c in httpx.get(src.sidecar_url + "/chunks?limit=100", timeout=10).json()["chunks"]]
    assert len(keys) == -(-N // CHUNK)
    source_bytes = {k: httpx.get(f"{src.sidecar_url}/chunks/{k}", timeout=30).content for k in keys}
    assert sum(map(len, source_bytes.values())) >= 64 << 20

    # 1. The destination engine dies mid-move.
    final, took = kill_mid_move(big.http, src.instance_id, dst.instance_id, tokens,
                                lambda: big.local.kill(dst.proc), copy=False,
                                max_bytes_per_s=CAP)
    print(f"[promise 3, engines] destination killed at {final['bytes'] >> 20} of "
          f"{final['total_bytes'] >> 20} MiB: failed {took:.2f} s later: {final['error']}")
    assert final["status"] == "failed" and dst.instance_id in final["error"], final
    assert took < 10
    assert big.http.get("/health").status_code == 200
    # The source still holds every chunk, none held, and its engine is served from them.
    assert wait_lookup(big.http, tokens, {src.instance_id: N}, timeout=0) == {src.instance_id: N}
    store = src.sidecar("/store").json()
    assert store["num_chunks"] == len(keys) and store["held_chunks"] == 0, store
    out, hits = src.complete_from_store(tokens)
    assert hits == N - 1, f"source served {hits} of {N - 1} tokens from the store"
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == N - 1
    assert out["choices"][0]["text"] == reference["choices"][0]["text"]

    # 2. The source engine dies mid-move to a new destination.
    (dst2,) = big.start_engines("p3-dst2")
    final, took = kill_mid_move(big.http, src.instance_id, dst2.instance_id, tokens,
                                lambda: big.local.kill(src.proc), copy=False,
                                max_bytes_per_s=CAP)
    print(f"[promise 3, engines] source killed at {final['bytes'] >> 20} of "
          f"{final['total_bytes'] >> 20} MiB: failed {took:.2f} s later: {final['error']}")
    assert final["status"] == "failed" and final["error"], final
    assert took < 10
    assert big.http.get("/health").status_code == 200
    # The destination shows only whole chunks, each byte-identical to the source's.
    # Its read of the dead source settles within command_timeout_s (10 s here): nothing is
    # left half-written or held.
    wait_settled(lambda: dst2.sidecar("/store").json(), timeout=10 + 5)
    shown = [c["key"] for c in dst2.sidecar("/chunks?limit=100").json()["chunks"]]
    assert len(shown) < len(keys)
    for k in shown:
        assert dst2.sidecar(f"/chunks/{k}").content == source_bytes[k]
    # ...and its engine is served from exactly the prefix those chunks cover.
    prefix = lookup(big.http, tokens).get(dst2.instance_id, 0)
    out, hits = dst2.complete_from_store(tokens)
    assert hits == min(prefix, N - 1)
    assert out["choices"][0]["text"] == reference["choices"][0]["text"]
    print(f"[promise 3, engines] new destination kept {len(shown)} whole chunks "
          f"({prefix} tokens) and served them: {hits:.0f} external hits")
