"""P3b: a fleet-sized index — 10,000,000 chunk keys over 1,000 instances. Goals (issue 16):
``/lookup`` p99 < 1 ms, controller RSS < 2 GiB, and a 1M-key snapshot (one instance's
resync) registered without stalling lookups for more than 50 ms.

Set-up: P3's (``p3_fleet``), ten times larger — a real controller process; 1,000 simulated
sidecars (``sim-000``..``sim-999``, 10,000 keys each, 300,000 prefixes drawn to be shared by
2-12 instances, at most 5,000 shared keys per instance), served by one thread in a child
process (so the timing client shares no interpreter lock with them), heartbeats spread evenly
over each second as independent sidecars' are. Token ids come from SHAKE-128 of the prefix id
(P3's ``random.Random`` seeding costs 70 µs a prefix; 2.75 M prefixes here), keys from
:func:`chunk_spans` as everywhere; the encoded fleet is cached under ``.work/bench``.

Measures, per controller arm (``--baseline REF``: first an arm whose controller runs the
``sidecar``/``vllm_kvmove`` packages of commit REF, then this checkout's, in one run):

* time to index the fleet, and the controller's RSS (``VmRSS``) once indexed; its peak
  (``VmHWM``) over the arm;
* 5,000 sequential ``POST /lookup`` (P3's mix, 500 warm-ups first) over one keep-alive
  connection of ``common.RawHttp``, interleaved with ``GET /health`` (the HTTP floor); every
  answer checked;
* the stall: a 1,001st instance (``big-1m``, 1,000,000 keys of its own) registers with snapshot
  A, then resyncs three times (B, A, B: B lacks the last two chunks of a marker prefix that A
  holds whole) while a probe thread sends lookups back to back (the marker's, alternating with
  P3's mix). A snapshot counts as applied when the marker's answer flips; the stall is the
  longest lookup overlapping ``[snapshot sent, applied + 1 s]``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import multiprocessing
import os
import pickle
import random
import re
import sys
import threading
import time
from array import array
from pathlib import Path

import httpx

from common import REPO, WORK, RawHttp, Result, percentile, write_results
from p3_fleet import (CHUNK, PROMPT_CHUNKS, PROMPT_TOKENS, Encoded, Holdings, SimProcess,
                      answer, close_all, controller_tree, encode_fleet, free_ports, lookup_body,
                      prefix_keys, rss_bytes, start_controller, wait_indexed, workload)
from sidecar import protocol
from tests.harness.processes import LocalCluster

# P3B_SCALE=0.02 (say) shrinks the fleet and the big instance, to check the machinery quickly.
SCALE = float(os.environ.get("P3B_SCALE", "1"))
N_INSTANCES = max(2, int(1_000 * SCALE))
KEYS_PER_INSTANCE = 10_000
N_SHARED = int(300_000 * SCALE)
SHARED_CAP = 5_000
BIG = "big-1m"
BIG_KEYS = max(1_000, int(1_000_000 * SCALE)) // PROMPT_CHUNKS * PROMPT_CHUNKS
BIG_FIRST_PID = 10_000_000_000  # the big instance's prefixes: ids from here (none above it)
N_LOOKUPS = 5_000
N_WARMUP = 500
N_PROBE_MIX = 2_000
RESYNCS = (("A", True), ("B", False), ("A", False), ("B", False))  # (snapshot, with Register)
AFTER_S = 1.0
INDEX_TIMEOUT_S = 240  # the stall window goes on this long after a snapshot is applied
GOAL_P99_MS = 1.0
GOAL_RSS = 2 << 30
GOAL_STALL_MS = 50.0
CACHE_VERSION = 2


def _tokens(pid: int) -> list[int]:
    """1,024 deterministic token ids (< 65,536) of prefix ``pid``."""
    return list(array("H", hashlib.shake_128(b"p3b" + pid.to_bytes(8, "little"))
                      .digest(2 * PROMPT_TOKENS)))


def _keys_batch(pids: list[int]) -> bytes:
    return b"".join(k for pid in pids for k in prefix_keys(_tokens(pid)))


def _keys(pids: list[int]) -> dict[int, list[bytes]]:
    """Every prefix's 4 keys, on two worker processes."""
    batches = [pids[i:i + 5_000] for i in range(0, len(pids), 5_000)]
    out: dict[int, list[bytes]] = {}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        for batch, raw in zip(batches, pool.imap(_keys_batch, batches)):
            step = 16 * PROMPT_CHUNKS
            for j, pid in enumerate(batch):
                out[pid] = [raw[j * step + 16 * c: j * step + 16 * (c + 1)]
                            for c in range(PROMPT_CHUNKS)]
    return out


def _cache_paths() -> tuple[Path, Path]:
    # The fleet's messages are encoded in this checkout's protocol: a cache per version.
    tag = (f"p3b-v{CACHE_VERSION}-p{protocol.PROTOCOL_VERSION}-{N_INSTANCES}x"
           f"{KEYS_PER_INSTANCE}-{N_SHARED}-{BIG_KEYS}")
    return WORK / f"{tag}-fleet.pkl", WORK / f"{tag}-meta.pkl"


def _build(fleet_path: Path, meta_path: Path) -> None:
    """Draw the holdings, encode every sidecar's messages (the fleet, for the simulated
    sidecars) and the lookups with their expected answers (the meta, for the client)."""
    t0 = time.monotonic()
    h = Holdings(N_INSTANCES, KEYS_PER_INSTANCE, N_SHARED, SHARED_CAP, _tokens, keys=_keys)
    rng = random.Random(11)
    warm = workload(h, N_WARMUP, rng)
    work = workload(h, N_LOOKUPS, rng)
    mix = workload(h, N_PROBE_MIX, rng)
    fleet = encode_fleet(h)
    meta = {"distinct_keys": h.distinct_keys, "total_keys": h.total_keys,
            "shared": len(h.shared), "private": len(h.private), "warm": warm, "work": work,
            "mix": mix}
    del h
    # The big instance: 250,000 prefixes of its own; B swaps the marker's last two chunks for
    # the first two of one more prefix (both snapshots 1,000,000 keys).
    pids = list(range(BIG_FIRST_PID, BIG_FIRST_PID + BIG_KEYS // PROMPT_CHUNKS + 1))
    keys = _keys(pids)
    marker, extra = pids[0], pids[-1]
    a = [(k, CHUNK) for pid in pids[:-1] for k in keys[pid]]
    b = a[:2] + a[4:] + [(k, CHUNK) for k in keys[extra][:2]]
    assert len(a) == len(b) == BIG_KEYS
    fleet[BIG] = Encoded(BIG, N_INSTANCES, {"A": a, "B": b}, "big", at_start=False)
    meta["marker"] = lookup_body(_tokens(marker))
    fleet_path.parent.mkdir(parents=True, exist_ok=True)
    with open(fleet_path.with_suffix(".tmp"), "wb") as f:
        pickle.dump(fleet, f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(meta_path, "wb") as f:
        pickle.dump(meta, f, protocol=pickle.HIGHEST_PROTOCOL)
    fleet_path.with_suffix(".tmp").rename(fleet_path)
    print(f"[p3b] fleet built in {time.monotonic() - t0:.0f} s", flush=True)


def _fleet() -> tuple[Path, dict]:
    fleet_path, meta_path = _cache_paths()
    if not fleet_path.exists():
        # In a child process: the holdings' ~2 GB of Python objects die with it.
        p = multiprocessing.get_context("spawn").Process(target=_build,
                                                         args=(fleet_path, meta_path))
        p.start()
        p.join()
        assert p.exitcode == 0 and fleet_path.exists(), f"building the fleet failed ({p.exitcode})"
    with open(meta_path, "rb") as f:
        return fleet_path, pickle.load(f)


class Probe(threading.Thread):
    """Lookups back to back on their own connection: the marker's, alternating with P3's mix.
    Records (start, seconds, marker answer or None) of each."""

    def __init__(self, port: int, marker: bytes, mix: list[tuple[bytes, dict[str, int]]]):
        super().__init__(name="p3b-probe", daemon=True)
        self.raw = RawHttp(port)
        self.marker, self.mix = marker, mix
        self.log: list[tuple[float, float, int | None]] = []
        self.wrong = 0
        self.stop = threading.Event()

    def run(self) -> None:
        perf, i = time.perf_counter, 0
        while not self.stop.is_set():
            body, expect = self.mix[i % len(self.mix)]
            i += 1
            t = perf()
            got = self.raw.post("/lookup", body)
            self.log.append((t, perf() - t, None))
            if answer(got) != expect:
                self.wrong += 1
            t = perf()
            got = self.raw.post("/lookup", self.marker)
            self.log.append((t, perf() - t, answer(got).get(BIG, 0)))
        self.raw.close()

    def applied(self, since: float, tokens: int) -> float | None:
        """When (perf_counter) the first lookup started after ``since`` that saw the marker
        at ``tokens`` tokens ended, or None."""
        first = None
        for t, d, m in reversed(self.log[:]):
            if t < since:
                break
            if m == tokens:
                first = t + d
        return first


def _arm(label: str, tree: Path | None, fleet_path: Path, meta: dict) -> dict:
    port, pull, reply = free_ports(3)
    cluster = LocalCluster("unused", WORK / f"p3b-{label}")
    sims: SimProcess | None = None
    client: httpx.Client | None = None
    raw: RawHttp | None = None
    probe: Probe | None = None
    out: dict = {"label": label, "tree": str(tree) if tree else "this checkout"}
    try:
        ctl = start_controller(cluster, (port, pull, reply), tree)
        t0 = time.monotonic()
        sims = SimProcess(fleet_path, f"tcp://127.0.0.1:{reply}")
        client = httpx.Client(base_url=f"http://localhost:{port}", timeout=10)
        if wait_indexed(client, N_INSTANCES, KEYS_PER_INSTANCE, meta["distinct_keys"],
                        sims.stats, timeout=INDEX_TIMEOUT_S, raise_on_timeout=False) is None:
            mem = rss_bytes(ctl.pid)
            out.update(indexed=False, index_s=None, rss_indexed=mem["VmRSS"],
                       rss_peak=mem["VmHWM"], acks_resyncs_dropped=sims.stats())
            print(f"[p3b] {label}: not indexed in {INDEX_TIMEOUT_S} s (acks, resyncs, dropped "
                  f"sends: {out['acks_resyncs_dropped']}); RSS {mem['VmRSS'] / (1 << 30):.2f} "
                  f"GiB (peak {mem['VmHWM'] / (1 << 30):.2f})", flush=True)
            return out
        out["indexed"] = True
        out["index_s"] = time.monotonic() - t0
        time.sleep(2)  # let the last snapshots' garbage go
        out["rss_indexed"] = rss_bytes(ctl.pid)["VmRSS"]
        raw = RawHttp(port)
        for body, expect in meta["warm"]:
            assert answer(raw.post("/lookup", body)) == expect
        gc.collect()
        gc.freeze()
        lat, lat_health, got = [], [], []
        perf = time.perf_counter
        load0 = os.getloadavg()[0]
        for body, _ in meta["work"]:
            t = perf()
            got.append(raw.post("/lookup", body))
            lat.append(perf() - t)
            t = perf()
            raw.get("/health")
            lat_health.append(perf() - t)
        out["load"] = (load0, os.getloadavg()[0])
        gc.unfreeze()
        wrong = sum(answer(g) != e for g, (_, e) in zip(got, meta["work"]))
        assert wrong == 0, f"{wrong} of {len(got)} /lookup answers differ from the holdings"
        ms = [x * 1000 for x in lat]
        hms = [x * 1000 for x in lat_health]
        out.update(p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99),
                   p999_ms=percentile(ms, 99.9), max_ms=max(ms),
                   health_p50_ms=percentile(hms, 50), health_p99_ms=percentile(hms, 99),
                   lookup_ms=ms, health_ms=hms, rss_after_lookups=rss_bytes(ctl.pid)["VmRSS"])

        # The stall: a 1M-key instance registers, then resyncs, under a stream of lookups.
        probe = Probe(port, meta["marker"], meta["mix"])
        probe.start()
        time.sleep(1.0)
        events = []
        for name, register in RESYNCS:
            want = PROMPT_TOKENS if name == "A" else 2 * CHUNK
            t_send = perf()
            sims.send_snapshot(BIG, name, register)
            deadline = time.monotonic() + 120
            applied = None
            while applied is None:
                assert time.monotonic() < deadline, f"snapshot {name} never applied"
                time.sleep(0.05)
                applied = probe.applied(t_send, want)
            time.sleep(AFTER_S)
            end = applied + AFTER_S
            window = [d * 1000 for t, d, _ in list(probe.log) if t + d >= t_send and t <= end]
            events.append({"snapshot": name, "register": register,
                           "applied_s": applied - t_send, "stall_ms": max(window),
                           "p99_ms": percentile(window, 99), "lookups": len(window),
                           "rss": rss_bytes(ctl.pid)["VmRSS"]})
            print(f"[p3b] {label}: snapshot {name}{' (register)' if register else ''} applied "
                  f"in {applied - t_send:.3f} s, longest lookup {max(window):.1f} ms", flush=True)
        probe.stop.set()
        probe.join(10)
        assert probe.wrong == 0, f"{probe.wrong} probe answers differ from the holdings"
        mem = rss_bytes(ctl.pid)
        out.update(events=events, stall_ms=max(e["stall_ms"] for e in events),
                   rss_end=mem["VmRSS"], rss_peak=mem["VmHWM"],
                   acks_resyncs_dropped=sims.stats())
    finally:
        if probe is not None:
            probe.stop.set()
            probe.join(10)
        close_all(raw, client, sims)
        cluster.stop_all()
    gib = 1 << 30
    print(f"[p3b] {label}: indexed in {out['index_s']:.1f} s, RSS {out['rss_indexed'] / gib:.2f}"
          f" GiB (peak {out['rss_peak'] / gib:.2f}); lookup p50 {out['p50_ms']:.3f} / p99 "
          f"{out['p99_ms']:.3f} / max {out['max_ms']:.1f} ms; stall {out['stall_ms']:.1f} ms",
          flush=True)
    return out


def run(baseline: str | None = os.environ.get("P3B_BASELINE")) -> list[Result]:
    """P3b against this checkout's controller, after one from commit ``baseline`` if given."""
    fleet_path, meta = _fleet()
    arms = []
    if baseline:
        tree = controller_tree(baseline)
        theirs = re.search(r"^PROTOCOL_VERSION = (\d+)",
                           (tree / "sidecar" / "protocol.py").read_text(), re.M)
        if theirs is None or int(theirs.group(1)) != protocol.PROTOCOL_VERSION:
            # The simulated sidecars speak this checkout's protocol; a controller of another
            # version refuses them.
            print(f"[p3b] no before arm: {baseline} speaks protocol "
                  f"{theirs.group(1) if theirs else '?'}, this checkout "
                  f"{protocol.PROTOCOL_VERSION}", flush=True)
            baseline = None
        else:
            arms.append(_arm(f"before-{baseline}", tree, fleet_path, meta))
    arms.append(_arm("this", None, fleet_path, meta))
    now, before = arms[-1], (arms[0] if baseline else None)
    assert now["indexed"], "this checkout's controller did not index the fleet"
    gib = 1 << 30
    base: dict[str, float] = {}
    if before is not None:
        base = {"before_rss_gib": before["rss_indexed"] / gib,
                "before_rss_peak_gib": before["rss_peak"] / gib}
        if before["indexed"]:
            base.update(before_p50_ms=before["p50_ms"], before_p99_ms=before["p99_ms"],
                        before_stall_ms=before["stall_ms"], before_index_s=before["index_s"])
    figures = {"p50_ms": now["p50_ms"], "p99_ms": now["p99_ms"], "p999_ms": now["p999_ms"],
               "max_ms": now["max_ms"], "health_p50_ms": now["health_p50_ms"],
               "health_p99_ms": now["health_p99_ms"], "rss_gib": now["rss_indexed"] / gib,
               "rss_peak_gib": now["rss_peak"] / gib, "stall_ms": now["stall_ms"],
               "index_s": now["index_s"], **base}
    done = [a for a in arms if a["indexed"]]
    trials = {f"{a['label']}_lookup_ms": a["lookup_ms"] for a in done}
    trials.update({f"{a['label']}_stall_ms": [e["stall_ms"] for e in a["events"]] for a in done})
    trials.update({f"{a['label']}_applied_s": [e["applied_s"] for e in a["events"]]
                   for a in done})

    def describe(a: dict) -> str:
        if not a["indexed"]:
            return (f"{a['label']} ({a['tree']}): NOT indexed in {INDEX_TIMEOUT_S} s (acks, "
                    f"resyncs, dropped sends {a['acks_resyncs_dropped']}), RSS then "
                    f"{a['rss_indexed'] / gib:.2f} GiB, peak {a['rss_peak'] / gib:.2f}")
        return (f"{a['label']} ({a['tree']}): indexed in {a['index_s']:.1f} s, RSS "
                f"{a['rss_indexed'] / gib:.2f} GiB after indexing, {a['rss_end'] / gib:.2f} at "
                f"the end (11M keys), peak {a['rss_peak'] / gib:.2f}; p50/p99/max "
                f"{a['p50_ms']:.3f}/{a['p99_ms']:.3f}/{a['max_ms']:.1f} ms (GET /health p50 "
                f"{a['health_p50_ms']:.3f}); snapshots applied in "
                + ", ".join(f"{e['applied_s']:.2f} s (longest lookup {e['stall_ms']:.1f} ms)"
                            for e in a["events"])
                + f"; load {a['load'][0]:.1f}/{a['load'][1]:.1f}")

    notes = (f"{N_INSTANCES:,} simulated sidecars x {KEYS_PER_INSTANCE:,} keys "
             f"({meta['distinct_keys']:,} distinct; {meta['shared']:,} shared prefixes, "
             f"{meta['private']:,} private), heartbeats spread over each second; lookups as P3 "
             f"(raw client); stall: {BIG} (1,000,000 keys) registers then resyncs 3 times under "
             f"back-to-back lookups. Arms: " + "; ".join(describe(a) for a in arms))

    def ratio(key: str, of: str | None = None) -> float | None:
        if before is None or (of is None and not before["indexed"]):
            return None
        return now[key] / before[of or key]

    return [
        Result(id="P3b", measure="controller /lookup p99, 10M keys over 1,000 instances",
               value=now["p99_ms"], unit="ms", baseline=figures, ratio=ratio("p99_ms"),
               goal="p99 < 1 ms", met=now["p99_ms"] < GOAL_P99_MS, trials=trials, notes=notes),
        Result(id="P3b-rss", measure="controller RSS with 10M keys indexed",
               value=now["rss_indexed"] / gib, unit="GiB", baseline=figures,
               ratio=ratio("rss_indexed", "rss_indexed"), goal="< 2 GiB",
               met=now["rss_indexed"] < GOAL_RSS and now["rss_peak"] < GOAL_RSS, notes=notes),
        Result(id="P3b-stall", measure="longest /lookup while a 1M-key snapshot is applied",
               value=now["stall_ms"], unit="ms", baseline=figures, ratio=ratio("stall_ms"),
               goal="< 50 ms", met=now["stall_ms"] < GOAL_STALL_MS, notes=notes)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="also run a controller of this commit first")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "p3b-latest.json"))
    args = ap.parse_args()
    results = run(args.baseline)
    write_results(results, Path(args.out))
    for r in results:
        print(f"[p3b] {r.id}: {r.value:.4g} {r.unit} (ratio {r.ratio}), goal {r.goal}: "
              f"{'met' if r.met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
