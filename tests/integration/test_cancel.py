"""Cancelling a move through the controller's HTTP API (``POST /events/{id}/cancel``), between
real sidecar processes reading 1 GiB over NIXL in 64 MiB batches, once the first bytes arrived
(and, in a second move, before any): the job ends ``cancelled``, the source still holds every
chunk (none held), the destination shows only whole chunks, and cancelling again, a store
operation or an unknown job is refused with the error envelope."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.harness.api import LOC
from tests.harness.fleet import Fleet
from tests.harness.stores import BIG_LAYOUT as LAYOUT
from tests.harness.stores import GIB_TOKENS as TOKENS
from tests.harness.stores import synthetic_chunk
from vllm_kvmove.hashing import chunk_spans

SEED = 11
SLOTS = 72
CHUNKS = len(TOKENS) // LAYOUT.chunk_size


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"), controller_args=("--fetch-batch-mib", "64"))
    try:
        yield f
    finally:
        f.close()


def start_move(fleet, src: str, dst: str) -> str:
    r = fleet.http.post("/move", json={"old_position": [src, LOC], "new_position": [dst, LOC],
                                       "tokens": TOKENS})
    assert r.status_code == 200, r.text
    return r.json()["event_id"]


def mid_transfer(fleet, eid: str, timeout: float = 30) -> bool:
    """Poll the job until bytes arrived while it still runs (True), or it ended first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = fleet.http.get(f"/events/{eid}").json()
        if st["status"] not in ("pending", "running"):
            return False
        if st["bytes"]:
            return True
        time.sleep(0.001)
    raise AssertionError(f"no byte moved in {timeout} s: {st}")


def cancel(fleet, eid: str, cli=None) -> dict:
    """Cancel ``eid`` over HTTP — or with ``kvmove cancel --wait --json`` when ``cli`` (pytest's
    capsys) is given — and return its final status, which must be ``cancelled``."""
    if cli is None:
        ended = fleet.http.post(f"/events/{eid}/cancel?wait=30")
        assert ended.status_code == 200, ended.text
        job = ended.json()
    else:
        cli.readouterr()  # drop what was printed before
        assert fleet.kvmove("cancel", eid, "--wait", "--json") == 0
        job = json.loads(cli.readouterr().out)
    print(f"\n[cancel] {job['status']} after {job['bytes'] >> 20} of {job['total_bytes'] >> 20} MiB "
          f"in {job['elapsed_s']:.3f} s: {job['error']}")
    assert job["status"] == "cancelled" and job["error_kind"] is None
    assert fleet.http.get(f"/events/{eid}").json()["status"] == "cancelled"
    return job


@pytest.mark.timeout(300)
def test_a_cancelled_move_keeps_everything_at_the_source_and_only_whole_chunks_moved(fleet, capsys):
    src = fleet.spawn_sidecar("cx-src", LAYOUT, SLOTS, fill=[f"{SEED}:1:{len(TOKENS)}"],
                              same_host_copy=False)
    dst = fleet.spawn_sidecar("cx-dst", LAYOUT, SLOTS, same_host_copy=False)
    try:
        held = {"cx-src": len(TOKENS)}
        assert fleet.wait_lookup(TOKENS, held, timeout=10) == held
        # Cancel once the first bytes arrived. On a machine fast enough to move the whole GiB
        # between two polls the move ends first: then move the KV back and try again.
        for _ in range(5):
            eid = start_move(fleet, "cx-src", "cx-dst")
            if mid_transfer(fleet, eid):
                break
            st = fleet.wait_job(eid)
            assert st["status"] == "done", st
            # The move completed before it could be cancelled: move it back and retry.
            back = fleet.move("cx-dst", "cx-src", tokens=TOKENS)
            assert fleet.wait_job(back.json()["event_id"])["status"] == "done"
        else:
            raise AssertionError("every move ended before its first bytes could be seen mid-way")
        job = cancel(fleet, eid)
        assert 0 < job["bytes"] < job["total_bytes"] == CHUNKS * LAYOUT.chunk_bytes

        # The source keeps every chunk, none held; the destination has whole ones only.
        store = httpx.get(src.url + "/store", timeout=10).json()
        assert store["num_chunks"] == CHUNKS and store["held_chunks"] == 0
        shown = httpx.get(dst.url + "/chunks?limit=100", timeout=10).json()["chunks"]
        assert len(shown) * LAYOUT.chunk_bytes == job["bytes"]
        by_key = {s.key.hex(): i for i, s in enumerate(
            chunk_spans(TOKENS, LAYOUT.chunk_size, LAYOUT.fingerprint()))}
        for c in shown:
            i = by_key[c["key"]]
            got = httpx.get(f"{dst.url}/chunks/{c['key']}", timeout=30).content
            assert got == synthetic_chunk(LAYOUT, LAYOUT.chunk_size, SEED + i).numpy().tobytes()
        assert httpx.get(dst.url + "/store", timeout=10).json()["writing_chunks"] == 0
        both = {"cx-src": len(TOKENS), "cx-dst": len(shown) * LAYOUT.chunk_size}
        assert fleet.wait_lookup(TOKENS, both) == both

        # Cancelled (with the CLI) right after it started: what moved is whole, nothing else
        # changed.
        before = httpx.get(dst.url + "/store", timeout=10).json()["num_chunks"]
        job = cancel(fleet, start_move(fleet, "cx-src", "cx-dst"), cli=capsys)
        moved = job["bytes"] // LAYOUT.chunk_bytes
        assert httpx.get(dst.url + "/store", timeout=10).json()["num_chunks"] == before + moved
        assert httpx.get(src.url + "/store", timeout=10).json()["num_chunks"] == CHUNKS

        # Refusals, each with the one error envelope and nothing changed.
        again = fleet.http.post(f"/events/{eid}/cancel")
        assert again.status_code == 409 and again.json()["error"]["kind"] == "conflict"
        assert "already ended: cancelled" in again.json()["error"]["message"]
        pin = fleet.http.post("/pin", json={"instance_id": "cx-src", "location": LOC,
                                            "tokens": TOKENS[:LAYOUT.chunk_size]})
        r = fleet.http.post(f"/events/{pin.json()['event_id']}/cancel")
        assert r.status_code == 409 and "cannot be cancelled" in r.json()["error"]["message"]
        assert fleet.http.post("/events/nope/cancel").status_code == 404
        assert fleet.http.post(f"/events/{eid}/cancel?wait=x").status_code == 400
    finally:
        for p in (src, dst):
            fleet.cluster.stop(p)
