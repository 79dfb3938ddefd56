"""P9 — routing by prefix: a shared-prefix workload on two engines through ``kvmove-router``,
through plain round-robin, and through an oracle that knows where each prefix lives, in one
run: TTFT p50/p90 and throughput; then pull-on-route with one engine made busy.

Model: a prefill-dominated one — random-init Llama, 16 layers, 8 attention and 8 KV heads of
128, hidden 256 (``kv64k-16l``: 64 KiB of KV per token, 256 MiB per 4,096-token prefix): a
cold 2,080-token prompt costs ~1 s to its first token on one idle core here, ~2 s with both
engines busy, a 4,128-token one about twice that; a prefix-cache hit ~0.2 s (≈ 0.4 s with both
busy), nearly all fixed cost.

Engines: two, one core each (OpenMP bound to core 0 / 1), with the connector and vLLM's own
KV events on. Each engine's caches hold about half of the workload's prefixes: its paged
cache ``GPU_BLOCKS`` blocks of 128 tokens (three prefixes, or two and the turns in flight),
its host store ``HOST_GIB`` (slots of one 256-token chunk, 16 MiB each: four prefixes and 16
more — every request also stores its own partial last chunk in a slot). All 8 prefixes fit in
the two engines together, not in one: round-robin makes each engine see all of them (its
caches thrash), routing by prefix can partition them.

Workload: 8 system prompts of ``PREFIX_TOKENS`` (4,096; 2,048 with ``P9_PREFIX_TOKENS=2048``,
the earlier runs' workload, with caches of half the size); each request one of them followed by a new
32-token user turn, streamed (``max_tokens`` 4); TTFT = time to the first streamed chunk.
``WARMUP_ROUNDS`` × 8 requests (the cold start) then ``MEASURED_ROUNDS`` × 8, each round
block in a seeded random order, all open-loop at one steady rate. Percentiles are over the
measured requests (the steady state), pooled over ``REPEATS`` repetitions of every arm (a new
seed each, arms in the order A B C C B A, so drift and a neighbour's load fall on all arms);
the warm-up's are reported beside them.

Rate: calibrated first with both engines busy at once (fresh prompts, not the workload's) —
a cold prompt, a GPU prefix-cache hit and a host-store hit, each timed to its first token
and to its last — and set to ``LOAD`` × round-robin's estimated capacity
``2 / (m·cold + (1-m)·hit)`` (to the last token) with ``m`` = ``RR_MISS_EST`` (each engine's
caches hold half the prefixes). The share of prompt tokens each arm really prefilled (the
engines' ``/metrics``) is reported, and an arm that completed fewer than 95 % of the rate is
flagged as overloaded.

Arms (each from cold: prefix caches reset, host stores cleared): "round-robin" (request i to
engine i mod 2, straight), "router" (through ``kvmove-router`` with its defaults:
``--load-tokens`` 1024, pull-on-route off), "oracle" (prefix p straight to engine p mod 2: the
static placement of a client that knows the workload and the caches' size — four prefixes per
engine, which fit — and no proxy hop).

Pull-on-route: both engines cold, two new prefixes prefilled on engine r1 (its GPU cache and host
store), r1 then kept busy by ``BUSY`` long generations sent straight to it. Per trial, a new
turn after one of those prefixes goes through the router without pull-on-route, through one
with ``--pull-min-tokens``, and straight to the busy holder; r2's caches are emptied after
each request, so every one finds the prefix on r1 only.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from common import WORK, Result, make_model, percentile
from tests.harness.engines import connector_config
from tests.harness.processes import LocalCluster, free_port

MODEL = ("kv64k-16l", dict(layers=16, heads=8, kv_heads=8, head_dim=128, hidden=256))
# The system prompts' length: 4,096 by default; P9_PREFIX_TOKENS=2048 runs the shorter
# workload of the earlier runs (a multiple of 256).
PREFIX_TOKENS = int(os.environ.get("P9_PREFIX_TOKENS", "4096"))
PREFIXES, TURN_TOKENS, MAX_TOKENS = 8, 32, 4
WARMUP_ROUNDS, MEASURED_ROUNDS = 4, 8  # each prefix this many times, per repetition
REPEATS = 2  # of every arm, in the order A B C C B A (drift and a neighbour's load shared)
GPU_BLOCKS = 3 * PREFIX_TOKENS // 128  # 3 prefixes (or 2 and turns in flight)
HOST_GIB = (4 * PREFIX_TOKENS // 256 + 16) / 64  # slots of 16 MiB: 4 prefixes + 16 turns
LOAD, RR_MISS_EST, CAL_ROUNDS = 0.9, 0.5, 3
BUSY, BUSY_TOKENS, PULL_TRIALS, PULL_MIN = 4, 2048, 6, 1024
ARMS, PULL = ("round-robin", "router", "oracle"), True  # all, but in a development run


def _rand(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 4000) for _ in range(n)]


def _workload(seed: int) -> list[tuple[int, list[int]]]:
    """The requests in arrival order: (prefix index, prompt)."""
    rng = random.Random(seed)
    prefixes = [_rand(rng, PREFIX_TOKENS) for _ in range(PREFIXES)]
    order = []
    for rounds in (WARMUP_ROUNDS, MEASURED_ROUNDS):
        block = [i % PREFIXES for i in range(rounds * PREFIXES)]
        rng.shuffle(block)
        order += block
    return [(i, prefixes[i] + _rand(rng, TURN_TOKENS)) for i in order]


def _ttft(url: str, model: str, prompt: list[int], out: dict | None = None) -> float:
    """Stream a completion; seconds to its first chunk (the answer is read to its end).
    ``out`` gets the router's headers."""
    return _timed(url, model, prompt, out)[0]


def _timed(url: str, model: str, prompt: list[int],
           out: dict | None = None) -> tuple[float, float]:
    """Stream a completion; seconds to its first chunk and to its end."""
    t0 = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}) as r:
        r.raise_for_status()
        if out is not None:
            out.update(engine=r.headers.get("x-kvmove-engine"),
                       route=r.headers.get("x-kvmove-route"))
        for line in r.iter_lines():
            if first is None and line.startswith("data: "):
                first = time.perf_counter() - t0
    if first is None:
        raise AssertionError("no streamed chunk")
    return first, time.perf_counter() - t0


def _prompt_tokens(url: str) -> dict[str, float]:
    """The engine's prompt-token counters: total, and cached by source."""
    out = {"total": 0.0, "device": 0.0, "host": 0.0, "other_cached": 0.0}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("vllm:prompt_tokens_total"):
            out["total"] += float(value)
        elif name.startswith("vllm:prompt_tokens_cached_by_source_total"):
            m = re.search(r'source="([^"]+)"', name)
            key = m.group(1) if m and m.group(1) in ("device", "host") else "other_cached"
            out[key] += float(value)
    return out


def _arm(pick, model: str, workload, rate: float, urls: list[str]):
    """Send the workload open-loop at ``rate``; ``pick(i, prefix)`` is the URL for request i.
    Returns TTFTs (arrival order), requests/s completed over the measured part, and the
    engines' prompt tokens (total, cached on device / host) during the arm."""
    ttfts = [0.0] * len(workload)
    ends = [0.0] * len(workload)
    where: list[str] = [""] * len(workload)

    def one(i: int) -> None:
        prefix, prompt = workload[i]
        url, info = pick(i, prefix), {}
        ttfts[i] = _ttft(url, model, prompt, info)
        ends[i] = time.perf_counter()
        where[i] = (f"{info['engine']}/{info['route']}" if info.get("engine")
                    else f"r{urls.index(url) + 1}")

    before = [_prompt_tokens(u) for u in urls]
    warm = WARMUP_ROUNDS * PREFIXES
    at = [i / rate for i in range(len(workload))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(128) as pool:
        futures = []
        for i in range(len(workload)):
            time.sleep(max(0.0, t0 + at[i] - time.perf_counter()))
            futures.append(pool.submit(one, i))
        for f in futures:
            f.result()
    rps = (len(workload) - warm) / (max(ends[warm:]) - (t0 + at[warm]))
    after = [_prompt_tokens(u) for u in urls]
    tokens = {k: sum(a[k] - b[k] for a, b in zip(after, before)) for k in after[0]}
    return ttfts, rps, tokens, where


def _preemptions(url: str) -> float:
    """The engine's ``vllm:num_preemptions_total`` (requests it preempted: out of KV blocks)."""
    return sum(float(line.rsplit(" ", 1)[1])
               for line in httpx.get(url + "/metrics", timeout=60).text.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


def _routing_seconds(url: str) -> tuple[float, float]:
    """The router's ``kvmove_router_routing_seconds``: (sum, count)."""
    total = count = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("kvmove_router_routing_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("kvmove_router_routing_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


def _reset_engine(ctl, iid: str, e, model: str) -> None:
    httpx.post(e.url + "/reset_prefix_cache", timeout=60).raise_for_status()
    httpx.post(ctl.url + "/clear", json={"instance_id": iid}, timeout=60).raise_for_status()
    # A step, so the engine publishes its reset (vLLM publishes KV events when it steps).
    httpx.post(e.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": [1, 2, 3], "max_tokens": 1}).raise_for_status()


def _busy(url: str, model: str, stop: threading.Event, rng: random.Random) -> None:
    """Keep one long generation running on ``url`` until ``stop``."""
    while not stop.is_set():
        try:
            with httpx.stream("POST", url + "/v1/completions", timeout=600, json={
                    "model": model, "prompt": _rand(rng, 64), "max_tokens": BUSY_TOKENS,
                    "ignore_eos": True, "temperature": 0, "stream": True}) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break
        except httpx.HTTPError:
            time.sleep(0.5)


def _wait_router(router, up: int = 2, busy: str | None = None, timeout: float = 60) -> None:
    """Until ``router`` sees ``up`` engines (and, with ``busy``, that engine's load ≥ BUSY-1)."""
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(router.url + "/health", timeout=10).json()
        ok = h.get("engines_up", 0) >= up
        if busy is not None:
            e = h.get("by_engine", {}).get(busy, {})
            ok = ok and e.get("inflight", 0) + e.get("others", 0) >= BUSY - 1
        if ok:
            return
        assert time.monotonic() < deadline, f"router never saw what it waited for: {h}"
        time.sleep(0.5)


def _ms(x: float) -> str:
    return f"{x * 1e3:.0f}"


def _summary(runs: list, workloads: list) -> dict:
    """One arm's figures over its repetitions (``runs[k]`` on ``workloads[k]``): measured
    p50/p90 and the warm-up's (pooled), requests/s (mean), the share of prompt tokens
    prefilled (the rest came from a cache) and from host stores, where requests went."""
    warm = WARMUP_ROUNDS * PREFIXES
    measured, warmup, rps = [], [], []
    tok = {"total": 0.0, "device": 0.0, "host": 0.0, "other_cached": 0.0}
    routes: dict[str, int] = {}
    split = 0
    for (t, r, tokens, where), workload in zip(runs, workloads):
        measured += t[warm:]
        warmup += t[:warm]
        rps.append(r)
        for k in tok:
            tok[k] += tokens[k]
        placed: dict[int, set[str]] = {}
        for (prefix, _), w in list(zip(workload, where))[warm:]:
            engine, _, route = w.partition("/")
            placed.setdefault(prefix, set()).add(engine)
            if route:
                routes[route] = routes.get(route, 0) + 1
        split = max(split, sum(len(v) > 1 for v in placed.values()))
    cached = tok["device"] + tok["host"] + tok["other_cached"]
    return {"p50": percentile(measured, 50), "p90": percentile(measured, 90),
            "warm_p50": percentile(warmup, 50), "warm_p90": percentile(warmup, 90),
            "rps": statistics.mean(rps), "prefilled": 1 - cached / tok["total"],
            "host": tok["host"] / tok["total"], "split": split, "routes": routes,
            "ttfts": measured}


def _describe(name: str, a: dict) -> str:
    split = "" if a["routes"] == {} else (
        f", routes {a['routes']}, at most {a['split']} of {PREFIXES} prefixes sent to both "
        f"engines in a repetition, the router's own time (tokens, lookup) "
        f"{a['routing_ms']:.1f} ms a request")
    return (f"{name}: p50/p90 {_ms(a['p50'])}/{_ms(a['p90'])} ms (warm-up "
            f"{_ms(a['warm_p50'])}/{_ms(a['warm_p90'])}), {a['rps']:.2f} req/s, "
            f"{a['prefilled']:.0%} of prompt tokens prefilled, {a['host']:.0%} from host "
            f"stores{split}")


def run() -> list[Result]:
    t_start = time.monotonic()
    model = str(make_model(MODEL[0], **MODEL[1]))
    cluster = LocalCluster(model, WORK / "p9")
    stop_busy = threading.Event()
    try:
        port, pull, reply = free_port(), free_port(), free_port()
        ctl = cluster.start_controller(port, pull, reply)
        engines = {}
        for cpu, iid in enumerate(("r1", "r2")):
            http = free_port()
            kv = connector_config(iid, http, pull, reply, max_local_cpu_size=HOST_GIB)
            events = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"tcp://*:{free_port()}", "topic": f"kv@{iid}@bench"}
            engines[iid] = cluster.start_engine(
                iid, http, cpu=cpu, extra_config=kv,
                max_model_len=max(4096, PREFIX_TOKENS + 256),
                env={"VLLM_SERVER_DEV_MODE": "1"},
                extra_args=["--kv-events-config", json.dumps(events),
                            "--num-gpu-blocks-override", str(GPU_BLOCKS)])
        cluster.wait_ready(ctl, timeout=60)  # a router exits if it cannot read it at start

        def start_router(*args: str):
            proc = cluster.start_router(free_port(), ["--controller", ctl.url,
                                                      "--log-level", "warning", *args])
            cluster.wait_ready(proc, timeout=60)
            _wait_router(proc)
            return proc

        for e in engines.values():
            cluster.wait_ready(e, timeout=400)
        router = start_router()
        urls = [engines["r1"].url, engines["r2"].url]
        warm = WARMUP_ROUNDS * PREFIXES

        def cold() -> None:
            for iid, e in engines.items():
                _reset_engine(ctl, iid, e, model)
            time.sleep(1.0)

        # -- calibration: both engines at once (as in the arms: both cores busy) -----------
        rng = random.Random(99)
        cal: dict[str, list[tuple[float, float]]] = {"cold": [], "gpu_hit": [], "host_hit": []}

        def both(kind: str, prompts: list[list[int]]) -> None:
            with ThreadPoolExecutor(2) as pool:
                cal[kind] += list(pool.map(lambda a: _timed(a[0], model, a[1]),
                                           zip(urls, prompts)))

        for _ in range(CAL_ROUNDS):
            bases = [_rand(rng, PREFIX_TOKENS) for _ in urls]
            both("cold", [b + _rand(rng, TURN_TOKENS) for b in bases])
            both("gpu_hit", [b + _rand(rng, TURN_TOKENS) for b in bases])
            for u in urls:
                httpx.post(u + "/reset_prefix_cache", timeout=60).raise_for_status()
            both("host_hit", [b + _rand(rng, TURN_TOKENS) for b in bases])
        med = {k: (statistics.median(t for t, _ in v), statistics.median(d for _, d in v))
               for k, v in cal.items()}
        (c, c_all), (h, h_all), (hh, _) = med["cold"], med["gpu_hit"], med["host_hit"]
        rr_capacity = 2 / (RR_MISS_EST * c_all + (1 - RR_MISS_EST) * h_all)
        rate = LOAD * rr_capacity
        calib = (f"calibration (both engines at once, medians of {2 * CAL_ROUNDS}): cold "
                 f"{PREFIX_TOKENS + TURN_TOKENS}-token prompt TTFT {_ms(c)} ms ({_ms(c_all)} ms "
                 f"to its last token), GPU prefix-cache hit {_ms(h)} ms ({_ms(h_all)}), "
                 f"host-store hit {_ms(hh)} ms; round-robin capacity est. "
                 f"2/({RR_MISS_EST}·cold + {1 - RR_MISS_EST}·hit, to the last token) = "
                 f"{rr_capacity:.2f} req/s; rate {LOAD}× that = {rate:.2f} req/s")
        print(f"[P9] {calib}", flush=True)

        # -- the arms, A B C C B A ... ------------------------------------------------------
        arms = {"round-robin": lambda i, prefix: urls[i % 2],
                "router": lambda i, prefix: router.url,
                "oracle": lambda i, prefix: urls[prefix % 2]}
        names = [n for n in arms if n in ARMS]
        order = [n for k in range(REPEATS) for n in (names if k % 2 == 0 else names[::-1])]
        runs: dict[str, list] = {n: [] for n in names}
        workloads = [_workload(7 + k) for k in range(REPEATS)]
        routing = [0.0, 0.0]  # the router's own time: seconds, requests
        for k, name in enumerate(order):
            workload = workloads[len(runs[name])]
            cold()
            t0 = time.monotonic()
            before = _routing_seconds(router.url)
            runs[name].append(_arm(arms[name], model, workload, rate, urls))
            if name == "router":
                after = _routing_seconds(router.url)
                routing = [routing[0] + after[0] - before[0], routing[1] + after[1] - before[1]]
            t, _, _, where = runs[name][-1]
            a = _summary(runs[name][-1:], [workload])
            a["routing_ms"] = 1e3 * routing[0] / max(1.0, routing[1])
            print(f"[P9] {k + 1}/{len(order)} {_describe(name, a)}; "
                  f"{time.monotonic() - t0:.0f} s", flush=True)
            print(f"[P9] {name}, each request (prefix:engine/route:ms): " + " ".join(
                f"{p}:{w}:{t[i] * 1e3:.0f}" for i, ((p, _), w) in enumerate(zip(workload, where))),
                flush=True)
        summary = {n: _summary(runs[n], workloads[:len(runs[n])]) for n in names}
        for a in summary.values():
            a["routing_ms"] = 1e3 * routing[0] / max(1.0, routing[1])

        # -- pull-on-route, one engine busy ----------------------------------------------
        pull_result = None
        try:
            if not PULL:
                raise RuntimeError("skipped")
            puller = start_router("--pull-min-tokens", str(PULL_MIN), "--pull-wait", "10")
            cold()
            held = [_rand(rng, PREFIX_TOKENS) for _ in range(2)]
            for p in held:  # on r1 only: its GPU cache and its host store
                _ttft(urls[0], model, p + _rand(rng, TURN_TOKENS))
            for k in range(BUSY):
                threading.Thread(target=_busy, daemon=True, args=(
                    urls[0], model, stop_busy, random.Random(1000 + k))).start()
            _wait_router(router, busy="r1")
            _wait_router(puller, busy="r1")
            time.sleep(2.0)
            pt: dict[str, list[float]] = {"pull off": [], "pull on": [], "straight to holder": []}
            pr: dict[str, list[str]] = {k: [] for k in pt}
            targets = {"pull off": router.url, "pull on": puller.url,
                       "straight to holder": urls[0]}
            preempted = _preemptions(urls[0])
            for k in range(PULL_TRIALS):
                for name in (list(pt) if k % 2 == 0 else list(pt)[::-1]):
                    info: dict = {}
                    pt[name].append(_ttft(targets[name], model,
                                          held[k % 2] + _rand(rng, TURN_TOKENS), info))
                    pr[name].append(f"{info.get('engine') or 'r1'}/{info.get('route') or '-'}")
                    _reset_engine(ctl, "r2", engines["r2"], model)
                    time.sleep(1.0)
            pull_result = (pt, pr, _preemptions(urls[0]) - preempted)
            print(f"[P9] busy holder preempted {pull_result[2]:.0f} requests", flush=True)
            for name in pt:
                print(f"[P9] busy holder, {name}: TTFT median "
                      f"{_ms(statistics.median(pt[name]))} ms, max {_ms(max(pt[name]))} ms, "
                      f"{pr[name]}", flush=True)
        except Exception as err:  # noqa: BLE001 - report the main arms even so
            print(f"[P9] pull-on-route part failed: {err!r}", flush=True)
        finally:
            stop_busy.set()

        # -- results ---------------------------------------------------------------------
        rr, rt, orc = summary["round-robin"], summary["router"], summary["oracle"]
        overloaded = [n for n, a in summary.items() if a["rps"] < 0.95 * rate]
        notes = ("; ".join(_describe(n, a) for n, a in summary.items()) +
                 f". Each arm {REPEATS}× (order {', '.join(order)}), each time from cold: "
                 f"{warm} warm-up requests (the cold start: not in p50/p90), then "
                 f"{MEASURED_ROUNDS * PREFIXES} measured, open-loop at {rate:.2f}/s"
                 + (f" (below it, so overloaded: {', '.join(overloaded)})" if overloaded else "")
                 + f"; {PREFIXES} prefixes of {PREFIX_TOKENS} tokens + {TURN_TOKENS}-token "
                 f"turns, max_tokens {MAX_TOKENS}; model {MODEL[0]} (64 KiB of KV per token); "
                 f"per engine {GPU_BLOCKS} KV blocks of 128 tokens + a {HOST_GIB} GiB host "
                 f"store (together about 4 of the 8 prefixes). {calib}. Whole P9 run "
                 f"{time.monotonic() - t_start:.0f} s.")
        trials = {f"{n}_ttft_s": [t for run in runs[n] for t in run[0]] for n in names}
        trials["calibration_ttft_s"] = [t for v in cal.values() for t, _ in v]
        base = {"round_robin_p90_ms": rr["p90"] * 1e3, "round_robin_p50_ms": rr["p50"] * 1e3,
                "router_p50_ms": rt["p50"] * 1e3, "rate_rps": rate}
        results = [
            Result(id="P9-vs-round-robin", measure="TTFT p90, router vs round-robin",
                   value=rt["p90"] * 1e3, unit="ms", baseline=base,
                   ratio=rr["p90"] / rt["p90"], goal="≥ 10× lower than round-robin",
                   met=rr["p90"] / rt["p90"] >= 10, trials=trials, notes=notes),
            Result(id="P9-vs-oracle", measure="TTFT p90, router vs an oracle (static "
                   "placement, no proxy)", value=rt["p90"] * 1e3, unit="ms",
                   baseline={"oracle_p90_ms": orc["p90"] * 1e3, "oracle_p50_ms": orc["p50"] * 1e3},
                   ratio=rt["p90"] / orc["p90"], goal="≤ 1.2× the oracle",
                   met=rt["p90"] / orc["p90"] <= 1.2, notes=notes)]
        if pull_result is not None:
            pt, pr, preempted = pull_result
            off, on = statistics.median(pt["pull off"]), statistics.median(pt["pull on"])
            direct = statistics.median(pt["straight to holder"])
            results.append(Result(
                id="P9-pull", measure="TTFT of a prefix held by a busy engine, router with "
                "pull-on-route vs without (median)", value=on * 1e3, unit="ms",
                baseline={"pull_off_ms": off * 1e3, "straight_to_busy_holder_ms": direct * 1e3},
                ratio=off / on, goal="—", met=True,
                trials={f"{k}_ttft_s": v for k, v in pt.items()},
                notes=(f"engine r1 holds the prefix (GPU cache and host store) and runs {BUSY} "
                       f"long generations (64-token prompts, max_tokens {BUSY_TOKENS}) sent "
                       f"straight to it; {PULL_TRIALS} trials, each a new turn after one of "
                       f"two such prefixes, through a router without pull-on-route, one with "
                       f"--pull-min-tokens {PULL_MIN}, and straight to r1; r2's caches emptied "
                       f"after each. Max TTFT: pull off {_ms(max(pt['pull off']))} ms, pull "
                       f"on {_ms(max(pt['pull on']))} ms, straight to the holder "
                       f"{_ms(max(pt['straight to holder']))} ms; the holder preempted "
                       f"{preempted:.0f} requests during the trials (vLLM preempts when out of "
                       f"KV blocks: {BUSY} generations of up to {64 + BUSY_TOKENS} tokens take "
                       f"up to {BUSY * -(-(64 + BUSY_TOKENS) // 128)} blocks of its "
                       f"{GPU_BLOCKS}). Where each went (engine/route): {pr}")))
        return results
    finally:
        stop_busy.set()
        cluster.stop_all()


if __name__ == "__main__":
    for r in run():
        print(r.id, r.value, r.ratio, r.notes)
