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

Routes: ``POST /move``, ``POST /drain``, ``GET /events``, ``GET /events/{event_id}``,
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
    copy = bool(body.copy if body.copy is not None else body.should_copy)
    if body.all or body.prefixes is not None:  # a batch move
        if body.tokens is not None or body.prompt is not None or \
                (body.all and body.prefixes is not None):
            raise ApiError("bad_request", "give exactly one of 'tokens', 'prompt', 'prefixes' "
                                          "and 'all'")
        prefixes = None if body.all else [await ctl.tokens_of(p, None, src)
                                          for p in body.prefixes]
        job = ctl.create_batch_move(src, dst, prefixes, copy, body.max_bytes_per_s)
    else:
        tokens = await ctl.tokens_of(body.tokens, body.prompt, src)
        job = ctl.create_move(src, dst, tokens, copy, body.max_bytes_per_s)
    if wait is None:
        return json_response(protocol.MoveResponse(job.num_tokens, job.event_id))
    return json_response(await job.wait(wait))


async def drain(request: Request) -> Response:
    """``?wait=S``: answer with the job's status once it ends (or after S <= 60 s)."""
    ctl = _ctl(request)
    wait = query_wait(request)
    body = await read_json(request, protocol.DrainRequest)
    src = ctl.registry.require(body.instance_id)
    to = None if body.to is None else [ctl.registry.require(i) for i in body.to]
    job = ctl.create_drain(src, to, body.copy, body.max_bytes_per_s)
    if wait is None:
        return json_response(protocol.DrainResponse(job.event_id, list(job.drain.destinations)))
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
    out = []
    for i in ctl.registry.instances.values():
        reg = i.reg
        ranks = [protocol.RankInfo(
            rank=m.rank, up=ctl.registry.member_up(m), sidecar_url=m.reg.sidecar_url,
            p2p_url=m.reg.p2p_url, num_chunks=m.num_chunks, used_bytes=m.used_bytes,
            capacity_bytes=m.reg.capacity_bytes, available_bytes=m.available_bytes,
            last_heartbeat_s_ago=round(now - m.last_heartbeat, 3), kv_events=m.reg.kv_events)
            for m in i.ranked()]
        out.append(protocol.InstanceInfo(
            instance_id=i.instance_id, up=ctl.registry.is_up(i), engine_url=reg.engine_url,
            sidecar_url=reg.sidecar_url, p2p_url=reg.p2p_url, model=reg.model,
            fingerprint=reg.fingerprint, layout=reg.layout, chunk_size=reg.chunk_size,
            num_chunks=ctl.registry.count_chunks(i), used_bytes=i.used_bytes,
            capacity_bytes=i.capacity_bytes, available_bytes=i.available_bytes,
            same_host_copy=reg.shared_pool is not None,
            last_heartbeat_s_ago=round(now - i.last_heartbeat, 3), world_size=i.world_size,
            ranks=ranks, block_hashing=reg.block_hashing, engine_events=reg.engine_events,
            draining=ctl.draining.get(i.instance_id, "")))
    return json_response(protocol.InstanceList(out))


async def health(request: Request) -> Response:
    ctl = _ctl(request)
    return json_response(protocol.ControllerHealth(
        "ok", ctl.controller_id, len(ctl.registry), ctl.registry.count_up(), len(ctl.index)))


def _workers(ctl: Controller, body: protocol.InstanceRequest) -> tuple[Instance, list[int]]:
    """The instance of an LMCache worker request, and the workers (ranks) it names (default:
    all of the engine's); 400 for a rank outside the engine."""
    inst = ctl.registry.require(body.instance_id)
    ranks = list(range(inst.world_size)) if body.worker_ids is None else body.worker_ids
    bad = [r for r in ranks if not 0 <= r < inst.world_size]
    if bad:
        raise ApiError("bad_request", f"worker_ids {bad}: {inst.instance_id} has workers "
                                      f"(tensor-parallel ranks) 0..{inst.world_size - 1}")
    return inst, ranks


async def instance_health(request: Request) -> Response:
    """LMCache's ``POST /health {"instance_id", "worker_ids"?}``: per-worker (rank) error codes
    (0 up, 1 down or not registered)."""
    ctl = _ctl(request)
    inst, ranks = _workers(ctl, await read_json(request, protocol.InstanceRequest))
    codes = {}
    for r in ranks:
        m = inst.members.get(r)
        codes[str(r)] = 0 if m is not None and ctl.registry.member_up(m) else 1
    return json_response(protocol.InstanceHealth(uuid.uuid4().hex, codes))


async def query_worker_info(request: Request) -> Response:
    """LMCache's worker listing: one worker per registered tensor-parallel rank (its sidecar)."""
    ctl = _ctl(request)
    inst, ranks = _workers(ctl, await read_json(request, protocol.InstanceRequest))
    wall = time.time() - time.monotonic()  # monotonic -> epoch seconds
    infos = []
    for r in ranks:
        m = inst.members.get(r)
        if m is None:
            continue
        url = m.reg.sidecar_url
        host, _, port = url.removeprefix("https://").removeprefix("http://").rpartition(":")
        infos.append(protocol.WorkerInfo(
            instance_id=inst.instance_id, worker_id=r, ip=host, port=int(port),
            peer_init_url=m.reg.p2p_url, registration_time=m.registered_at + wall,
            last_heartbeat_time=m.last_heartbeat + wall))
    return json_response(protocol.WorkerInfoList(uuid.uuid4().hex, infos))


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
    Endpoint("POST", "/move", move, "Move or copy the KV of a token prefix (or of several, or "
             "all a source holds) between instances; starts a job (with `wait`: answers with "
             "the job's status once it ended).",
             (protocol.MoveResponse, protocol.JobStatusBody), protocol.MoveRequest,
             ("bad_request", "not_found", "incompatible", "unavailable", "store_full",
              "conflict"), params=("wait",), auth=True),
    Endpoint("POST", "/drain", drain, "Move (or copy) everything an instance holds to other "
             "instances, whole prefixes where they fit, pins carried over; starts a job "
             "(with `wait`: answers with its status once it ended). Moves into the instance "
             "are refused while it drains.", (protocol.DrainResponse, protocol.JobStatusBody),
             protocol.DrainRequest,
             ("bad_request", "not_found", "incompatible", "unavailable", "conflict"),
             params=("wait",), auth=True),
    Endpoint("GET", "/events", events, "Recent jobs, newest first.", protocol.EventList,
             params=("limit",), errors=("bad_request",), auth=True),
    Endpoint("GET", "/events/{event_id}", event, "One job's status (with `wait`: once it ended).",
             protocol.JobStatusBody, params=("event_id", "wait"),
             errors=("bad_request", "not_found"), auth=True),
    Endpoint("POST", "/events/{event_id}/cancel", cancel, "Stop a move, copy or drain: "
             "batches in flight finish, no other starts, the source keeps every chunk not yet "
             "moved; the job ends `cancelled` (with `wait`: answers once it ended).", protocol.JobStatusBody,
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
