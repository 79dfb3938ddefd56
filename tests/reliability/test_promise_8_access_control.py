"""Promise 8: with the fleet secret configured, nothing but ``GET /health`` answers without
it; no socket accepts a peer without it (CURVE); nothing reveals it; listeners are local.

Who is trusted: holders of the secret. What anyone else can do: ``GET /health`` (and fetch the
status page's static HTML, which holds no data) — every other HTTP request is a 401, and no
ZMQ socket completes a handshake with them, so not one message of theirs reaches a receive
loop.
"""

from __future__ import annotations

import time

import httpx
import pytest
import zmq

from sidecar import protocol
from sidecar.agent.app import ENDPOINTS as SIDECAR_ENDPOINTS
from sidecar.controller.api import ENDPOINTS
from tests.harness.api import LOC
from tests.harness.fleet import Fleet
from tests.harness.processes import free_port
from tests.harness.stores import fill, keys_of, put_chunk
from vllm_kvmove.transfer import NixlTransfer, TransferError
from vllm_kvmove.zmqauth import FleetSecurity

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HELD = list(range(50, 90))
OPEN = {("GET", "/health"), ("GET", "/")}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("secured"), api_token=TOKEN)
    a, b = fleet.add_sidecar("sec-a"), fleet.add_sidecar("sec-b")
    fill(a, HELD, seed=4)
    fleet.wait_lookup(HELD, {"sec-a": 40})
    try:
        yield fleet, a, b
    finally:
        fleet.close()


def test_only_health_and_the_static_status_page_are_open():
    assert {(e.method, e.path) for e in ENDPOINTS if not e.auth} == OPEN
    assert {(e.method, e.path) for e in SIDECAR_ENDPOINTS if not e.auth} == {("GET", "/health")}


def _body(path: str) -> dict:
    """A request body that would do something real at ``path`` (moving HELD, say)."""
    return {"/move": {"old_position": ["sec-a", LOC], "new_position": ["sec-b", LOC],
                      "tokens": HELD},
            "/pin": {"instance_id": "sec-a", "tokens": HELD},
            "/unpin": {"instance_id": "sec-a", "tokens": HELD},
            "/clear": {"instance_id": "sec-a"},
            "/lookup": {"tokens": HELD},
            "/check_finish": {"event_id": "any"},
            "/health": {"instance_id": "sec-a"},
            "/query_worker_info": {"instance_id": "sec-a"}}.get(path, {})


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e.auth],
                         ids=lambda e: f"{e.method} {e.path}")
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}],
                         ids=["none", "wrong", "no-scheme"])
def test_every_other_controller_endpoint_needs_the_token(secured, endpoint, headers):
    fleet, a, b = secured
    before = (a.store.snapshot(), b.store.snapshot())
    url = f"http://localhost:{fleet.port}{endpoint.path.replace('{event_id}', 'any')}"
    r = httpx.request(endpoint.method, url, headers=headers, timeout=10,
                      json=_body(endpoint.path) if endpoint.method == "POST" else None)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["kind"] == "unauthorized" and "Bearer" in r.json()["error"]["message"]
    assert (a.store.snapshot(), b.store.snapshot()) == before


def test_with_the_token_reads_and_a_move_work(secured):
    fleet, a, b = secured
    for path in ("/instances", "/events", "/metrics", "/openapi.json"):
        assert httpx.get(f"http://localhost:{fleet.port}{path}", headers=AUTH).status_code == 200
    tokens = list(range(700, 740))
    fill(a, tokens, seed=7)
    fleet.wait_lookup(tokens, {"sec-a": 40})
    r = fleet.http.post("/move", json={"old_position": ["sec-a", LOC], "new_position": ["sec-b", LOC],
                                       "tokens": tokens})
    assert r.status_code == 200, r.text
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"


def test_the_sidecar_answers_only_health_without_the_token(secured):
    fleet, a, _ = secured
    key = bytes(range(16))
    put_chunk(a.store, key, 8, seed=1)
    assert httpx.get(a.sidecar_url + "/health", timeout=5).status_code == 200
    for path in ("/store", "/chunks", "/metrics", "/openapi.json", f"/chunks/{key.hex()}"):
        assert httpx.get(a.sidecar_url + path, timeout=5).status_code == 401, path
        assert httpx.get(a.sidecar_url + path, headers=AUTH, timeout=5).status_code == 200, path
    r = httpx.get(f"{a.sidecar_url}/chunks/{key.hex()}", headers=AUTH, timeout=5)
    assert len(r.content) == a.layout.valid_bytes(8)


def test_nothing_reveals_the_secret(secured):
    fleet, a, _ = secured
    bodies = [httpx.get(f"http://localhost:{fleet.port}{p}", headers=AUTH).text
              for p in ("/", "/health", "/instances", "/events", "/metrics", "/openapi.json")]
    bodies.append(fleet.http.post("/lookup", json={"tokens": [1, 2]}).text)
    bodies += [httpx.get(a.sidecar_url + p, headers=AUTH, timeout=5).text
               for p in ("/health", "/store", "/chunks", "/metrics")]
    assert not any(TOKEN in b for b in bodies)
    assert fleet.http.get("/env").status_code == 404
    log = fleet.controller.log_path.read_text()
    assert TOKEN not in log


def test_a_sidecar_with_another_secret_cannot_register(secured):
    fleet, *_ = secured
    fleet.add_sidecar("intruder", wait=False, api_token="not-the-fleet-secret")
    with pytest.raises(AssertionError, match="never registered"):
        fleet.wait_registered("intruder", timeout=3)


def _silent(sock: zmq.Socket, send: list[bytes], seconds: float = 1.5) -> bool:
    """Send ``send`` and report whether nothing came back within ``seconds``."""
    sock.send_multipart(send)
    return sock.poll(int(seconds * 1000)) == 0


def test_no_zmq_socket_hears_a_peer_without_the_secret(secured):
    """A peer without the secret (plain, or with keys of another secret) cannot complete a
    handshake: its registration, heartbeats and event batches never reach the controller,
    its metadata requests never reach a sidecar — and a sidecar does not take commands from a
    controller without the secret either."""
    fleet, a, _ = secured
    ctx = zmq.Context.instance()
    stranger = FleetSecurity("another-secret-of-16+chars")
    reg = protocol.sidecar_encoder.encode(protocol.Register(
        instance_id="ghost", engine_url="http://x:1", sidecar_url="http://x:2", p2p_url="x:3",
        agent_name="ghost", model="m", fingerprint="0" * 32, layout={}, chunk_size=32,
        capacity_bytes=1 << 20, slot_bytes=1024, incarnation="g", pid=1))
    for secure in (lambda s: None, stranger.client):
        dealer = ctx.socket(zmq.DEALER)
        dealer.linger = 0
        secure(dealer)
        dealer.connect(f"tcp://127.0.0.1:{fleet.reply}")
        assert _silent(dealer, [reg])  # no RegisterAck, no RegisterRefused: nothing arrived
        dealer.close()
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        secure(push)
        push.connect(f"tcp://127.0.0.1:{fleet.pull}")
        push.send(protocol.sidecar_encoder.encode(protocol.EventBatch("sec-a", "x", [
            protocol.StoreEventMsg(10**9, "evict", k, 32) for k in keys_of(a, HELD)])))
        time.sleep(0.3)
        push.close()
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        secure(req)
        req.connect(f"tcp://{a.transfer.p2p_url}")
        assert _silent(req, [b"kvmove-md/2"])
        req.close()
    assert "ghost" not in {i["instance_id"] for i in fleet.http.get("/instances").json()["instances"]}
    assert fleet.wait_lookup(HELD, {"sec-a": 40}) == {"sec-a": 40}  # the fake evictions never landed
    # A fake controller without the secret: the sidecar's handshake with it fails, so it
    # never registers there, and nothing it could send would reach the sidecar.
    fake = ctx.socket(zmq.ROUTER)
    fake.linger = 0
    port = free_port()
    fake.bind(f"tcp://127.0.0.1:{port}")
    try:
        victim = fleet.add_sidecar("sec-misdirected", wait=False,
                                   config={"controller_reply_url": f"127.0.0.1:{port}"})
        assert fake.poll(2000) == 0
        assert victim.controller_id is None
    finally:
        fake.close()


def test_nixl_metadata_only_for_fleet_members(secured):
    _, a, _ = secured
    import torch

    pool = torch.empty(1 << 16, dtype=torch.uint8)
    for security in (FleetSecurity(""), FleetSecurity("another-secret-of-16+chars")):
        outsider = NixlTransfer(f"outsider-{security.enabled}", pool.data_ptr(), pool.numel(),
                                "127.0.0.1", free_port(), security=security)
        try:
            with pytest.raises(TransferError, match="no answer"):
                outsider.connect_peer("sec-a", a.transfer.p2p_url, timeout_s=1.5)
        finally:
            outsider.close()


def test_metrics_can_be_opened_to_scrapers_explicitly(tmp_path):
    fleet = Fleet(tmp_path, api_token=TOKEN, controller_args=("--metrics-open",))
    try:
        sc = fleet.add_sidecar("scraped", config={"metrics_open": True})
        base = f"http://localhost:{fleet.port}"
        assert httpx.get(base + "/metrics").status_code == 200
        assert httpx.get(base + "/instances").status_code == 401  # only /metrics opened
        assert httpx.get(sc.sidecar_url + "/metrics").status_code == 200
        assert httpx.get(sc.sidecar_url + "/store").status_code == 401
    finally:
        fleet.close()


def test_a_short_secret_or_a_public_address_without_one_is_refused(tmp_path):
    from tests.harness.processes import LocalCluster
    cluster = LocalCluster("unused", tmp_path)
    try:
        for args in (["--api-token", "short"], ["--host", "0.0.0.0"]):
            proc = cluster.start_controller(free_port(), free_port(), free_port(), extra_args=args)
            assert proc.popen.wait(30) == 2
            assert ("at least 16 characters" if "short" in args else "refusing to listen") \
                in proc.log_path.read_text()
    finally:
        cluster.stop_all()
    from vllm_kvmove.config import ConfigError, build_config
    with pytest.raises(ConfigError, match="refusing to listen on '0.0.0.0'"):
        build_config({"p2p_host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="at least 16 characters"):
        build_config({"api_token": "short"})
    assert build_config({"p2p_host": "0.0.0.0", "api_token": TOKEN}).p2p_host == "0.0.0.0"


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
