"""P9 — routing by prefix: a shared-prefix workload on two engines through ``kvmove-router``,
through plain round-robin, and through an oracle that knows where each prefix lives, in one
run: TTFT p50/p90 and throughput.

Workload: 8 system prompts of 2,048 tokens, each followed by short user turns (32 tokens, new
each time): 96 requests in a seeded random order, arriving open-loop at a steady rate, each
streamed (``max_tokens`` 4); TTFT = time to the first streamed chunk. Engines: the demo model
(1 KiB of KV per token) with the connector (host store 0.25 GiB: every prefix fits) and vLLM's
own KV events on, each engine's paged cache held to ``GPU_BLOCKS`` blocks of 128 tokens (four
prefixes and the turns in flight: every prefix on every engine would thrash it). The "oracle"
is the static placement a client that knows the workload would choose: prefix i to engine
``i % 2`` (four per engine, which fit). Before each arm both engines' prefix caches and host
stores are emptied, so every arm starts cold and pays its own first prefills.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from common import WORK, Result, make_model, percentile
from tests.harness.engines import connector_config
from tests.harness.processes import LocalCluster, free_port

PREFIXES, PREFIX_TOKENS, TURN_TOKENS = 8, 2048, 32
REQUESTS, RATE = 96, 3.0  # requests, per second
GPU_BLOCKS = 72


def _workload(seed: int = 7) -> list[tuple[int, list[int]]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 4000) for _ in range(PREFIX_TOKENS)] for _ in range(PREFIXES)]
    order = [i % PREFIXES for i in range(REQUESTS)]
    rng.shuffle(order)
    return [(i, prefixes[i] + [rng.randrange(3, 4000) for _ in range(TURN_TOKENS)])
            for i in order]


def _ttft(url: str, model: str, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0,
            "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: "):
                return time.perf_counter() - t0
    raise AssertionError("no streamed chunk")


def _arm(pick, model: str, workload) -> tuple[list[float], float]:
    """Send the workload open-loop at RATE; ``pick(i, prefix)`` is the URL for request i.
    Returns the TTFTs and the requests per second completed."""
    ttfts: list[float] = [0.0] * len(workload)
    lock = threading.Lock()

    def one(i: int) -> None:
        prefix, prompt = workload[i]
        t = _ttft(pick(i, prefix), model, prompt)
        with lock:
            ttfts[i] = t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        futures = []
        for i in range(len(workload)):
            time.sleep(max(0.0, t0 + i / RATE - time.perf_counter()))
            futures.append(pool.submit(one, i))
        for f in futures:
            f.result()
    return ttfts, len(workload) / (time.perf_counter() - t0)


def run() -> list[Result]:
    model = str(make_model("tiny-llama"))
    cluster = LocalCluster(model, WORK / "p9")
    try:
        port, pull, reply = free_port(), free_port(), free_port()
        ctl = cluster.start_controller(port, pull, reply)
        engines = {}
        for cpu, iid in enumerate(("r1", "r2")):
            http = free_port()
            kv = connector_config(iid, http, pull, reply)
            events = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"tcp://*:{free_port()}", "topic": f"kv@{iid}@bench"}
            engines[iid] = cluster.start_engine(
                iid, http, cpu=cpu, extra_config=kv, max_model_len=4096,
                env={"VLLM_SERVER_DEV_MODE": "1"},
                extra_args=["--kv-events-config", json.dumps(events),
                            "--num-gpu-blocks-override", str(GPU_BLOCKS)])
        rport = free_port()
        router = cluster.start_router(rport, ["--controller", ctl.url, "--log-level", "warning"])
        for p in (ctl, *engines.values(), router):
            cluster.wait_ready(p, timeout=400)
        deadline = time.monotonic() + 60
        while httpx.get(router.url + "/health").json().get("engines_up", 0) < 2:
            assert time.monotonic() < deadline, "the router never saw both engines"
            time.sleep(0.5)
        urls = [engines["r1"].url, engines["r2"].url]
        workload = _workload()

        def cold() -> None:
            for iid, e in engines.items():
                httpx.post(e.url + "/reset_prefix_cache", timeout=30).raise_for_status()
                httpx.post(ctl.url + "/clear", json={"instance_id": iid},
                           timeout=30).raise_for_status()
                # A step, so the engine publishes its reset (vLLM publishes when it steps).
                httpx.post(e.url + "/v1/completions", timeout=60, json={
                    "model": model, "prompt": [1, 2, 3], "max_tokens": 1}).raise_for_status()
            time.sleep(1.0)

        arms = {"round-robin": lambda i, prefix: urls[i % 2],
                "router": lambda i, prefix: router.url,
                "oracle": lambda i, prefix: urls[prefix % 2]}
        measured = {}
        for name, pick in arms.items():
            cold()
            measured[name] = _arm(pick, model, workload)
        p = {name: (percentile(t, 50), percentile(t, 90), rps)
             for name, (t, rps) in measured.items()}
        rr, rt, orc = p["round-robin"], p["router"], p["oracle"]
        notes = (f"TTFT p50/p90 ms: round-robin {rr[0]*1e3:.0f}/{rr[1]*1e3:.0f}, router "
                 f"{rt[0]*1e3:.0f}/{rt[1]*1e3:.0f}, oracle {orc[0]*1e3:.0f}/{orc[1]*1e3:.0f}; "
                 f"requests/s {rr[2]:.2f} / {rt[2]:.2f} / {orc[2]:.2f}; {REQUESTS} requests at "
                 f"{RATE}/s, {PREFIXES} prefixes of {PREFIX_TOKENS} tokens, {GPU_BLOCKS} KV "
                 f"blocks per engine, host stores on")
        trials = {f"{name}_ttft_s": t for name, (t, _) in measured.items()}
        return [
            Result(id="P9-vs-round-robin", measure="TTFT p90, router vs round-robin",
                   value=rt[1] * 1e3, unit="ms", baseline={"round_robin_p90_ms": rr[1] * 1e3},
                   ratio=rr[1] / rt[1], goal="≥ 10× lower than round-robin",
                   met=rr[1] / rt[1] >= 10, trials=trials, notes=notes),
            Result(id="P9-vs-oracle", measure="TTFT p90, router vs an oracle",
                   value=rt[1] * 1e3, unit="ms", baseline={"oracle_p90_ms": orc[1] * 1e3},
                   ratio=rt[1] / orc[1], goal="≤ 1.2× the oracle", met=rt[1] / orc[1] <= 1.2,
                   notes=notes)]
    finally:
        cluster.stop_all()


if __name__ == "__main__":
    for r in run():
        print(r.id, r.value, r.ratio, r.notes)
