"""P1 — move throughput: bytes of KV moved ÷ time from POST /move to the event done, for a
prefix of 1 GiB of KV, against a single-process memcpy of the same bytes in the same run.

The two peers are real sidecar processes (``tests.harness.standalone``: the sidecar code an engine
runs, with its real store, NIXL agent over UCX, and control-plane client), holding KV in the
layout of a 16-layer, 8-KV-head, head-dim-128 bf16 model (64 KiB per token, 16 MiB chunks).
No engine is involved in a move's data path, so none is started. Each trial copies the prefix
to the destination (so the source keeps it), times POST → done with a long-poll on the event,
then clears the destination; a memcpy trial (glibc ``memcpy`` through ctypes, one thread,
warm buffers) runs between move trials. torch's ``copy_`` on one thread is timed beside it for
reference (it is ~0.6x of glibc's memcpy here, which uses non-temporal stores for big copies):
the baseline is the faster one. The first move trial warms the destination's pool pages (and
its mapping of the source's pool) and is not counted.

Destinations: the default (same-host copy from the source's shared pool, checksums verified),
the same with verification off, and NIXL only (``same_host_copy: false``, verified): the path
engines on different hosts take.

P1-nixl-raw, what NIXL itself reaches here: two NIXL agents in this process READ the same
bytes between two 1 GiB buffers over UCX ``cma`` (one ``process_vm_readv`` copy, as between
the sidecars) in the fetch's 32 MiB pieces, one after another, with no store, hashing or
control plane; its ratio is P1-nixl's throughput over it. Beside it, what building a READ's
descriptors costs per read (``get_xfer_descs`` + ``initialize_xfer``) against descriptors
prepared once (``prep_xfer_dlist`` + ``make_prepped_xfer``).
"""

from __future__ import annotations

import ctypes
import os
import time

import httpx
import torch

from common import WORK, Result, median
from nixl_peer import read_pieces, timed_reads
from sidecar.agent.fetch import PIECE_BYTES
from sidecar.protocol import LOCATION as LOC
from tests.harness.processes import LocalCluster
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.transfer import NixlTransfer, ReadRange

LAYOUT = KVLayout(model="bench-64k", dtype="bfloat16", num_layers=16, num_kv_heads=8,
                  head_size=128, block_size=128, chunk_size=256, backend="cpu_attn/vec")
NUM_TOKENS = 16384  # 1 GiB at 64 KiB per token
TRIALS = 5


def _sidecar_config(iid: str, sc_port: int, p2p_port: int, gib: float, verify: bool = True,
                    same_host: bool = True) -> dict:
    return {"instance_id": iid, "controller_pull_url": "localhost:23300",
            "controller_reply_url": "localhost:23400", "sidecar_port": sc_port,
            "p2p_init_port": p2p_port, "chunk_size": LAYOUT.chunk_size, "max_local_cpu_size": gib,
            "heartbeat_interval_s": 0.5, "verify_checksums": verify,
            "same_host_copy": same_host}


def run() -> list[Result]:
    cluster = LocalCluster("unused", WORK / "p1")
    try:
        ctl = cluster.start_controller(23900, 23300, 23400, extra_args=["--log-level", os.environ.get("KVMOVE_LOG_LEVEL", "info").lower()])
        cluster.wait_ready(ctl, timeout=30)
        src = cluster.start_sidecar_process(_sidecar_config("p1-src", 23501, 23201, 1.1),
                                            LAYOUT.to_dict(), [f"1:0:{NUM_TOKENS}"])
        dst = cluster.start_sidecar_process(_sidecar_config("p1-dst", 23502, 23202, 1.1),
                                            LAYOUT.to_dict())
        # The same destination with checksum verification off: what verification costs.
        nv = cluster.start_sidecar_process(_sidecar_config("p1-dst-nv", 23503, 23203, 1.1, False),
                                           LAYOUT.to_dict())
        # NIXL only (as between hosts), verified.
        nx = cluster.start_sidecar_process(_sidecar_config("p1-dst-nixl", 23504, 23204, 1.1,
                                                           same_host=False), LAYOUT.to_dict())
        for p in (src, dst, nv, nx):
            cluster.wait_ready(p, timeout=120)
        http = httpx.Client(base_url=ctl.url, timeout=120)
        tokens = list(range(NUM_TOKENS))
        deadline = time.monotonic() + 60
        while http.post("/lookup", json={"tokens": tokens}).json()["layout_info"].get("p1-src", [0, 0])[1] != NUM_TOKENS:
            assert time.monotonic() < deadline, "source never registered its chunks"
            time.sleep(0.2)
        time.sleep(2)  # let the source finish its background checksums (~0.1 s per GiB)

        a = torch.empty(LAYOUT.chunk_bytes * (NUM_TOKENS // LAYOUT.chunk_size), dtype=torch.uint8)
        b = torch.empty_like(a)
        a.fill_(1)
        b.fill_(2)
        threads = torch.get_num_threads()
        moves: dict[str, list[float]] = {"p1-dst": [], "p1-dst-nv": [], "p1-dst-nixl": []}
        copies, torch_copies, nbytes = [], [], 0
        for trial in range(TRIALS + 1):
            for dest in moves:
                t0 = time.perf_counter()
                r = http.post("/move", json={"old_position": ["p1-src", LOC], "new_position": [dest, LOC],
                                             "tokens": tokens, "copy": True})
                st = http.get(f"/events/{r.json()['event_id']}?wait=60").json()
                took = time.perf_counter() - t0
                assert st["status"] == "done", st
                nbytes = st["bytes"]
                assert nbytes == st["total_bytes"] >= 256 << 20
                if trial:  # trial 0 faults in the destination pool's pages
                    moves[dest].append(took)
                assert http.post("/clear", json={"instance_id": dest}).status_code == 200
            t0 = time.perf_counter()
            ctypes.memmove(b.data_ptr(), a.data_ptr(), nbytes)
            copies.append(time.perf_counter() - t0)
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            b[:nbytes].copy_(a[:nbytes])
            torch_copies.append(time.perf_counter() - t0)
            torch.set_num_threads(threads)
        copy_s = min(median(copies), median(torch_copies))  # the faster memcpy is the baseline
        out = []
        for dest, rid, what in (("p1-dst", "P1", "same-host copy, verified (default)"),
                                ("p1-dst-nv", "P1-noverify", "same-host copy, verification off"),
                                ("p1-dst-nixl", "P1-nixl", "NIXL only (as across hosts), verified")):
            move_s = median(moves[dest])
            ratio = copy_s / move_s
            out.append(Result(
                id=rid, measure=f"move throughput, 1 GiB prefix, POST /move → done, {what}",
                value=nbytes / move_s / 1e9, unit="GB/s",
                baseline={"memcpy_GB/s": nbytes / copy_s / 1e9, "bytes": nbytes,
                          "glibc_memcpy_GB/s": nbytes / median(copies) / 1e9,
                          "torch_copy_GB/s": nbytes / median(torch_copies) / 1e9},
                ratio=ratio, goal="≥ 0.85× memcpy", met=ratio >= 0.85,
                trials={"move_s": moves[dest], "memcpy_s": copies, "torch_copy_s": torch_copies},
                notes="standalone sidecar processes (real store, NIXL agent, controller); "
                      "destination pool warm; copy then clear per trial"))
        out.append(nixl_read_ceiling(a, b, nbytes, moves["p1-dst-nixl"]))
        return out
    finally:
        cluster.stop_all()


def nixl_read_ceiling(src: torch.Tensor, dst: torch.Tensor, nbytes: int,
                      move_s: list[float]) -> Result:
    """P1-nixl-raw (module docstring): NIXL READs of ``nbytes`` from ``src`` to ``dst`` between
    two agents of this process, against the NIXL move's times ``move_s``."""
    saved = dict(os.environ)  # the agents set UCX variables process-wide: not for later modules
    try:
        peer = NixlTransfer("p1-raw-src", src.data_ptr(), nbytes, "127.0.0.1", 23206)
        me = NixlTransfer("p1-raw-dst", dst.data_ptr(), nbytes, "127.0.0.1", 23207)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        me.connect_peer("p1-raw-src", peer.p2p_url, 10)
        pieces = read_pieces(src.data_ptr(), dst.data_ptr(), nbytes)
        reads = timed_reads(me, "p1-raw-src", pieces, TRIALS)  # (+ one as the moves' first)
        per_read, prepped = descriptor_costs(me, "p1-raw-src", pieces)
    finally:
        me.close()
        peer.close()
    read_s, nixl_s = median(reads), median(move_s)
    return Result(
        id="P1-nixl-raw", measure="NIXL READ alone, two agents in one process over UCX cma, "
        f"1 GiB in {PIECE_BYTES >> 20} MiB pieces (what P1-nixl's transport reaches here)",
        value=nbytes / read_s / 1e9, unit="GB/s",
        baseline={"P1-nixl_GB/s": nbytes / nixl_s / 1e9,
                  "descriptors_per_read_us": per_read * 1e6,
                  "prepped_descriptors_us": prepped * 1e6},
        ratio=read_s / nixl_s, goal="reported (ratio: P1-nixl's throughput over this)",
        met=True, trials={"read_s": reads},
        notes="descriptors_per_read_us: get_xfer_descs + initialize_xfer of one piece; "
              "prepped_descriptors_us: make_prepped_xfer from lists prepared once (median of "
              "200 each)")


def descriptor_costs(transfer: NixlTransfer, peer: str,
                     pieces: list[list[ReadRange]]) -> tuple[float, float]:
    """Seconds to make one piece's READ handle: descriptors built per read, and prepared once."""
    agent = transfer.agent
    first = pieces[0][0]
    built, prepped = [], []
    for _ in range(200):
        t0 = time.perf_counter()
        local = agent.get_xfer_descs([(first.local_addr, first.nbytes, 0)], "DRAM")
        remote = agent.get_xfer_descs([(first.remote_addr, first.nbytes, 0)], "DRAM")
        handle = agent.initialize_xfer("READ", local, remote, peer)
        built.append(time.perf_counter() - t0)
        agent.release_xfer_handle(handle)
    local_list = agent.prep_xfer_dlist(
        "NIXL_INIT_AGENT", [(p[0].local_addr, p[0].nbytes, 0) for p in pieces], "DRAM")
    remote_list = agent.prep_xfer_dlist(
        peer, [(p[0].remote_addr, p[0].nbytes, 0) for p in pieces], "DRAM")
    for i in range(200):
        t0 = time.perf_counter()
        handle = agent.make_prepped_xfer("READ", local_list, [i % len(pieces)], remote_list,
                                         [i % len(pieces)])
        prepped.append(time.perf_counter() - t0)
        agent.release_xfer_handle(handle)
    agent.release_dlist_handle(local_list)
    agent.release_dlist_handle(remote_list)
    return median(built), median(prepped)
