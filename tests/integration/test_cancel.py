"""Cancelling a move through the controller's HTTP API (``POST /events/{id}/cancel``), between
real sidecar processes reading 1 GiB over NIXL in 64 MiB batches, once the first bytes arrived
(and, in a second move, before any): the job ends ``cancelled``,
the source still holds every chunk (unpinned), the destination shows only whole chunks, and
cancelling again, a store operation or an unknown job is refused with the error envelope."""

from __future__ import annotations

import json

import httpx
import pytest

from sidecar.standalone import synthetic_chunk
from tests.integration.conftest import Fleet
from tests.integration.test_cli import kvmove
from tests.integration.test_controller_sidecars import LOC
from tests.reliability.test_promise_3_peer_dies import LAYOUT, SEED, SLOTS, TOKENS
from vllm_kvmove.hashing import chunk_spans


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"), controller_args=("--fetch-batch-mib", "64"))
    try:
        yield f
    finally:
        f.close()


def cancel_move(fleet, src: str, dst: str, after_first_bytes: bool, cli=None) -> dict:
    """Start a move of TOKENS, cancel it (once bytes arrived, or at once) over HTTP — or with
    ``kvmove cancel --wait --json`` when ``cli`` (pytest's capsys) is given — and return its
    final status."""
    r = fleet.http.post("/move", json={"old_position": [src, LOC], "new_position": [dst, LOC],
                                       "tokens": TOKENS})
    eid = r.json()["event_id"]
    while after_first_bytes:
        st = fleet.http.get(f"/events/{eid}").json()
        assert st["status"] in ("pending", "running"), f"too fast to cancel: {st}"
        if st["bytes"]:
            break
    if cli is None:
        ended = fleet.http.post(f"/events/{eid}/cancel?wait=30")
        assert ended.status_code == 200, ended.text
        job = ended.json()
    else:
        cli.readouterr()  # drop what was printed before
        assert kvmove(fleet, "cancel", eid, "--wait", "--json") == 0
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
        job = cancel_move(fleet, "cx-src", "cx-dst", after_first_bytes=True)
        assert 0 < job["bytes"] < job["total_bytes"] == 1 << 30
        eid = job["event_id"]

        # The source keeps all 64 chunks, unpinned; the destination has whole ones only.
        store = httpx.get(src.url + "/store", timeout=10).json()
        assert store["num_chunks"] == 64 and store["pinned_chunks"] == 0
        shown = httpx.get(dst.url + "/chunks?limit=100", timeout=10).json()["chunks"]
        assert len(shown) * (16 << 20) == job["bytes"]
        by_key = {s.key.hex(): i for i, s in enumerate(chunk_spans(TOKENS, 256, LAYOUT.fingerprint()))}
        for c in shown:
            i = by_key[c["key"]]
            got = httpx.get(f"{dst.url}/chunks/{c['key']}", timeout=30).content
            assert got == synthetic_chunk(LAYOUT, 256, SEED + i).numpy().tobytes()
        assert httpx.get(dst.url + "/store", timeout=10).json()["writing_chunks"] == 0
        both = {"cx-src": len(TOKENS), "cx-dst": len(shown) * 256}
        assert fleet.wait_lookup(TOKENS, both) == both

        # Cancelled (with the CLI) right after it started: what moved is whole, nothing else
        # changed.
        before = httpx.get(dst.url + "/store", timeout=10).json()["num_chunks"]
        job = cancel_move(fleet, "cx-src", "cx-dst", after_first_bytes=False, cli=capsys)
        moved = job["bytes"] // (16 << 20)
        assert httpx.get(dst.url + "/store", timeout=10).json()["num_chunks"] == before + moved
        assert httpx.get(src.url + "/store", timeout=10).json()["num_chunks"] == 64

        # Refusals, each with the one error envelope and nothing changed.
        again = fleet.http.post(f"/events/{eid}/cancel")
        assert again.status_code == 409 and again.json()["error"]["kind"] == "conflict"
        assert "already ended: cancelled" in again.json()["error"]["message"]
        pin = fleet.http.post("/pin", json={"instance_id": "cx-src", "location": LOC, "tokens": TOKENS[:256]})
        r = fleet.http.post(f"/events/{pin.json()['event_id']}/cancel")
        assert r.status_code == 409 and "cannot be cancelled" in r.json()["error"]["message"]
        assert fleet.http.post("/events/nope/cancel").status_code == 404
        assert fleet.http.post(f"/events/{eid}/cancel?wait=x").status_code == 400
    finally:
        for p in (src, dst):
            fleet.cluster.stop(p)
