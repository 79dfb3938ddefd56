"""Promise 3: a peer dies mid-move (a move of >= 64 MiB; the destination killed, then separately
the source): the event ends failed with the cause within 10 s, the controller keeps serving, no
half-written chunk is ever visible at the destination, and after a destination failure the
source still holds and serves every chunk. Nothing hangs: every wait on a peer has a timeout.

The peers are real sidecar processes (``tests.harness.standalone``: real stores, real NIXL agents)
holding 1 GiB of synthetic KV in an engine-sized layout (64 KiB per token, 16 MiB chunks).
They read over NIXL (``same_host_copy: false``), as peers on different hosts do: there a
peer's death interrupts the bytes in flight. On the same-host path a copy in progress runs
from the destination's own mapping and completes whole even if the source dies; the next
one fails at once (tests/unit/test_shm.py).
"""

from __future__ import annotations

import httpx
import pytest

from tests.harness.api import LOC, kill_mid_move, wait_settled
from tests.harness.stores import BIG_LAYOUT as LAYOUT
from tests.harness.stores import GIB_TOKENS as TOKENS
from tests.harness.stores import synthetic_chunk
from vllm_kvmove.hashing import chunk_spans

SEED = 11
SLOTS = 72


def start_and_interrupt(fleet, prefix: str, kill: str):
    """Spawn ``{prefix}-src`` (holding TOKENS) and ``{prefix}-dst``, start a copy between them
    and SIGKILL the one named by ``kill`` ("src" or "dst") mid-transfer. Returns the processes,
    the job's final status and the seconds from the kill to the job's end."""
    procs = {"src": fleet.spawn_sidecar(f"{prefix}-src", LAYOUT, SLOTS, fill=[f"{SEED}:1:{len(TOKENS)}"],
                                        same_host_copy=False),
             "dst": fleet.spawn_sidecar(f"{prefix}-dst", LAYOUT, SLOTS, same_host_copy=False)}
    held = {f"{prefix}-src": len(TOKENS)}
    assert fleet.wait_lookup(TOKENS, held, timeout=10) == held
    final, took = kill_mid_move(fleet.http, f"{prefix}-src", f"{prefix}-dst", TOKENS,
                                lambda: fleet.cluster.kill(procs[kill]), copy=True,
                                max_bytes_per_s=256 << 20)  # 1 GiB: 4 s
    assert final["status"] == "failed" and final["error"], final
    assert took < 10, f"failure reported {took:.1f} s after the kill"
    print(f"\n[promise 3] {kill} killed: job failed {took:.2f} s later: {final['error']}")
    assert fleet.http.get("/health").status_code == 200  # the controller keeps serving
    return procs["src"], procs["dst"]


def visible_chunks_are_whole(sidecar_url: str) -> int:
    """Every chunk the sidecar shows must be byte-identical to what the source holds."""
    by_key = {s.key.hex(): (i, s) for i, s in enumerate(chunk_spans(TOKENS, 256, LAYOUT.fingerprint()))}
    chunks = httpx.get(sidecar_url + "/chunks?limit=1000", timeout=10).json()["chunks"]
    for c in chunks:
        i, span = by_key[c["key"]]
        got = httpx.get(f"{sidecar_url}/chunks/{c['key']}", timeout=30).content
        assert got == synthetic_chunk(LAYOUT, span.num_tokens, SEED + i).numpy().tobytes()
    # An interrupted read settles within the fleet's command_timeout_s (5 s): nothing is left
    # half-written or held.
    wait_settled(lambda: httpx.get(sidecar_url + "/store", timeout=10).json(), timeout=5 + 5)
    return len(chunks)


@pytest.mark.timeout(300)
def test_destination_dies_mid_move(fleet):
    src, _ = start_and_interrupt(fleet, "die", kill="dst")
    # The source still holds every chunk, unpinned, and serves them: a new move elsewhere works.
    store = httpx.get(src.url + "/store", timeout=10).json()
    assert store["num_chunks"] == 64 and store["held_chunks"] == 0
    again = fleet.spawn_sidecar("die-dst2", LAYOUT, SLOTS, same_host_copy=False)
    r = fleet.http.post("/move", json={"old_position": ["die-src", LOC], "new_position": ["die-dst2", LOC],
                                       "tokens": TOKENS, "copy": True})
    assert fleet.wait_job(r.json()["event_id"], timeout=60)["status"] == "done"
    assert visible_chunks_are_whole(again.url) == 64
    for p in (src, again):
        fleet.cluster.stop(p)


@pytest.mark.timeout(300)
def test_source_dies_mid_move(fleet):
    _, dst = start_and_interrupt(fleet, "die2", kill="src")
    # Whatever the destination shows is whole: batches that completed are verified, the one
    # in flight was never published.
    shown = visible_chunks_are_whole(dst.url)
    assert shown < 64
    fleet.cluster.stop(dst)


def test_a_handshake_with_a_dead_peer_fails_at_once_and_a_silent_one_times_out():
    # A dead peer's metadata port is closed: refused at once, not after the command timeout
    # (a ZMQ request to a closed port would just wait). A peer that accepts but never answers
    # ends at the timeout. Either way the destination's fetch fails and its job can end.
    import socket
    import time

    import torch

    from tests.harness.processes import free_port
    from vllm_kvmove.transfer import NixlTransfer, TransferError

    pool = torch.empty(1 << 16, dtype=torch.uint8)
    me = NixlTransfer("p3-handshake", pool.data_ptr(), pool.numel(), "127.0.0.1", free_port())
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="connection refused"):
            me.connect_peer("gone", f"127.0.0.1:{free_port()}", timeout_s=30)
        assert time.monotonic() - t0 < 5  # at once, not after the 30 s timeout (with margin)
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="NIXL handshake with mute"):
            me.connect_peer("mute", f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=1)
        assert 1 <= time.monotonic() - t0 < 1 + 4  # the timeout (with margin)
    finally:
        silent.close()
        me.close()
