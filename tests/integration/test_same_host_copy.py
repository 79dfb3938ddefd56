"""The same-host path: sidecar processes on one host copy from the source's shared pool
(``same_host_copy``, the default) instead of reading over NIXL — with the same bytes, the same
verification, and each path counted where an operator can see it."""

from __future__ import annotations

import httpx

from tests.harness.api import LOC
from tests.harness.stores import tiny_layout

# 4 MiB chunks (16 layers x 8 heads x 128 x bf16 = 64 KiB/token, 64 tokens), 12 chunks: the
# copies cross the copy threads' 1 MiB inline threshold.
LAYOUT = tiny_layout(model="shm-kv", num_layers=16, num_kv_heads=8, head_size=128,
                     block_size=16, chunk_size=64)
TOKENS = list(range(1, 1 + 12 * 64 - 20))  # a partial last chunk too
SLOTS = 16


def sidecar_json(proc, path: str) -> dict:
    return httpx.get(proc.url + path, timeout=10).json()


def chunk_bytes(proc) -> dict[str, bytes]:
    keys = [c["key"] for c in sidecar_json(proc, "/chunks?limit=100")["chunks"]]
    return {k: httpx.get(f"{proc.url}/chunks/{k}", timeout=30).content for k in keys}


def test_same_host_copies_and_nixl_reads_land_the_same_verified_bytes(fleet):
    src = fleet.spawn_sidecar("sh-src", LAYOUT, SLOTS, fill=[f"7:1:{len(TOKENS)}"])
    mapped = fleet.spawn_sidecar("sh-mapped", LAYOUT, SLOTS)
    nixl = fleet.spawn_sidecar("sh-nixl", LAYOUT, SLOTS, same_host_copy=False)
    try:
        assert fleet.wait_lookup(TOKENS, {"sh-src": len(TOKENS)}, timeout=10) == {"sh-src": len(TOKENS)}
        for dst in ("sh-mapped", "sh-nixl"):
            r = fleet.http.post("/move", json={"old_position": ["sh-src", LOC],
                                               "new_position": [dst, LOC], "tokens": TOKENS,
                                               "copy": True})
            assert r.status_code == 200, r.text
            job = fleet.wait_job(r.json()["event_id"], timeout=60)
            assert job["status"] == "done" and job["bytes"] == job["total_bytes"] > 40 << 20, job
        want = chunk_bytes(src)
        assert len(want) == 12
        assert chunk_bytes(mapped) == want
        assert chunk_bytes(nixl) == want

        shared = {i["instance_id"]: i["same_host_copy"] for i in fleet.http.get("/instances").json()["instances"]
                  if i["instance_id"].startswith("sh-")}
        assert shared == {"sh-src": True, "sh-mapped": True, "sh-nixl": False}

        by_path = {name: sidecar_json(p, "/store")["transfers"] for name, p in
                   (("mapped", mapped), ("nixl", nixl))}
        assert by_path["mapped"]["fetches"] >= 1
        assert by_path["mapped"]["same_host_fetches"] == by_path["mapped"]["fetches"]
        assert by_path["nixl"]["fetches"] >= 1 and by_path["nixl"]["same_host_fetches"] == 0
        metrics = httpx.get(mapped.url + "/metrics", timeout=10).text
        assert f'kvmove_same_host_transfers_total{{instance_id="sh-mapped"}} ' \
               f'{float(by_path["mapped"]["same_host_fetches"])}' in metrics

        # A move out of the NIXL-only store (no shared pool to map): the destination, though
        # willing to map, reads over NIXL; the chunks leave sh-nixl and land whole.
        again = fleet.spawn_sidecar("sh-mapped2", LAYOUT, SLOTS)
        try:
            r = fleet.http.post("/move", json={"old_position": ["sh-nixl", LOC],
                                               "new_position": ["sh-mapped2", LOC], "tokens": TOKENS})
            assert fleet.wait_job(r.json()["event_id"], timeout=60)["status"] == "done"
            assert chunk_bytes(again) == want
            assert sidecar_json(nixl, "/store")["num_chunks"] == 0
            got = sidecar_json(again, "/store")["transfers"]
            assert got["fetches"] >= 1 and got["same_host_fetches"] == 0
        finally:
            fleet.cluster.stop(again)
    finally:
        for p in (src, mapped, nixl):
            fleet.cluster.stop(p)
