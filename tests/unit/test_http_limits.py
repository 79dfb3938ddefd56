"""The HTTP servers' limits (sidecar.httpkit.server_config): connections beyond the cap are
closed at once; a request that does not arrive whole in time loses its connection."""

from __future__ import annotations

import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sidecar import httpkit
from tests.harness.inthread import serving


@pytest.fixture
def server(monkeypatch, request):
    monkeypatch.setattr(httpkit, "REQUEST_TIMEOUT_S", getattr(request, "param", 1.0))
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    with serving(lambda port: httpkit.server_config(app, "127.0.0.1", port,
                                                    max_connections=5)) as port:
        yield port


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("server", [30.0], indirect=True)  # no request timeout meanwhile
def test_connections_beyond_the_cap_are_closed_at_once(server):
    conns = []
    for _ in range(8):
        conns.append(socket.create_connection(("127.0.0.1", server)))
        time.sleep(0.05)  # accepted in this order
    closed = [closed_by_peer(s, 0.3) for s in conns]
    assert closed == [False] * 5 + [True] * 3
    for s in conns:
        s.close()


def test_a_request_that_does_not_arrive_whole_in_time_loses_its_connection(server):
    idle = socket.create_connection(("127.0.0.1", server))  # says nothing
    half_head = socket.create_connection(("127.0.0.1", server))
    half_head.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    whole = socket.create_connection(("127.0.0.1", server))
    whole.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert whole.recv(1024).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    assert closed_by_peer(idle, 3) and closed_by_peer(half_head, 3)
    assert 0.5 < time.monotonic() - t0 < 3
    for s in (idle, half_head, whole):
        s.close()
