"""The router passes a streamed answer through as the engine sends it, without buffering: a
fake engine sends its first event and holds the rest back until the client has read that
first event through the router (real sockets, the router's own app and server config)."""

from __future__ import annotations

import asyncio
import threading

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from sidecar import httpkit
from sidecar.router.app import RouterSettings, create_router_app
from tests.harness.inthread import serving

GATE_S = 10.0


def fake_engine(client_saw_first: threading.Event, released: list[str]) -> Starlette:
    """An engine whose completion streams one event, then waits (at most ``GATE_S``) until the
    test says its client has that event, then ends. ``released`` records why it went on."""
    async def completions(request: Request):
        async def events():
            yield b"data: first\n\n"
            loop = asyncio.get_running_loop()
            seen = await loop.run_in_executor(None, client_saw_first.wait, GATE_S)
            released.append("client" if seen else "timeout")
            yield b"data: second\n\n"
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def tokenize(request: Request):  # no tokens: the router routes by load
        return JSONResponse({"error": "no"}, status_code=400)

    async def metrics(request: Request):
        return PlainTextResponse("")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/tokenize", tokenize, methods=["POST"]),
                             Route("/metrics", metrics, methods=["GET"])])


def test_a_streamed_answer_reaches_the_client_before_the_engine_has_finished_it():
    client_saw_first, released = threading.Event(), []
    engine = fake_engine(client_saw_first, released)
    with serving(lambda port: httpkit.server_config(engine, "127.0.0.1", port, max_connections=8)) as eport:
        router = create_router_app(RouterSettings(engines={"e": f"http://127.0.0.1:{eport}"}))
        with serving(lambda port: httpkit.server_config(router, "127.0.0.1", port,
                                                                 max_connections=8)) as rport, \
                httpx.Client(base_url=f"http://127.0.0.1:{rport}", timeout=30) as client:
            with client.stream("POST", "/v1/completions",
                               json={"model": "m", "prompt": "hi", "stream": True}) as r:
                assert r.status_code == 200, r.read()
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["x-kvmove-engine"] == "e"
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        client_saw_first.set()
    assert lines == ["data: first", "data: second", "data: [DONE]"]
    # Buffered anywhere on the way, the first event would have come only once the engine gave
    # up waiting for the client to see it.
    assert released == ["client"]
