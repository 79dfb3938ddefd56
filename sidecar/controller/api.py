"""The controller's HTTP API: its endpoint table (routes and OpenAPI document from one
declaration), its handlers, and the Starlette app.

Handlers parse and answer; the work is the :class:`~sidecar.controller.service.Controller`'s,
found at ``request.app.state.controller``. The app's lifespan starts and stops it (its
sockets, its HTTP client, its job tasks). Errors are :class:`~sidecar.httpkit.ApiError`, turned
into the one envelope by the app's exception handlers; endpoints declared ``auth=True`` get
the bearer check from :func:`~sidecar.httpkit.build_routes`: with a fleet secret, every
endpoint but ``GET /health`` and the status page's static HTML (no data: the page asks for the
token and sends it with its requests) needs it, and ``/metrics`` too unless the operator opened
it (``--metrics-open``).

Routes: ``POST /move``, ``GET /events``, ``GET /events/{event_id}``,
``POST /events/{event_id}/cancel``, ``POST /check_finish``, ``POST /lookup``, ``POST /pin``,
``POST /unpin``, ``POST /clear``, ``GET /instances``, ``GET /health``, ``GET /metrics``
(Prometheus), ``GET /`` (status page), ``GET /openapi.json``; LMCache's ``POST /health`` and
``POST /query_worker_info`` shapes.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from sidecar import protocol
from sidecar.controller.instances import Instance
from sidecar.controller.service import Controller
from sidecar.controller.settings import ControllerSettings
from sidecar.httpkit import (ERROR_HANDLERS, ApiError, Endpoint, build_document, build_routes,
                             json_response, metrics_handler, query_limit, query_wait, read_json)

_STATUS_PAGE = Path(__file__).parent / "static" / "status.html"


def _ctl(request: Request) -> Controller:
    return request.app.state.controller


def _position(ctl: Controller, instance_id: str, location: str, what: str) -> Instance:
    """The instance at ``[instance_id, location]``; 404 if unknown, 400 for another location."""
    inst = ctl.registry.require(instance_id)
    if location != protocol.LOCATION:
        raise ApiError("bad_request", f"{what}: unknown location {location!r}; "
                                      f"vllm-kvmove stores KV in {protocol.LOCATION!r}")
    return inst


# -- moves and jobs ----------------------------------------------------------------------------
async def move(request: Request) -> Response:
    """``?wait=S``: answer with the job's status once it ends (or after S <= 60 s) instead of at
    once — one request for a small move, no poll."""
    ctl = _ctl(request)
    wait = query_wait(request)  # a bad value must be refused before the job starts
    body = await read_json(request, protocol.MoveRequest)
    src = _position(ctl, *body.old_position, "old_position")
    dst = _position(ctl, *body.new_position, "new_position")
    tokens = await ctl.tokens_of(body.tokens, body.prompt, src)
    copy = bool(body.copy if body.copy is not None else body.should_copy)
    job = ctl.create_move(src, dst, tokens, copy, body.max_bytes_per_s)
    if wait is None:
        return json_response(protocol.MoveResponse(job.num_tokens, job.event_id))
    return json_response(await job.wait(wait))


async def event(request: Request) -> Response:
    """``?wait=S``: long-poll, answering as soon as the job ends (or after S <= 60 s)."""
    job = _ctl(request).jobs.require(request.path_params["event_id"])
    return json_response(await job.wait(query_wait(request)))


async def cancel(request: Request) -> Response:
    """Stop a move or copy (:meth:`~sidecar.controller.jobs.Job.request_cancel`); ``?wait=S``:
    answer once it ended (cancelled, or done if it was past its last batch)."""
    job = _ctl(request).jobs.require(request.path_params["event_id"])
    wait = query_wait(request)
    job.request_cancel()
    return json_response(await job.wait(wait))


async def events(request: Request) -> Response:
    recent = _ctl(request).jobs.recent(query_limit(request, 100))
    return json_response(protocol.EventList([j.to_status() for j in recent]))


async def check_finish(request: Request) -> Response:
    body = await read_json(request, protocol.EventIdRequest)
    return json_response(_ctl(request).jobs.require(body.event_id).to_status())


def _store_op(kind: str):
    """The handler of ``POST /pin``, ``/unpin`` or ``/clear``."""
    async def handler(request: Request) -> Response:
        ctl = _ctl(request)
        body = await read_json(request, protocol.StoreOpRequest)
        inst = _position(ctl, body.instance_id, body.location, "position")
        tokens = None
        if body.tokens is not None or body.prompt is not None or kind != "clear":
            tokens = await ctl.tokens_of(body.tokens, body.prompt, inst)
        job = await ctl.run_store_op(kind, inst, tokens)
        return json_response(protocol.StoreOpResponse(job.event_id, job.num_tokens, job.num_chunks))
    handler.__name__ = kind
    return handler


# -- the fleet ---------------------------------------------------------------------------------
async def lookup(request: Request) -> Response:
    ctl = _ctl(request)
    body = await read_json(request, protocol.LookupRequest)
    tokenizer = None
    if body.prompt is not None:
        tokenizer = (ctl.registry.require(body.instance_id) if body.instance_id is not None
                     else ctl.registry.any_up())
    tokens = await ctl.tokens_of(body.tokens, body.prompt, tokenizer)
    t0 = time.perf_counter()
    matched = ctl.lookup(tokens)
    ctl.metrics.lookup_seconds.observe(time.perf_counter() - t0)
    return json_response(protocol.LookupResponse(uuid.uuid4().hex, {
        iid: [protocol.LOCATION, n] for iid, n in matched.items()}))


async def instances(request: Request) -> Response:
    ctl = _ctl(request)
    now = time.monotonic()
    return json_response(protocol.InstanceList([protocol.InstanceInfo(
        instance_id=i.instance_id, up=ctl.registry.is_up(i), engine_url=i.reg.engine_url,
        sidecar_url=i.reg.sidecar_url, p2p_url=i.reg.p2p_url, model=i.reg.model,
        fingerprint=i.reg.fingerprint, layout=i.reg.layout, chunk_size=i.reg.chunk_size,
        num_chunks=ctl.index.count(i.instance_id), used_bytes=i.used_bytes,
        capacity_bytes=i.reg.capacity_bytes, available_bytes=i.available_bytes,
        same_host_copy=i.reg.shared_pool is not None,
        last_heartbeat_s_ago=round(now - i.last_heartbeat, 3))
        for i in ctl.registry.instances.values()]))


async def health(request: Request) -> Response:
    ctl = _ctl(request)
    return json_response(protocol.ControllerHealth(
        "ok", ctl.controller_id, len(ctl.registry), ctl.registry.count_up(), len(ctl.index)))


async def instance_health(request: Request) -> Response:
    """LMCache's ``POST /health {"instance_id"}``: per-worker error codes (0 up, 1 down)."""
    ctl = _ctl(request)
    body = await read_json(request, protocol.InstanceRequest)
    inst = ctl.registry.require(body.instance_id)
    return json_response(protocol.InstanceHealth(
        uuid.uuid4().hex, {"0": 0 if ctl.registry.is_up(inst) else 1}))


async def query_worker_info(request: Request) -> Response:
    """LMCache's worker listing: one worker (the sidecar) per instance."""
    ctl = _ctl(request)
    body = await read_json(request, protocol.InstanceRequest)
    inst = ctl.registry.require(body.instance_id)
    host, _, port = inst.reg.sidecar_url.removeprefix("http://").rpartition(":")
    wall = time.time() - time.monotonic()  # monotonic -> epoch seconds
    return json_response(protocol.WorkerInfoList(uuid.uuid4().hex, [protocol.WorkerInfo(
        instance_id=inst.instance_id, worker_id=0, ip=host, port=int(port),
        peer_init_url=inst.reg.p2p_url, registration_time=inst.registered_at + wall,
        last_heartbeat_time=inst.last_heartbeat + wall)]))


# -- documents ---------------------------------------------------------------------------------
async def status_page(request: Request) -> Response:
    return Response(request.app.state.status_page, media_type="text/html; charset=utf-8")


async def openapi(request: Request) -> Response:
    return json_response(request.app.state.openapi)


async def metrics(request: Request) -> Response:
    return await request.app.state.metrics(request)


_STORE_OP_ERRORS = ("not_found", "unavailable", "timeout")

ENDPOINTS: list[Endpoint] = [
    Endpoint("GET", "/", status_page, "Live status page of the fleet.", "text/html"),
    Endpoint("GET", "/openapi.json", openapi, "This document.", dict, auth=True),
    Endpoint("POST", "/move", move, "Move or copy the KV of a token prefix between instances; "
             "starts a job (with `wait`: answers with the job's status once it ended).",
             protocol.MoveResponse, protocol.MoveRequest,
             ("bad_request", "not_found", "incompatible", "unavailable", "store_full",
              "conflict"), params=("wait",), auth=True),
    Endpoint("GET", "/events", events, "Recent jobs, newest first.", protocol.EventList,
             params=("limit",), errors=("bad_request",), auth=True),
    Endpoint("GET", "/events/{event_id}", event, "One job's status (with `wait`: once it ended).",
             protocol.JobStatusBody, params=("event_id", "wait"),
             errors=("bad_request", "not_found"), auth=True),
    Endpoint("POST", "/events/{event_id}/cancel", cancel, "Stop a move or copy: batches in "
             "flight finish, no other starts, the source keeps every chunk; the job ends "
             "`cancelled` (with `wait`: answers once it ended).", protocol.JobStatusBody,
             params=("event_id", "wait"), errors=("bad_request", "not_found", "conflict"),
             auth=True),
    Endpoint("POST", "/pin", _store_op("pin"), "Pin the chunks of a prefix at one instance "
             "(never evicted until unpinned).", protocol.StoreOpResponse, protocol.StoreOpRequest,
             _STORE_OP_ERRORS + ("conflict",), auth=True),
    Endpoint("POST", "/unpin", _store_op("unpin"), "Unpin the chunks of a prefix at one "
             "instance.", protocol.StoreOpResponse, protocol.StoreOpRequest, _STORE_OP_ERRORS,
             auth=True),
    Endpoint("POST", "/clear", _store_op("clear"), "Clear the chunks of a prefix at one "
             "instance (the whole store if no tokens or prompt).", protocol.StoreOpResponse,
             protocol.StoreOpRequest, _STORE_OP_ERRORS + ("conflict",), auth=True),
    Endpoint("POST", "/check_finish", check_finish, "A job's status (LMCache's shape).",
             protocol.JobStatusBody, protocol.EventIdRequest, ("not_found",), auth=True),
    Endpoint("POST", "/lookup", lookup, "Which instances hold how much of a prefix.",
             protocol.LookupResponse, protocol.LookupRequest, ("not_found", "unavailable"),
             auth=True),
    Endpoint("GET", "/instances", instances, "Registered engines.", protocol.InstanceList,
             auth=True),
    Endpoint("GET", "/health", health, "Controller health.", protocol.ControllerHealth),
    Endpoint("POST", "/health", instance_health, "One instance's health (LMCache's shape).",
             protocol.InstanceHealth, protocol.InstanceRequest, ("not_found",), auth=True),
    Endpoint("POST", "/query_worker_info", query_worker_info, "One instance's workers "
             "(LMCache's shape).", protocol.WorkerInfoList, protocol.InstanceRequest,
             ("not_found",), auth=True),
    Endpoint("GET", "/metrics", metrics, "Prometheus metrics (open to scrapers with "
             "`--metrics-open`).", "text/plain", auth=True),
]


def controller_openapi() -> dict:
    """The controller app's OpenAPI document."""
    return build_document(
        "vllm-kvmove controller",
        "Federates the engines' sidecars: moves and copies KV cache between vLLM engines, "
        "looks up which engine holds a prompt's prefix, pins and clears chunks. Every error "
        "is `{\"error\": {\"kind\", \"message\"}}`.",
        ENDPOINTS)


def create_controller_app(settings: ControllerSettings | None = None) -> Starlette:
    """Build the controller's Starlette app; its sockets open and close with its lifespan."""
    ctl = Controller(settings or ControllerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await ctl.start()
        try:
            yield
        finally:
            await ctl.stop()

    open_paths = frozenset({"/metrics"}) if ctl.settings.metrics_open else frozenset()
    app = Starlette(routes=build_routes(ENDPOINTS, ctl.settings.api_token, open_paths),
                    exception_handlers=ERROR_HANDLERS, lifespan=lifespan)
    app.state.controller = ctl
    app.state.openapi = controller_openapi()
    app.state.status_page = _STATUS_PAGE.read_bytes()
    app.state.metrics = metrics_handler(ctl.metrics.registry)
    return app
