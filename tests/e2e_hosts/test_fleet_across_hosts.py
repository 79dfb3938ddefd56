"""Eight instances on four test hosts — the two engines and six standalone sidecars in the
engines' exact KV layout (so every one can move KV to every other) — federated by one
controller: 100 concurrent moves and copies among them all end done or with a clear error,
every prefix is held whole somewhere afterwards, every chunk anywhere is byte for byte the
one first written, and nothing is left held."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sidecar.protocol import FINAL_STATES
from tests.harness.api import wait_job, wait_lookup
from tests.harness.engines import chunk_keys
from tests.harness.stores import synthetic_chunk
from tests.e2e_hosts.conftest import AUTH, SECRET
from vllm_kvmove.layout import KVLayout

LOC = "LocalCPUBackend"
PREFIXES = [list(range(100_000 * (p + 1), 100_000 * (p + 1) + 700)) for p in range(24)]
PER_SIDECAR = len(PREFIXES) // 6


@pytest.fixture(scope="module")
def fleet8(cross, hosts):
    """Six standalone sidecars on hosts 1-4 (two on host 3 and on host 4), each filled with
    four of the prefixes, next to the two engines."""
    h3 = hosts.hosts[2]
    layout = cross.http.get("/instances").json()["instances"][0]["layout"]
    procs = []
    try:
        for n in range(6):
            host = hosts.hosts[[0, 1, 2, 2, 3, 3][n]]
            iid = f"s{n + 1}"
            config = {"instance_id": iid, "api_token": SECRET,
                      "controller_pull_url": f"{h3.address}:8300",
                      "controller_reply_url": f"{h3.address}:8400",
                      "sidecar_host": host.address, "sidecar_port": 8600 + n,
                      "p2p_host": host.address, "p2p_init_port": 8700 + n,
                      "chunk_size": layout["chunk_size"], "max_local_cpu_size": 0.1,
                      "heartbeat_interval_s": 0.5, "command_timeout_s": 10,
                      "tls_cert": cross.tls["cert"], "tls_key": cross.tls["key"]}
            fill = [f"{1000 * p}:{PREFIXES[p][0]}:{len(PREFIXES[p])}"
                    for p in range(PER_SIDECAR * n, PER_SIDECAR * (n + 1))]
            procs.append(cross.local.start_sidecar_process(config, layout, fill, host=host))
        for p in procs:
            cross.local.wait_ready(p, timeout=120, verify=cross.verify)
        cross.wait_up({f"s{n}" for n in range(1, 7)})
        yield KVLayout(**layout)
    finally:
        for p in procs:
            cross.local.stop(p)


def test_100_concurrent_moves_and_copies_among_8_instances_on_4_hosts(cross, fleet8):
    layout = fleet8
    ids = ["e1", "e2"] + [f"s{n}" for n in range(1, 7)]
    expected: dict[str, bytes] = {}  # chunk key (hex) -> its bytes, as first written
    for p, tokens in enumerate(PREFIXES):
        holder = f"s{p // PER_SIDECAR + 1}"
        assert wait_lookup(cross.http, tokens, {holder: len(tokens)}, timeout=10)
        for i, key in enumerate(chunk_keys(cross.http, tokens, holder)):
            n = min(layout.chunk_size, len(tokens) - i * layout.chunk_size)
            expected[key] = synthetic_chunk(layout, n, 1000 * p + i).numpy().tobytes()
    # Each prefix gets four or five operations from its first holder — mostly copies, which
    # share their source, some moves — to random other instances; a few name a random source.
    rng = random.Random(12)
    holders_at_start = {p: f"s{p // PER_SIDECAR + 1}" for p in range(len(PREFIXES))}
    plan = []
    for i in range(100):
        p = i % len(PREFIXES)
        src = rng.choice(ids) if rng.random() < 0.1 else None  # None: its first holder
        dst = rng.choice([d for d in ids if d != holders_at_start[p]])
        plan.append((p, src, dst, rng.random() < 0.7))

    def send(op):
        p, src, dst, copy = op
        src = src or holders_at_start[p]
        return cross.http.post("/move", json={"old_position": [src, LOC],
                                              "new_position": [dst, LOC],
                                              "tokens": PREFIXES[p], "copy": copy})

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(send, plan))
    statuses = {r.status_code for r in answers}
    assert statuses <= {200, 400, 404, 409}, statuses  # 400: src == dst; 404: not held there
    finals = [wait_job(cross.http, r.json()["event_id"], timeout=120)
              for r in answers if r.status_code == 200]
    assert finals and all(f["status"] in FINAL_STATES for f in finals)
    assert all(f["error"] and f["error_kind"] for f in finals if f["status"] == "failed")
    done = sum(f["status"] == "done" for f in finals)
    assert done > 0
    # Every prefix held whole somewhere; every chunk anywhere as first written; nothing held.
    for p, tokens in enumerate(PREFIXES):
        held = cross.http.post("/lookup", json={"tokens": tokens}).json()["layout_info"]
        assert any(n == len(tokens) for _, n in held.values()), (p, held)
    for iid in ids:
        url = (cross.engines[iid].sidecar_url if iid in cross.engines else
               next(i["sidecar_url"] for i in cross.http.get("/instances").json()["instances"]
                    if i["instance_id"] == iid))
        sidecar = httpx.Client(base_url=url, headers=AUTH, timeout=30, verify=cross.verify)
        store = sidecar.get("/store").json()
        assert store["held_chunks"] == 0 and store["writing_chunks"] == 0, (iid, store)
        for c in sidecar.get("/chunks?limit=10000").json()["chunks"]:
            if c["key"] in expected:
                got = sidecar.get(f"/chunks/{c['key']}").content
                assert got == expected[c["key"]], (iid, c["key"])
    print(f"\n[hosts] 100 operations among 8 instances on 4 hosts: "
          f"{sum(r.status_code == 200 for r in answers)} started, {done} done, "
          f"{sum(f['status'] == 'failed' for f in finals)} failed with a cause, "
          f"{sum(r.status_code == 409 for r in answers)} refused as conflicting, "
          f"{sum(r.status_code == 404 for r in answers)} not held at the named source")
