"""The sidecar's HTTP app: health and store inspection for one engine.

Routes (all JSON unless noted):
  ``GET /health``          → ``{"status": "ok", "instance_id", "controller_id"}``
  ``GET /store``           → store statistics, KV layout and fingerprint
  ``GET /chunks``          → ``{"chunks": [{"key": hex, "num_tokens"}...]}`` (``?limit=``, default 1000)
  ``GET /chunks/{key}``    → the chunk's valid bytes, ``application/octet-stream`` (pinned while read)
  ``GET /metrics``         → Prometheus text (store and transfer metrics)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.errors import ERROR_HANDLERS, ApiError, check_bearer, json_response, query_limit
from sidecar.metrics import metrics_endpoint, sidecar_registry
from vllm_kvmove.store import ChunkMissing

if TYPE_CHECKING:
    from sidecar.runtime import Sidecar


def _key_param(request: Request) -> bytes:
    raw = request.path_params["key"]
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 16:
        raise ApiError("bad_request", f"chunk key must be 32 hex digits, got {raw!r}")
    return key


def create_sidecar_app(sidecar: "Sidecar") -> Starlette:
    store = sidecar.store

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", "instance_id": sidecar.config.instance_id,
                              "controller_id": sidecar.controller_id})

    async def store_info(request: Request) -> Response:
        return json_response({"instance_id": sidecar.config.instance_id, "location": "LocalCPUBackend",
                              "fingerprint": sidecar.fingerprint, "layout": sidecar.layout.to_dict(),
                              **store.stats(), "transfers": dict(sidecar.stats)})

    async def chunks(request: Request) -> Response:
        limit = query_limit(request, 1000)
        _, held = store.snapshot()
        return json_response({"total": len(held), "chunks": [
            {"key": k.hex(), "num_tokens": n} for k, n in held[:limit]]})

    async def chunk_bytes(request: Request) -> Response:
        check_bearer(request, sidecar.config.api_token)  # KV bytes are user data
        key = _key_param(request)
        try:
            (info,) = store.pin([key], checksums=False)
        except ChunkMissing:
            raise ApiError("not_found", f"chunk {key.hex()} is not held") from None
        try:
            data = store.pool[info.offset:info.offset + info.nbytes].numpy().tobytes()
        finally:
            store.unpin([key])
        return Response(data, media_type="application/octet-stream",
                        headers={"x-kvmove-num-tokens": str(info.num_tokens)})

    async def openapi(request: Request) -> Response:
        from sidecar.openapi import sidecar_openapi

        return json_response(sidecar_openapi())

    return Starlette(
        routes=[Route("/openapi.json", openapi), Route("/health", health), Route("/store", store_info), Route("/chunks", chunks),
                Route("/chunks/{key}", chunk_bytes),
                Route("/metrics", metrics_endpoint(sidecar_registry(sidecar)))],
        exception_handlers=ERROR_HANDLERS)
