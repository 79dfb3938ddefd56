"""P8 — drains: how fast an instance empties, and what a drain costs the engines serving beside
it, in one run.

Bytes: real sidecar processes (``tests.harness.standalone``: an engine's sidecar code, its
store, NIXL agent and control-plane client) in the layout of a 16-layer, 8-KV-head bf16 model
(64 KiB of KV per token, 16 MiB chunks). The source holds 4 GiB: 16 prompts of 4,096 tokens
(16 prefix families of 256 MiB); two destinations take 2.25 GiB each. Each drain is
``POST /drain {"copy": true}`` (the source keeps its KV for the next trial) timed from the
request to the job's end; the destinations are cleared between trials, and the first trial
(which faults in the destinations' pages) is not counted. Baseline: one-thread glibc
``memcpy`` of 1 GiB (warm buffers), between drain trials.

Serving: two engines on the demo model, OpenMP on one core each, each under a steady
closed-loop load (4 clients, 512-token prompts, 16 output tokens); tokens/s over a 10 s window,
without a drain and with a drain capped at ``max_bytes_per_s`` = 256 MiB/s (the cap the README
recommends for drains beside serving engines on hosts like this one: about a tenth of one
core's memcpy) running through the window, alternated over three trials each. The drain is
cancelled after its window (it stops between batches of a second at its cap).
"""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time

import httpx
import torch

from common import WORK, Result, make_model, median
from tests.harness.api import wait_job
from tests.harness.engines import connector_config
from tests.harness.processes import LocalCluster, free_port
from vllm_kvmove.layout import KVLayout

LAYOUT = KVLayout(model="bench-drain", dtype="bfloat16", num_layers=16, num_kv_heads=8,
                  head_size=128, block_size=128, chunk_size=256, backend="cpu_attn/vec")
FAMILIES, FAMILY_TOKENS = 16, 4096  # 16 x 256 MiB = 4 GiB
DRAIN_TRIALS = 3
SERVE_TRIALS, WINDOW_S, CLIENTS, PROMPT, OUTPUT = 3, 10.0, 4, 512, 16
CAP = 256 << 20


def _sidecar(pull: int, reply: int, iid: str, gib: float) -> dict:
    return {"instance_id": iid, "controller_pull_url": f"localhost:{pull}",
            "controller_reply_url": f"localhost:{reply}", "sidecar_port": free_port(),
            "p2p_init_port": free_port(), "chunk_size": LAYOUT.chunk_size,
            "max_local_cpu_size": gib, "heartbeat_interval_s": 0.5}


def _drain(http: httpx.Client, **body) -> str:
    r = http.post("/drain", json={"instance_id": "p8-src", "copy": True, **body})
    r.raise_for_status()
    return r.json()["event_id"]


def _clear(http: httpx.Client) -> None:
    for iid in ("p8-d1", "p8-d2"):
        http.post("/clear", json={"instance_id": iid}).raise_for_status()
    time.sleep(1.0)  # the destinations' heartbeats show the room again


def _serve(urls: list[str], model: str, seconds: float, seed: int) -> float:
    """Tokens per second both engines complete under CLIENTS closed-loop clients each."""
    stop = time.monotonic() + seconds
    done = [0]
    lock = threading.Lock()

    def client(url: str, k: int) -> None:
        rng = random.Random(seed * 100 + k)
        with httpx.Client(timeout=600) as c:
            while time.monotonic() < stop:
                prompt = [rng.randrange(3, 4000) for _ in range(PROMPT)]
                r = c.post(url + "/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": OUTPUT, "temperature": 0,
                    "ignore_eos": True})
                r.raise_for_status()
                if time.monotonic() <= stop:
                    with lock:
                        done[0] += r.json()["usage"]["total_tokens"]

    threads = [threading.Thread(target=client, args=(u, k)) for u in urls for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / seconds  # requests that ended within the window


def run() -> list[Result]:
    model = str(make_model("tiny-llama"))
    cluster = LocalCluster(model, WORK / "p8")
    try:
        port, pull, reply = free_port(), free_port(), free_port()
        ctl = cluster.start_controller(port, pull, reply)
        fills = [f"{i + 1}:{i * 10_000}:{FAMILY_TOKENS}" for i in range(FAMILIES)]
        procs = [cluster.start_sidecar_process(_sidecar(pull, reply, "p8-src", 4.05),
                                               LAYOUT.to_dict(), fills)]
        procs += [cluster.start_sidecar_process(_sidecar(pull, reply, iid, 2.25), LAYOUT.to_dict())
                  for iid in ("p8-d1", "p8-d2")]
        engines = []
        for cpu in (0, 1):
            http_port = free_port()
            kv = connector_config(f"p8-e{cpu}", http_port, pull, reply)
            engines.append(cluster.start_engine(f"p8-e{cpu}", http_port, cpu=cpu,
                                                extra_config=kv))
        for p in (ctl, *procs, *engines):
            cluster.wait_ready(p, timeout=400)
        http = httpx.Client(base_url=ctl.url, timeout=120)
        deadline = time.monotonic() + 120
        while True:
            listed = {i["instance_id"]: i for i in http.get("/instances").json()["instances"]}
            if listed.get("p8-src", {}).get("num_chunks") == FAMILIES * FAMILY_TOKENS // 256 \
                    and all(listed.get(i, {}).get("up") for i in ("p8-d1", "p8-d2")):
                break
            assert time.monotonic() < deadline, "the sidecars never registered their chunks"
            time.sleep(0.5)
        time.sleep(3)  # the source's background checksums (~0.1 s per GiB)

        # -- drain throughput against memcpy ---------------------------------------------
        a = torch.ones(1 << 30, dtype=torch.uint8)
        b = torch.zeros_like(a)
        drains, copies, nbytes = [], [], 0
        for trial in range(DRAIN_TRIALS + 1):
            t0 = time.perf_counter()
            st = wait_job(http, _drain(http))
            took = time.perf_counter() - t0
            assert st["status"] == "done", st
            nbytes = st["bytes"]
            if trial:
                drains.append(took)
            _clear(http)
            t0 = time.perf_counter()
            ctypes.memmove(b.data_ptr(), a.data_ptr(), a.numel())
            copies.append(time.perf_counter() - t0)
        del a, b
        drain_gbs = nbytes / median(drains) / 1e9
        copy_gbs = (1 << 30) / median(copies) / 1e9

        # -- serving beside a capped drain -------------------------------------------------
        urls = [e.url for e in engines]
        _serve(urls, model, 3.0, seed=0)  # warm-up
        plain, beside, drained = [], [], []
        for trial in range(SERVE_TRIALS):
            plain.append(_serve(urls, model, WINDOW_S, seed=2 * trial + 1))
            eid = _drain(http, max_bytes_per_s=CAP)
            beside.append(_serve(urls, model, WINDOW_S, seed=2 * trial + 2))
            progress = http.get(f"/events/{eid}").json()
            drained.append(progress["bytes"] / WINDOW_S)
            http.post(f"/events/{eid}/cancel", params={"wait": 30})
            wait_job(http, eid)
            _clear(http)
        ratio = median(beside) / median(plain)
        drain_notes = (f"{nbytes / 2**30:.2f} GiB in {median(drains):.2f} s "
                       f"({FAMILIES} families over 2 destinations, copy, verified); memcpy "
                       f"{copy_gbs:.2f} GB/s")
        serve_notes = (f"two engines, {CLIENTS} clients each, {PROMPT}+{OUTPUT} tokens; "
                       f"tokens/s without {median(plain):.0f}, beside the drain "
                       f"{median(beside):.0f}; the drain moved {median(drained) / 2**20:.0f} "
                       f"MiB/s meanwhile (cap {CAP >> 20} MiB/s)")
        return [
            Result(id="P8-throughput", measure="drain throughput, 4 GiB, POST /drain → done",
                   value=drain_gbs, unit="GB/s", baseline={"memcpy_GB/s": copy_gbs,
                                                           "bytes": nbytes},
                   ratio=drain_gbs / copy_gbs, goal="reported (vs memcpy)", met=True,
                   trials={"drain_s": drains, "memcpy_1GiB_s": copies}, notes=drain_notes),
            Result(id="P8-serving", measure="serving throughput of two engines beside a drain "
                   "capped at 256 MiB/s, vs without", value=median(beside), unit="tokens/s",
                   baseline={"without_drain_tokens/s": median(plain)}, ratio=ratio,
                   goal="≥ 0.8× without", met=ratio >= 0.8,
                   trials={"without": plain, "beside": beside, "drain_B/s": drained},
                   notes=serve_notes)]
    finally:
        cluster.stop_all()


if __name__ == "__main__":
    os.environ.setdefault("KVMOVE_LOG_LEVEL", "warning")
    for r in run():
        print(r.id, round(r.value, 3), r.unit, "ratio", round(r.ratio or 0, 3), r.notes)
