"""Shared test helpers: free ports, a tiny KV layout, chunk fillers."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from vllm_kvmove.layout import KVLayout

os.environ.setdefault("UCX_NET_DEVICES", "lo")


_next_port = [20000 + (os.getpid() * 37) % 8000]


def free_port() -> int:
    """A free TCP port below the ephemeral range (32768+), so no outgoing connection of vLLM,
    ZMQ or UCX can take it between this check and its use."""
    while True:
        port = _next_port[0]
        _next_port[0] = 20000 + (port - 20000 + 1) % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def tiny_layout(**over) -> KVLayout:
    """A KV layout small enough for unit tests: 32-token chunks of 2 blocks, 2 layers."""
    fields = dict(model="tiny", dtype="bfloat16", num_layers=2, num_kv_heads=1, head_size=8,
                  block_size=16, chunk_size=32, backend="test")
    fields.update(over)
    return KVLayout(**fields)


def put_chunk(store, key: bytes, num_tokens: int, seed: int) -> bytes:
    """Write a chunk of random bytes into ``store``; return its valid bytes."""
    slot = store.reserve(key, num_tokens)
    assert slot is not None
    n = store.layout.valid_bytes(num_tokens)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    start = slot * store.slot_bytes
    store.pool[start:start + n].copy_(data)
    store.commit(key)
    return data.numpy().tobytes()


def post_move(http, src: str, dst: str, **body):
    """POST /move from ``src`` to ``dst`` (both at LocalCPUBackend); ``body`` adds tokens,
    prompt, copy..."""
    return http.post("/move", json={"old_position": [src, "LocalCPUBackend"],
                                    "new_position": [dst, "LocalCPUBackend"], **body})


def wait_job(http, event_id: str, timeout: float = 60) -> dict:
    """Long-poll the controller until the job ends; its final status. Raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        st = http.get(f"/events/{event_id}", params={"wait": max(0.0, min(left, 60))}).json()
        if st["status"] in ("done", "failed"):
            return st
        if left <= 0:
            raise AssertionError(f"job {event_id} did not end in {timeout} s: {st}")


def kill_mid_move(http, src: str, dst: str, tokens: list[int], kill, copy: bool) -> tuple[dict, float]:
    """Start a move (or copy) of ``tokens`` from ``src`` to ``dst``, call ``kill()`` once some
    bytes moved while the job still runs, and wait for the job's end.

    Returns the job's final status and the seconds from the kill to the end. Fails the test
    if the job ends before it could be interrupted or is not mid-transfer at the kill.
    """
    r = post_move(http, src, dst, tokens=tokens, copy=copy)
    assert r.status_code == 200, r.text
    eid = r.json()["event_id"]
    deadline = time.monotonic() + 30
    while True:
        st = http.get(f"/events/{eid}").json()
        assert st["status"] in ("pending", "running"), f"too fast to interrupt: {st}"
        if st["bytes"] > 0:
            break
        assert time.monotonic() < deadline, f"no bytes moved in 30 s: {st}"
        time.sleep(0.002)
    assert st["bytes"] < st["total_bytes"]
    kill()
    killed = time.monotonic()
    final = wait_job(http, eid, timeout=30)
    return final, time.monotonic() - killed


def wait_lookup(http, tokens: list[int], expect: dict[str, int], timeout: float = 5) -> dict:
    """Poll POST /lookup until it answers ``{instance: matched_tokens}`` == ``expect`` (or the
    timeout passes); return the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        info = http.post("/lookup", json={"tokens": tokens}).json()["layout_info"]
        got = {k: v[1] for k, v in info.items()}
        if got == expect or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


@pytest.fixture
def layout() -> KVLayout:
    return tiny_layout()
