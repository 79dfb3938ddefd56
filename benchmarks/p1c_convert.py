"""P1c — what converting between formats costs a move: 1 GiB of KV (a 16-layer, 8-KV-head,
head-dim-128 bf16 model, ``cpu_attn/amx`` packing) moved between standalone sidecar processes
(real stores, NIXL agents, controller), POST /move → done, in one run with:

* a twin move (same format both ends: bytes as they are) — the baseline of the conversion's
  own cost;
* TP=2 → TP=1 (two source ranks of 4 heads each, one destination of 8: heads joined, the
  head-slab path);
* 128-token blocks → 32-token blocks (TP=1 both: the canonical path, unpack then pack);
* a single-thread memcpy of the same bytes.

Each trial copies (the source keeps its chunks), then clears the destination; trial 0 warms
the destinations' pools and staging buffers and is not counted. A conversion reads the
source's shards into a staging buffer, verifies them, then converts into the slot: it is
paid once, at move time — the destination stores its own format, so loading the moved KV
(TTFT, P2) costs what it costs after a twin move.
"""

from __future__ import annotations

import ctypes
import os
import time

import httpx
import torch

from common import WORK, Result, median
from sidecar.protocol import LOCATION as LOC
from tests.harness.processes import LocalCluster
from vllm_kvmove.layout import KVLayout

BASE = dict(model="bench-64k", dtype="bfloat16", num_layers=16, head_size=128, chunk_size=256,
            backend="cpu_attn/amx", total_kv_heads=8)
ONE = KVLayout(num_kv_heads=8, block_size=128, **BASE)  # TP=1, 128-token blocks
RANK = KVLayout(num_kv_heads=4, block_size=128, **BASE)  # a rank of TP=2
SMALL_BLOCKS = KVLayout(num_kv_heads=8, block_size=32, **BASE)
NUM_TOKENS = 16384  # 1 GiB at 64 KiB per token
TRIALS = 5


def _config(iid: str, port: int, gib: float) -> dict:
    return {"instance_id": iid, "controller_pull_url": "localhost:24300",
            "controller_reply_url": "localhost:24400", "sidecar_port": port,
            "p2p_init_port": port - 300, "chunk_size": 256, "max_local_cpu_size": gib,
            "heartbeat_interval_s": 0.5}


def run() -> list[Result]:
    cluster = LocalCluster("unused", WORK / "p1c")
    try:
        ctl = cluster.start_controller(24900, 24300, 24400)
        cluster.wait_ready(ctl, timeout=30)
        fill = [f"1:0:{NUM_TOKENS}"]
        procs = [
            cluster.start_sidecar_process(_config("c-src", 24501, 1.1), ONE.to_dict(), fill),
            cluster.start_sidecar_process(_config("c-tp2", 24502, 0.6), RANK.to_dict(), fill,
                                          rank=0, world_size=2),
            cluster.start_sidecar_process(_config("c-tp2", 24503, 0.6), RANK.to_dict(), fill,
                                          rank=1, world_size=2),
            cluster.start_sidecar_process(_config("c-twin", 24504, 1.1), ONE.to_dict()),
            cluster.start_sidecar_process(_config("c-one", 24505, 1.1), ONE.to_dict()),
            cluster.start_sidecar_process(_config("c-small", 24506, 1.1),
                                          SMALL_BLOCKS.to_dict())]
        for p in procs:
            cluster.wait_ready(p, timeout=120)
        http = httpx.Client(base_url=ctl.url, timeout=120)
        tokens = list(range(NUM_TOKENS))
        deadline = time.monotonic() + 90
        while True:
            held = http.post("/lookup", json={"tokens": tokens}).json()["layout_info"]
            if all(held.get(i, [0, 0])[1] == NUM_TOKENS for i in ("c-src", "c-tp2")):
                break
            assert time.monotonic() < deadline, f"sources never registered their chunks: {held}"
            time.sleep(0.2)
        time.sleep(3)  # the sources' background checksums
        paths = {"twin": ("c-src", "c-twin"), "tp2-to-tp1": ("c-tp2", "c-one"),
                 "blocks-128-to-32": ("c-src", "c-small")}
        moves: dict[str, list[float]] = {k: [] for k in paths}
        nbytes: dict[str, int] = {}
        a = torch.empty(ONE.chunk_bytes * (NUM_TOKENS // ONE.chunk_size), dtype=torch.uint8)
        b = torch.empty_like(a)
        a.fill_(1)
        b.fill_(2)
        copies = []
        for trial in range(TRIALS + 1):
            for name, (src, dst) in paths.items():
                t0 = time.perf_counter()
                r = http.post("/move", params={"wait": 60}, json={
                    "old_position": [src, LOC], "new_position": [dst, LOC], "tokens": tokens,
                    "copy": True})
                took = time.perf_counter() - t0
                st = r.json()
                assert r.status_code == 200 and st["status"] == "done", st
                nbytes[name] = st["bytes"]
                if trial:
                    moves[name].append(took)
                assert http.post("/clear", json={"instance_id": dst}).status_code == 200
            t0 = time.perf_counter()
            ctypes.memmove(b.data_ptr(), a.data_ptr(), nbytes["twin"])
            copies.append(time.perf_counter() - t0)
        copy_s, twin_s = median(copies), median(moves["twin"])
        out = []
        for name, what in (("tp2-to-tp1", "TP=2 → TP=1, heads joined"),
                           ("blocks-128-to-32",
                            "128-token blocks → 32-token blocks, canonical path")):
            move_s = median(moves[name])
            out.append(Result(
                id=f"P1c-{name}", measure=f"move throughput with conversion, 1 GiB, {what}",
                value=nbytes[name] / move_s / 1e9, unit="GB/s",
                baseline={"memcpy_GB/s": nbytes["twin"] / copy_s / 1e9,
                          "twin_move_GB/s": nbytes["twin"] / twin_s / 1e9, "bytes": nbytes[name]},
                ratio=(nbytes[name] / move_s) / (nbytes["twin"] / twin_s),
                goal="reported (ratio: of a twin move's throughput)", met=True,
                trials={"move_s": moves[name], "twin_move_s": moves["twin"], "memcpy_s": copies},
                notes=f"memcpy ratio {(nbytes[name] / move_s) / (nbytes['twin'] / copy_s):.2f}; "
                      f"standalone sidecars; copy then clear per trial"))
        return out
    finally:
        cluster.stop_all()


if __name__ == "__main__":
    for r in run():
        print(r)
