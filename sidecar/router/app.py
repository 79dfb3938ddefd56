"""``kvmove-router``'s HTTP app: an OpenAI-compatible proxy that sends each request to the
engine that can serve its prompt's longest prefix without prefill, weighed against load.

Contract
--------
* Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (routed; a streamed
  answer is passed through as it arrives), ``GET /v1/models`` (from any engine that is up),
  ``GET /health``, ``GET /metrics`` (Prometheus). Every other path is 404 in the one error
  envelope (:mod:`sidecar.httpkit`).
* Routing, per request (:meth:`Router.rank`): the prompt's tokens — from an engine's own
  ``/tokenize``, which applies the model's chat template as vLLM does — then for each engine
  that is up: ``gpu`` tokens its prefix cache holds (its KV events), ``host`` tokens its host
  store holds (the controller's ``/lookup``), and its ``load``: requests the router has sent it
  and not seen end (one already streaming its answer weighs ``decode_weight``), plus the
  others the engine reports (:mod:`sidecar.router.fleet`). ``gpu`` includes the prompts the
  router itself sent there whose prefill may not be done yet, so requests for a prefix follow
  the first one instead of starting a second prefill elsewhere.
  Score = ``gpu + host_weight * (host - gpu if more) - load_tokens * load``;
  the best first, ties to the least loaded, then by rendezvous hashing of the prompt's start.
  A prompt **no engine holds any of** is a new prefix to place for all the requests that will
  follow it: it goes to the engine, among those within one request of the least loaded, with
  the smallest working set (tokens of the distinct prompts routed to it in the last
  ``working_set_s``), ties by rendezvous hashing — so the prefixes spread over the engines'
  caches instead of landing wherever the load swung to at the moment (which piles them up
  on one engine and makes it evict). A prompt that cannot be tokenized (a list of
  prompts, an engine error) is routed by load alone. The answer says where it went
  (``x-kvmove-engine``) and why (``x-kvmove-route``: ``gpu``, ``host`` or ``load``).
* Pull-on-route (``pull_min_tokens`` > 0): when the chosen engine (say, an idle one) holds at
  least ``pull_min_tokens`` fewer of the prompt than another engine's host store does (a busy
  holder), the router copies that prefix to it first (a controller copy job, waited for at
  most ``pull_wait_s``) and sends the request there once it is done (``x-kvmove-route:
  pulled``); a copy that fails or takes longer leaves the request routed as ranked.
* Failures: an engine that cannot be reached, or that answers 5xx before anything was sent to
  the client, is taken out of rotation for a while (:class:`~sidecar.router.fleet.EngineBook`)
  and the request is sent to the next engine; once bytes went to the client, a failure ends
  the answer. A client that disconnects ends the upstream request (vLLM then aborts it).
* Auth: the client's ``Authorization`` header goes to the engine as it came (engines with
  ``--api-key`` check it); the router reads the controller with the fleet secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from sidecar.httpkit import ERROR_HANDLERS, ApiError, json_response, metrics_handler
from sidecar.router.fleet import Engine, EngineBook

logger = logging.getLogger("vllm_kvmove.router")

ROUTED = ("/v1/completions", "/v1/chat/completions")
MAX_BODY = 64 << 20
_HEAD_TOKENS = 64  # a prompt's prefix, for rendezvous hashing: shorter than a block
# Request headers passed to the engine (hop-by-hop ones and the body's length are not).
_FORWARD = ("authorization", "content-type", "accept", "user-agent", "x-request-id")


@dataclass
class RouterSettings:
    """Settings of ``kvmove-router``.

    Attributes:
        host, port: where it serves.
        controller: the controller's base URL ("" : route by load among ``engines`` only).
        controller_token: the fleet secret, for the controller's API.
        engines: ``{instance_id: url}`` of engines to route to without a controller.
        host_weight: how much a token in an engine's host store counts against one in its
            GPU prefix cache (loading it costs a copy; the GPU tier none).
        load_tokens: tokens of prefill one request in flight at an engine is worth (how
            much prefix match a busier engine must offer to be chosen).
        cooldown_s: how long an engine that failed stays out of rotation.
        connect_timeout_s: connecting to an engine; ``tokenize_timeout_s``: its /tokenize.
        pull_min_tokens: pull-on-route when another engine's host store holds at least this
            many more of the prompt than the chosen engine (0: never).
        pull_wait_s: the longest a request waits for its prefix's copy.
        decode_weight: what a request in flight that is already streaming its answer weighs
            in an engine's load, against 1 for one still waiting for its first token (a
            decoding request slows a new prefill far less than a prefill ahead of it does).
        expect_s: how long a prompt the router sent to an engine counts as that engine's
            without its KV events confirming it.
        working_set_s: how long a prompt routed to an engine counts in its working set.
    """

    host: str = "127.0.0.1"
    port: int = 9100
    controller: str = ""
    controller_token: str = ""
    engines: dict[str, str] = field(default_factory=dict)
    host_weight: float = 0.8
    load_tokens: int = 1024
    cooldown_s: float = 5.0
    connect_timeout_s: float = 2.0
    tokenize_timeout_s: float = 5.0
    pull_min_tokens: int = 0
    pull_wait_s: float = 2.0
    decode_weight: float = 0.25
    expect_s: float = 30.0
    working_set_s: float = 60.0


class RouterMetrics:
    """The router's Prometheus metrics, in their own registry."""

    def __init__(self, book: EngineBook):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("kvmove_router_requests_total",
                                "Requests routed, by engine and why it was chosen",
                                ["engine", "route"], registry=r)
        self.retries = Counter("kvmove_router_retries_total",
                               "Requests sent to another engine because one failed before "
                               "answering, by the engine that failed", ["engine"], registry=r)
        self.routing_seconds = Histogram(
            "kvmove_router_routing_seconds", "Time to choose an engine (tokenize, look up, pull)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.failures = Counter("kvmove_router_engine_failures_total",
                                "Times an engine could not be reached or failed, by engine and "
                                "what was asked (tokenize, request)", ["engine", "stage"],
                                registry=r)
        self.pulls = Counter("kvmove_router_pulls_total",
                             "Prefixes copied to the chosen engine before its request, by "
                             "outcome (done, failed)", ["outcome"], registry=r)
        self.matched = Counter("kvmove_router_matched_tokens_total",
                               "Prompt tokens the chosen engine held, by tier", ["tier"],
                               registry=r)
        inflight = Gauge("kvmove_router_inflight", "Requests in flight, by engine", ["engine"],
                         registry=r)
        self._inflight = inflight
        self._book = book

    def observe_inflight(self) -> None:
        for e in self._book.engines.values():
            self._inflight.labels(e.instance_id).set(e.inflight)


@dataclass
class Choice:
    """An engine for one request, and why."""

    engine: Engine
    score: float
    gpu: int
    host: int
    route: str


class Router:
    """The router's state and routing (see the module docstring)."""

    def __init__(self, settings: RouterSettings):
        self.settings = settings
        headers = ({"Authorization": f"Bearer {settings.controller_token}"}
                   if settings.controller_token else {})
        self.control = httpx.AsyncClient(timeout=5.0, headers=headers)
        # Upstream answers may stream for minutes: only connecting is bounded.
        self.upstream = httpx.AsyncClient(timeout=httpx.Timeout(
            None, connect=settings.connect_timeout_s), limits=httpx.Limits(
            max_connections=None, max_keepalive_connections=64))
        self.book = EngineBook(settings.controller, settings.engines, self.control,
                               cooldown_s=settings.cooldown_s, probe=self.upstream,
                               decode_weight=settings.decode_weight,
                               expect_s=settings.expect_s,
                               working_set_s=settings.working_set_s)
        self.metrics = RouterMetrics(self.book)

    async def start(self) -> None:
        await self.book.start()

    async def stop(self) -> None:
        await self.book.stop()
        await self.control.aclose()
        await self.upstream.aclose()

    # -- routing ---------------------------------------------------------------------------
    def usable(self) -> list[Engine]:
        now = time.monotonic()
        return [e for e in self.book.engines.values() if e.usable(now)]

    async def tokens_of(self, path: str, body: dict, headers: dict) -> list[int] | None:
        """The prompt's token ids, from the least loaded engine's ``/tokenize`` (which applies
        the chat template as the engine will); None when there is no single prompt or no
        engine answers."""
        if path == "/v1/completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return prompt
            if not isinstance(prompt, str):
                return None  # a batch of prompts: no one prefix to route by
            ask = {"model": body.get("model"), "prompt": prompt}
        else:
            messages = body.get("messages")
            if not isinstance(messages, list):
                return None
            ask = {"model": body.get("model"), "messages": messages,
                   "add_generation_prompt": body.get("add_generation_prompt", True)}
            for key in ("chat_template", "chat_template_kwargs", "continue_final_message"):
                if key in body:
                    ask[key] = body[key]
        engines = sorted(self.usable(), key=lambda e: e.load)
        for e in engines[:2]:
            try:
                r = await self.upstream.post(f"{e.url}/tokenize", json=ask, headers=headers,
                                             timeout=self.settings.tokenize_timeout_s)
                if r.status_code == 200:
                    return list(r.json()["tokens"])
                return None  # the request itself is bad: the engine will say so
            except (httpx.HTTPError, ValueError, KeyError):
                self.book.failed(e)
                self.metrics.failures.labels(e.instance_id, "tokenize").inc()
        return None

    async def host_prefixes(self, tokens: list[int]) -> dict[str, int]:
        """Tokens of ``tokens`` each engine's host store holds, per the controller."""
        if not self.settings.controller:
            return {}
        try:
            r = await self.control.post(f"{self.book.controller}/lookup", json={"tokens": tokens})
            r.raise_for_status()
            return {iid: int(v[1]) for iid, v in r.json()["layout_info"].items()}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError):
            logger.warning("controller lookup failed; routing by the GPU tier and load only")
            return {}

    def rank(self, tokens: list[int] | None, host: dict[str, int],
             chains: dict | None = None) -> list[Choice]:
        """The usable engines, best first (see the module docstring). ``chains``: the
        prompt's block hashes per hashing, filled here for :meth:`EngineBook.expect`."""
        s = self.settings
        out = []
        chains = {} if chains is None else chains
        for e in self.usable():
            gpu = self.book.gpu_prefix(e, tokens, chains) if tokens else 0
            held = host.get(e.instance_id, 0)
            extra = max(0, held - gpu)
            score = gpu + s.host_weight * extra - s.load_tokens * e.load
            # Named for the tier that gives the most: the GPU tier holds full blocks only,
            # the host store a prompt's partial last chunk too.
            route = "gpu" if gpu and gpu >= extra else "host" if extra else "load"
            out.append(Choice(e, score, gpu, held, route))
        # A draining engine is going away, its KV with it: the last resort.
        head = head_digest(tokens)
        out.sort(key=lambda c: (c.engine.draining, -c.score, c.engine.load,
                                -rendezvous(head, c.engine.instance_id)))
        if tokens and out and not any(c.gpu or c.host for c in out):
            least = min(c.engine.load for c in out)
            near = [c for c in out if c.engine.load <= least + 1 and not c.engine.draining]
            if near:
                best = min(near, key=lambda c: (self.book.working_set(c.engine),
                                                -rendezvous(head, c.engine.instance_id)))
                out.remove(best)
                out.insert(0, best)
        return out

    async def pull(self, tokens: list[int], choices: list[Choice]) -> Choice | None:
        """Pull-on-route (see the module docstring): copy the prompt's prefix from the engine
        whose host store holds most of it to the chosen one, if that gains at least
        ``pull_min_tokens``; the chosen engine, now holding it, or None."""
        s = self.settings
        if not s.pull_min_tokens or not self.settings.controller or len(choices) < 2:
            return None
        chosen = choices[0]
        holder = max(choices[1:], key=lambda c: c.host)
        if holder.host - max(chosen.gpu, chosen.host) < s.pull_min_tokens:
            return None
        try:
            r = await self.control.post(
                f"{self.book.controller}/move", params={"wait": s.pull_wait_s},
                timeout=s.pull_wait_s + 5, json={
                    "old_position": [holder.engine.instance_id, "LocalCPUBackend"],
                    "new_position": [chosen.engine.instance_id, "LocalCPUBackend"],
                    "tokens": tokens, "copy": True})
            done = r.status_code == 200 and r.json().get("status") == "done"
        except (httpx.HTTPError, ValueError):
            done = False
        self.metrics.pulls.labels("done" if done else "failed").inc()
        if not done:
            logger.info("pull of %d tokens %s -> %s did not finish in time; routing as ranked",
                        holder.host, holder.engine.instance_id, chosen.engine.instance_id)
            return None
        return Choice(chosen.engine, chosen.score, chosen.gpu, holder.host, "pulled")


def head_digest(tokens: list[int] | None) -> bytes:
    """What names a prompt's prefix for rendezvous hashing: its first tokens (a system
    prompt's start), b"" without tokens."""
    if not tokens:
        return b""
    # repr: a client's token list is not validated here (any int): the engine judges it.
    return hashlib.blake2b(repr(tokens[:_HEAD_TOKENS]).encode(), digest_size=16).digest()


def rendezvous(head: bytes, instance_id: str) -> int:
    """``instance_id``'s weight for the prefix ``head`` (highest random weight hashing): each
    prefix prefers one engine, every router replica agrees which, and an engine that leaves
    moves only its own prefixes."""
    return int.from_bytes(hashlib.blake2b(head + instance_id.encode(), digest_size=8).digest(),
                          "big")


# -- handlers --------------------------------------------------------------------------------
def _router(request: Request) -> Router:
    return request.app.state.router


def _forwarded(request: Request) -> dict[str, str]:
    """The client's headers that go on to the engine (:data:`_FORWARD`)."""
    return {k: v for k, v in request.headers.items() if k.lower() in _FORWARD}


async def routed(request: Request) -> Response:
    router = _router(request)
    path = request.url.path
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError("payload_too_large", f"body of {len(raw)} bytes; at most {MAX_BODY}")
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError("bad_request", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError("bad_request", "the body must be a JSON object")
    headers = _forwarded(request)
    t0 = time.perf_counter()
    tokens = await router.tokens_of(path, body, headers)
    host = await router.host_prefixes(tokens) if tokens else {}
    chains: dict = {}
    choices = router.rank(tokens, host, chains)
    if tokens and choices:
        pulled = await router.pull(tokens, choices)
        if pulled is not None:
            choices = [pulled] + choices[1:]
    router.metrics.routing_seconds.observe(time.perf_counter() - t0)
    if not choices:
        raise ApiError("unavailable", "no engine is up")
    for choice in choices:
        e = choice.engine
        upstream_request = router.upstream.build_request("POST", e.url + path, content=raw,
                                                         headers=headers)
        e.inflight += 1
        try:
            upstream = await router.upstream.send(upstream_request, stream=True)
        except httpx.HTTPError as err:
            e.inflight -= 1
            logger.warning("engine %s failed before answering (%s); trying the next",
                           e.instance_id, err)
            router.book.failed(e)
            router.metrics.failures.labels(e.instance_id, "request").inc()
            router.metrics.retries.labels(e.instance_id).inc()
            continue
        if upstream.status_code >= 500 and choice is not choices[-1]:
            await upstream.aclose()
            e.inflight -= 1
            logger.warning("engine %s answered %d; trying the next", e.instance_id,
                           upstream.status_code)
            router.book.failed(e)
            router.metrics.failures.labels(e.instance_id, "request").inc()
            router.metrics.retries.labels(e.instance_id).inc()
            continue
        if tokens:
            router.book.expect(e, tokens, chains)
            router.book.routed(e, head_digest(tokens), len(tokens))
        router.metrics.requests.labels(e.instance_id, choice.route).inc()
        router.metrics.matched.labels("gpu").inc(choice.gpu)
        router.metrics.matched.labels("host").inc(max(0, choice.host - choice.gpu))
        out_headers = {"x-kvmove-engine": e.instance_id, "x-kvmove-route": choice.route}
        if "content-type" in upstream.headers:
            out_headers["content-type"] = upstream.headers["content-type"]
        flight = _Flight(e, upstream)
        return StreamingResponse(flight.relay(), status_code=upstream.status_code,
                                 headers=out_headers, background=BackgroundTask(flight.done))
    tried = ", ".join(c.engine.instance_id for c in choices)
    raise ApiError("unavailable", f"every engine failed ({tried})")


class _Flight:
    """One request in flight at an engine: its answer relayed, and its share of the engine's
    load kept (counted in ``inflight`` until done, in ``decoding`` from its first bytes)."""

    def __init__(self, engine: Engine, upstream: httpx.Response):
        self.engine, self.upstream, self.decoding = engine, upstream, False

    async def relay(self) -> AsyncIterator[bytes]:
        """The engine's answer, as it arrives. If the client goes away, Starlette cancels
        this, and closing the upstream request here (or in :meth:`done`, which runs either
        way) makes vLLM abort it."""
        try:
            async for chunk in self.upstream.aiter_raw():
                if not self.decoding:
                    self.decoding = True
                    self.engine.decoding += 1
                yield chunk
        finally:
            await self.upstream.aclose()

    async def done(self) -> None:
        self.engine.inflight -= 1
        if self.decoding:
            self.engine.decoding -= 1
            self.decoding = False
        await self.upstream.aclose()


async def models(request: Request) -> Response:
    router = _router(request)
    headers = _forwarded(request)
    for e in sorted(router.usable(), key=lambda e: e.load):
        try:
            r = await router.upstream.get(f"{e.url}/v1/models", headers=headers, timeout=5.0)
        except httpx.HTTPError:
            router.book.failed(e)
            continue
        return Response(r.content, status_code=r.status_code,
                        media_type=r.headers.get("content-type", "application/json"))
    raise ApiError("unavailable", "no engine is up")


async def health(request: Request) -> Response:
    router = _router(request)
    usable = router.usable()
    now = time.monotonic()
    detail = {e.instance_id: {"usable": e.usable(now), "inflight": e.inflight,
                              "decoding": e.decoding, "others": e.others,
                              "gpu_blocks": len(e.gpu_blocks),
                              "expected_blocks": len(e.expected)}
              for e in router.book.engines.values()}
    return json_response({"status": "ok" if usable else "no_engine",
                          "engines": len(router.book.engines), "engines_up": len(usable),
                          "by_engine": detail}, status=200 if usable else 503)


async def metrics(request: Request) -> Response:
    router = _router(request)
    router.metrics.observe_inflight()
    return await request.app.state.metrics(request)


def create_router_app(settings: RouterSettings) -> Starlette:
    """Build the router's Starlette app; its clients and subscriptions live with its
    lifespan."""
    router = Router(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    routes = [Route(p, routed, methods=["POST"]) for p in ROUTED] + [
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers=ERROR_HANDLERS, lifespan=lifespan)
    app.state.router = router
    app.state.metrics = metrics_handler(router.metrics.registry)
    return app
