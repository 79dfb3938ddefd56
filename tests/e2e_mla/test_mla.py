"""Engines of a multi-head latent attention model (a small random-init DeepSeek-V2:
``examples/make_model.py --arch mla``; vLLM's CPU MLA backend, one 576-element latent vector
per token and layer) with the connector, and a controller. Shown with the engines' own word:

* a prompt served once is served again from the store after vLLM's own prefix cache is reset
  (``vllm:external_prefix_cache_hits`` up by N-1, the same greedy output);
* the seed flow between two MLA engines: the chunks moved byte for byte, the source without
  them, the destination served from the moved KV (hits >= N-1, the source's greedy output).

Its own package: its engines start after the other packages' engines stopped (memory)."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.harness.api import LOC, wait_instances_up, wait_lookup
from tests.harness.engines import Engine, chunk_keys, connector_config, model_dir
from tests.harness.processes import LocalCluster, free_port

N = 700


class MLAFleet:
    """A controller and two MLA engines, ``m1`` (core 0) and ``m2`` (core 1)."""

    def __init__(self, workdir):
        self.local = LocalCluster(model_dir("tiny-mla", arch="mla"), workdir)
        port, pull, reply = free_port(), free_port(), free_port()
        self.controller = self.local.start_controller(port, pull, reply)
        self.engines: dict[str, Engine] = {}
        for iid, cpu in (("m1", "0"), ("m2", "1")):
            http, sidecar = free_port(), free_port()
            extra = connector_config(iid, http, pull, reply, sidecar_port=sidecar)
            proc = self.local.start_engine(iid, http, cpu=cpu, extra_config=extra,
                                           env={"VLLM_SERVER_DEV_MODE": "1"})  # /reset_prefix_cache
            self.engines[iid] = Engine(iid, proc, f"http://127.0.0.1:{sidecar}",
                                       str(self.local.model_dir))
        self.local.wait_ready(self.controller, timeout=60)
        for e in self.engines.values():
            self.local.wait_ready(e.proc, timeout=400)
        self.http = httpx.Client(base_url=self.controller.url, timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = MLAFleet(tmp_path_factory.mktemp("mla"))
    try:
        wait_instances_up(f.http, set(f.engines))
        yield f
    finally:
        f.local.stop_all()


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4000) for _ in range(N)]


def test_an_mla_engine_registers_its_latent_layout(fleet):
    for i in fleet.http.get("/instances").json()["instances"]:
        layout = i["layout"]
        assert (layout["kind"], layout["backend"], layout["num_kv_heads"],
                layout["total_kv_heads"], layout["head_size"]) == ("mla", "cpu_mla", 1, 1, 576)


@pytest.mark.timeout(600)
def test_an_mla_prompt_is_served_again_from_the_store(fleet):
    engine, tokens = fleet.engines["m1"], prompt(41)
    reference = engine.complete(tokens, max_tokens=8)
    assert wait_lookup(fleet.http, tokens, {"m1": N}, timeout=30) == {"m1": N}
    out, hits = engine.complete_from_store(tokens, max_tokens=8)
    assert hits == N - 1
    assert out["choices"][0]["text"] == reference["choices"][0]["text"]


@pytest.mark.timeout(600)
def test_the_seed_flow_between_two_mla_engines(fleet):
    src, dst = fleet.engines["m1"], fleet.engines["m2"]
    tokens = prompt(43)
    reference = src.complete(tokens)
    assert wait_lookup(fleet.http, tokens, {"m1": N}, timeout=30) == {"m1": N}
    keys = chunk_keys(fleet.http, tokens, "m1")
    before = {k: src.chunk_bytes(k) for k in keys}
    assert all(before.values())
    r = fleet.http.post("/move", params={"wait": 60}, json={
        "old_position": ["m1", LOC], "new_position": ["m2", LOC], "tokens": tokens})
    assert r.status_code == 200, r.text
    st = r.json()
    assert st["status"] == "done", st
    assert st["bytes"] == sum(len(b) for b in before.values())
    assert {k: dst.chunk_bytes(k) for k in keys} == before
    assert all(src.chunk_bytes(k) is None for k in keys)
    dst.serve_and_check(tokens, tokens, reference["choices"][0]["text"])
