"""The sidecar's HTTP app: health, store inspection and metrics for one engine.

Its endpoint table (:data:`ENDPOINTS`) is the one declaration of its routes and of its OpenAPI
document (``GET /openapi.json``); handlers find the sidecar at ``request.app.state.sidecar``.
With a fleet secret every endpoint but ``GET /health`` needs it as a bearer token (``/metrics``
too, unless ``metrics_open``). The app is served by the sidecar's own uvicorn server on its
thread (:mod:`sidecar.agent.runtime`), with :func:`sidecar.httpkit.server_config`'s limits.
"""

from __future__ import annotations

from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from sidecar import protocol
from sidecar.agent.metrics import sidecar_registry
from sidecar.httpkit import (ERROR_HANDLERS, ApiError, Endpoint, build_document, build_routes,
                             json_response, metrics_handler, query_limit)
from vllm_kvmove.config import KVMoveConfig
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.store import ChunkMissing, ChunkStore


class SidecarView(Protocol):
    """What the app reads of a sidecar (:class:`sidecar.agent.runtime.Sidecar` is one)."""

    config: KVMoveConfig
    store: ChunkStore
    layout: KVLayout
    fingerprint: str
    counters: protocol.TransferCounters
    controller_id: str | None


def _sidecar(request: Request) -> SidecarView:
    return request.app.state.sidecar


def _key_param(request: Request) -> bytes:
    raw = request.path_params["key"]
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 16:
        raise ApiError("bad_request", f"chunk key must be 32 hex digits, got {raw!r}")
    return key


async def health(request: Request) -> Response:
    sc = _sidecar(request)
    return json_response(protocol.SidecarHealth("ok", sc.config.instance_id, sc.controller_id))


async def store_info(request: Request) -> Response:
    sc = _sidecar(request)
    return json_response(protocol.StoreInfo(
        instance_id=sc.config.instance_id, location=protocol.LOCATION, fingerprint=sc.fingerprint,
        layout=sc.layout.to_dict(), **sc.store.stats(), transfers=sc.counters))


async def chunks(request: Request) -> Response:
    limit = query_limit(request, 1000)
    _, held = _sidecar(request).store.snapshot()
    return json_response(protocol.ChunkList(len(held), [
        protocol.ChunkEntry(k.hex(), n) for k, n in held[:limit]]))


async def chunk_bytes(request: Request) -> Response:
    """The chunk's valid bytes, held while read (KV bytes are user data: needs the token)."""
    store = _sidecar(request).store
    key = _key_param(request)
    try:
        (info,) = store.hold([key], checksums=False)
    except ChunkMissing:
        raise ApiError("not_found", f"chunk {key.hex()} is not in the store") from None
    try:
        data = store.pool[info.offset:info.offset + info.nbytes].numpy().tobytes()
    finally:
        store.release([key])
    return Response(data, media_type="application/octet-stream",
                    headers={"x-kvmove-num-tokens": str(info.num_tokens)})


async def openapi(request: Request) -> Response:
    return json_response(request.app.state.openapi)


async def metrics(request: Request) -> Response:
    return await request.app.state.metrics(request)


ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/openapi.json", openapi, "This document.", dict, auth=True),
    Endpoint("GET", "/health", health, "Sidecar health.", protocol.SidecarHealth),
    Endpoint("GET", "/store", store_info, "Store statistics, KV layout and fingerprint.",
             protocol.StoreInfo, auth=True),
    Endpoint("GET", "/chunks", chunks, "Chunks held (the first `limit`, default 1000).",
             protocol.ChunkList, params=("limit",), errors=("bad_request",), auth=True),
    Endpoint("GET", "/chunks/{key}", chunk_bytes, "A chunk's valid bytes (held while read).",
             "application/octet-stream", params=("key",), errors=("bad_request", "not_found"),
             auth=True, headers=(("x-kvmove-num-tokens", "Tokens in the chunk."),)),
    Endpoint("GET", "/metrics", metrics, "Prometheus metrics (store and transfers; open to "
             "scrapers with `metrics_open`).", "text/plain", auth=True),
]


def sidecar_openapi() -> dict:
    """The sidecar app's OpenAPI document."""
    return build_document(
        "vllm-kvmove sidecar",
        "One engine's sidecar: health, store statistics and chunk inspection. Every error is "
        "`{\"error\": {\"kind\", \"message\"}}`.",
        ENDPOINTS)


def create_sidecar_app(sidecar: SidecarView) -> Starlette:
    """The sidecar's Starlette app (no lifespan: the sidecar's thread owns its resources)."""
    open_paths = frozenset({"/metrics"}) if sidecar.config.metrics_open else frozenset()
    app = Starlette(routes=build_routes(ENDPOINTS, sidecar.config.api_token, open_paths),
                    exception_handlers=ERROR_HANDLERS)
    app.state.sidecar = sidecar
    app.state.openapi = sidecar_openapi()
    app.state.metrics = metrics_handler(sidecar_registry(
        sidecar.config.instance_id, sidecar.store, sidecar.counters))
    return app
