"""Drains between real engines (the CPU build, the local model, NIXL between processes): three
engines and a controller. Prompts served on ``dr1``; ``kvmove drain --from dr1 --wait`` empties
it — every prefix family held whole by ``dr2`` or ``dr3``, each prompt then served there from
the moved KV (external hits >= N-1, the source's greedy output). Then, with
``drain_on_shutdown``, SIGTERM to ``dr1``: it drains itself the same way and exits within its
deadline, saying so in its log. Its own package: three engines start after the others stopped
(memory)."""

from __future__ import annotations

import os
import random
import signal
import time

import httpx
import pytest

from sidecar.cli import main as kvmove
from tests.harness.api import lookup, wait_instances_up, wait_sole_holder
from tests.harness.engines import Engine, connector_config, model_dir
from tests.harness.processes import LocalCluster, free_port

DRAIN_TIMEOUT_S = 40


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    local = LocalCluster(model_dir(), tmp_path_factory.mktemp("drain"))
    try:
        port, pull, reply = free_port(), free_port(), free_port()
        ctl = local.start_controller(port, pull, reply)
        engines = {}
        for cpu, iid in enumerate(("dr1", "dr2", "dr3")):
            http = free_port()
            extra = connector_config(iid, http, pull, reply)
            args = []
            if iid == "dr1":
                extra |= {"drain_on_shutdown": True, "drain_timeout_s": DRAIN_TIMEOUT_S}
                args = ["--shutdown-timeout", str(DRAIN_TIMEOUT_S + 20)]
            proc = local.start_engine(iid, http, cpu=cpu % 2, extra_config=extra,
                                      extra_args=args,
                                      env={"VLLM_SERVER_DEV_MODE": "1"})  # /reset_prefix_cache
            engines[iid] = Engine(iid, proc, f"http://127.0.0.1:{extra['sidecar_port']}",
                                  str(local.model_dir))
        local.wait_ready(ctl, timeout=60)
        for e in engines.values():
            local.wait_ready(e.proc, timeout=400)
        http = httpx.Client(base_url=ctl.url, timeout=60)
        wait_instances_up(http, set(engines))
        yield local, engines, http
    finally:
        local.stop_all()


def prompts(seed: int) -> list[list[int]]:
    """Three prompts of 600 tokens: the first two share their first 256 (one prefix family),
    the third stands alone."""
    rng = random.Random(seed)
    head = [rng.randrange(3, 4000) for _ in range(256)]
    return [head + [rng.randrange(3, 4000) for _ in range(344)],
            head + [rng.randrange(3, 4000) for _ in range(344)],
            [rng.randrange(3, 4000) for _ in range(600)]]


def serve_on(engine: Engine, http, batch: list[list[int]]) -> list[str]:
    """Serve each prompt on ``engine`` (its KV saved to its store); their greedy outputs, once
    the controller indexes every chunk there."""
    texts = [engine.complete(p)["choices"][0]["text"] for p in batch]
    deadline = time.monotonic() + 30
    while any(lookup(http, p).get(engine.instance_id, 0) < len(p) for p in batch):
        assert time.monotonic() < deadline, [lookup(http, p) for p in batch]
        time.sleep(0.1)
    return texts


def check_moved(engines, http, batch, texts) -> None:
    homes = [wait_sole_holder(http, p, {"dr2", "dr3"}) for p in batch]
    assert homes[0] == homes[1], homes  # one family, one destination
    for p, h, text in zip(batch, homes, texts):
        # Only the moved KV may serve it (not the GPU cache of the family's other prompt).
        engines[h].http.post("/reset_prefix_cache").raise_for_status()
        engines[h].serve_and_check(p, p, text)


def test_kvmove_drain_empties_an_engine_and_its_prompts_are_served_where_they_went(fleet):
    local, engines, http = fleet
    batch = prompts(1)
    texts = serve_on(engines["dr1"], http, batch)
    assert kvmove(["--controller", str(http.base_url), "drain", "--from", "dr1", "--wait"]) == 0
    job = http.get("/events", params={"limit": 1}).json()["events"][0]
    assert job["kind"] == "drain" and job["status"] == "done", job
    assert job["drain"]["units_done"] == job["drain"]["units_total"] == 2
    listed = {i["instance_id"]: i for i in http.get("/instances").json()["instances"]}
    assert listed["dr1"]["num_chunks"] == 0 and listed["dr1"]["draining"] == ""
    check_moved(engines, http, batch, texts)


def test_sigterm_with_drain_on_shutdown_drains_the_engine_before_it_exits(fleet):
    local, engines, http = fleet
    dr1 = engines["dr1"]
    batch = prompts(2)
    texts = serve_on(dr1, http, batch)
    t0 = time.monotonic()
    os.kill(dr1.proc.pid, signal.SIGTERM)
    dr1.proc.popen.wait(DRAIN_TIMEOUT_S + 30)
    took = time.monotonic() - t0
    log = dr1.proc.log_path.read_text(errors="replace")
    print(f"\n[drain] dr1 exited {took:.1f} s after SIGTERM")
    assert "kvmove: drained dr1" in log, dr1.proc.log_tail(60)
    assert took < DRAIN_TIMEOUT_S + 20
    check_moved(engines, http, batch, texts)
    job = http.get("/events", params={"limit": 1}).json()["events"][0]
    assert job["kind"] == "drain" and job["source"] == "dr1" and job["status"] == "done", job
