"""Promise 8: with an API token configured, nothing mutates without it; listeners are local;
no endpoint reveals secrets; a NIXL peer gets our metadata only with the token."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from sidecar import protocol
from sidecar.controller.api import ENDPOINTS
from tests.harness.api import LOC
from tests.harness.fleet import Fleet
from tests.harness.processes import free_port
from tests.harness.stores import fill, put_chunk
from vllm_kvmove.transfer import NixlTransfer, TransferError

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("secured"), api_token=TOKEN)
    a, b = fleet.add_sidecar("sec-a"), fleet.add_sidecar("sec-b")
    fill(a, HELD, seed=4)
    try:
        yield fleet, a, b
    finally:
        fleet.close()


HELD = list(range(50, 90))
MUTATING = [("/move", {"old_position": ["sec-a", LOC], "new_position": ["sec-b", LOC], "tokens": [1]}),
            ("/pin", {"instance_id": "sec-a", "tokens": [1]}),
            ("/unpin", {"instance_id": "sec-a", "tokens": [1]}),
            ("/clear", {"instance_id": "sec-a"}),
            ("/events/{event_id}/cancel", {})]


def test_every_route_documented_as_needing_the_token_is_checked_here():
    assert {op.path for op in ENDPOINTS if op.auth} == {path for path, _ in MUTATING}


@pytest.mark.parametrize("path,body", MUTATING)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_mutating_endpoints_need_the_bearer_token(secured, path, body, headers):
    fleet, a, b = secured
    before = (a.store.snapshot(), b.store.snapshot())
    r = fleet.http.post(path.replace("{event_id}", "any"),
                        json={**body, "tokens": HELD} if "tokens" in body else body, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["kind"] == "unauthorized" and "Bearer" in r.json()["error"]["message"]
    assert (a.store.snapshot(), b.store.snapshot()) == before


def test_with_the_token_a_move_works(secured):
    fleet, a, b = secured
    tokens = list(range(700, 740))
    fill(a, tokens, seed=7)
    fleet.wait_lookup(tokens, {"sec-a": 40})
    r = fleet.http.post("/move", json={"old_position": ["sec-a", LOC], "new_position": ["sec-b", LOC],
                                       "tokens": tokens}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"


def test_reads_stay_open_and_reveal_no_secret(secured):
    fleet, a, _ = secured
    bodies = []
    for path in ("/", "/health", "/instances", "/events", "/metrics", "/openapi.json"):
        r = fleet.http.get(path)
        assert r.status_code == 200, path
        bodies.append(r.text)
    bodies.append(fleet.http.post("/lookup", json={"tokens": [1, 2]}).text)
    for path in ("/health", "/store", "/chunks", "/metrics"):
        bodies.append(httpx.get(a.sidecar_url + path, timeout=5).text)
    assert not any(TOKEN in b for b in bodies)
    assert fleet.http.get("/env").status_code == 404


def test_sidecar_chunk_bytes_need_the_token(secured):
    fleet, a, _ = secured
    key = bytes(range(16))
    put_chunk(a.store, key, 8, seed=1)
    url = f"{a.sidecar_url}/chunks/{key.hex()}"
    assert httpx.get(url, timeout=5).status_code == 401
    r = httpx.get(url, headers=AUTH, timeout=5)
    assert r.status_code == 200 and len(r.content) == a.layout.valid_bytes(8)


def test_sidecar_with_a_wrong_token_cannot_register(secured):
    fleet, *_ = secured
    fleet.add_sidecar("intruder", wait=False, api_token="not-the-token")
    with pytest.raises(AssertionError, match="never registered"):
        fleet.wait_registered("intruder", timeout=3)


def test_sidecar_refuses_commands_without_the_token(secured):
    fleet, a, _ = secured
    key = bytes([9] * 16)
    put_chunk(a.store, key, 8, seed=2)
    for forged in (protocol.ClearChunks(keys=[key]), protocol.ClearChunks(keys=None),
                   protocol.ClearChunks(keys=[key], auth="guess"),
                   protocol.SetPinned(keys=[key], pinned=True)):
        reply = asyncio.run_coroutine_threadsafe(a.commands.run(forged), a.loop).result(5)
        assert not reply.ok and reply.error_kind == "unauthorized"
    assert a.store.contains(key)


def test_nixl_metadata_only_with_the_token(secured):
    _, a, _ = secured
    import torch

    pool = torch.empty(1 << 16, dtype=torch.uint8)
    outsider = NixlTransfer("outsider", pool.data_ptr(), pool.numel(), "127.0.0.1", free_port(),
                            token="wrong")
    try:
        with pytest.raises(TransferError, match="refused"):
            outsider.connect_peer("sec-a", a.transfer.p2p_url, timeout_s=5)
    finally:
        outsider.close()


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.rsplit(":", 1)
                if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
                    found.add(addr)
    return found


def test_every_listener_binds_to_loopback(secured):
    fleet, a, _ = secured
    loopback = {"0100007F", "00000000000000000000000001000000"}
    for port in (fleet.port, fleet.pull, fleet.reply, a.config.sidecar_port, a.config.p2p_init_port):
        addrs = _listening_addresses(port)
        assert addrs and addrs <= loopback, (port, addrs)
