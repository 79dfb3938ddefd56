"""The kvmove controller: federates the engines' sidecars and runs move jobs.

Contract
--------
* One process, one asyncio loop: a Starlette app on uvicorn (HTTP API) plus two ZMQ sockets
  opened in the app's lifespan — a ROUTER on the reply port (sidecars register, heartbeat,
  and answer commands on it) and a PULL on the pull port (store events).
* The index (:class:`ChunkIndex`) — which instance holds which chunk — is built only from
  sidecar snapshots and sequence-numbered events; ``/lookup`` answers from it without asking
  any sidecar. A gap in an instance's sequence (or a heartbeat showing events it never got)
  triggers a :class:`~sidecar.wire.Resync` and a fresh snapshot.
* A move or copy is a job (:class:`Job`): ``POST /move`` validates, creates the job and
  answers at once (or, with ``?wait=S``, when the job ends); the job then pins the chunks at
  the source, has the destination fetch them in batches, two in flight (from its mapping of
  the source's pool on the same host, over NIXL otherwise; the destination verifies checksums
  before publishing), unpins them, and — for a move only, and only once the destination has
  them — deletes them at the source. A failed batch, or ``POST /events/{id}/cancel``, stops
  new batches; the job ends only once the batches already sent have settled. The job's state
  is one of ``pending``, ``running``, ``done``, ``failed``, ``cancelled``.
* Every command to a sidecar carries a request id and a timeout; any number may be in flight
  to one sidecar. Errors map to HTTP statuses in one place (:mod:`sidecar.errors`).

HTTP routes:
  ``POST /move``, ``GET /events``, ``GET /events/{event_id}``,
  ``POST /events/{event_id}/cancel``, ``POST /check_finish``,
  ``POST /lookup``, ``POST /pin``, ``POST /unpin``, ``POST /clear``, ``GET /instances``,
  ``GET /health``, ``GET /metrics`` (Prometheus), ``GET /`` (status page); LMCache's
  ``POST /health`` and ``POST /query_worker_info`` shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import struct
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx
import msgspec
import zmq
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar import wire
from sidecar.errors import (ERROR_HANDLERS, ApiError, check_bearer, json_response, query_limit,
                            read_json, token_matches)
from sidecar.metrics import ControllerMetrics, metrics_endpoint
from sidecar.zmqio import LoopSocket
from vllm_kvmove.hashing import ChunkSpan, chunk_spans

logger = logging.getLogger("vllm_kvmove.controller")

MAX_TOKENS = 1_000_000
# Default for ControllerSettings.fetch_batch_bytes.
FETCH_BATCH_BYTES = 256 << 20
# Fetch commands of one job in flight at once: one copies while the other verifies checksums.
FETCHES_IN_FLIGHT = 2
# How long a heartbeat may show events we never received before we ask for a snapshot.
_RESYNC_GRACE_S = 1.0
_TOKEN_LIMIT = 1 << 31


@dataclass
class ControllerSettings:
    """Controller options (see ``kvmove-controller --help``)."""

    host: str = "localhost"
    port: int = 9000
    pull_port: int = 8300
    reply_port: int = 8400
    heartbeat_timeout_s: float = 5.0
    command_timeout_s: float = 60.0
    tokenize_timeout_s: float = 10.0
    max_jobs: int = 10000
    # A move's fetch is split into commands of at most this many bytes, so its progress (bytes
    # moved) advances while it runs and a failure wastes at most two batches; each command is
    # still one NIXL transfer of many chunks. Smaller batches cost a round trip each.
    fetch_batch_bytes: int = FETCH_BATCH_BYTES
    # Shared secret (default: env KVMOVE_API_TOKEN). When set: mutating HTTP endpoints need
    # "Authorization: Bearer <token>", sidecars must register with it, commands carry it.
    api_token: str = field(default="", repr=False)


class JobFailed(Exception):
    """A job step failed; ``kind`` is a key of the error map (e.g. ``store_full``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class JobCancelled(Exception):
    """A move or copy stopped at a cancel request, with the source's pins released."""


@dataclass
class Instance:
    """What the controller knows of one engine (from its Register and heartbeats)."""

    reg: wire.Register
    identity: bytes
    registered_at: float
    last_heartbeat: float
    applied_seq: int = 0
    behind_since: float | None = None
    num_chunks: int = 0
    used_bytes: int = 0
    available_bytes: int = 0  # free or evictable, as of the last heartbeat

    @property
    def instance_id(self) -> str:
        return self.reg.instance_id


class ChunkIndex:
    """Which instance holds which chunk: ``key -> {instance_id: num_tokens}``."""

    def __init__(self) -> None:
        self._holders: dict[bytes, dict[str, int]] = {}
        self._by_instance: dict[str, set[bytes]] = {}

    def add(self, instance_id: str, key: bytes, num_tokens: int) -> None:
        self._holders.setdefault(key, {})[instance_id] = num_tokens
        self._by_instance.setdefault(instance_id, set()).add(key)

    def remove(self, instance_id: str, key: bytes) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.pop(instance_id, None)
            if not holders:
                del self._holders[key]
        self._by_instance.get(instance_id, set()).discard(key)

    def replace(self, instance_id: str, chunks: Sequence[wire.ChunkRecord]) -> None:
        self.drop_instance(instance_id)
        for c in chunks:
            self.add(instance_id, c.key, c.num_tokens)

    def drop_instance(self, instance_id: str) -> None:
        for key in self._by_instance.pop(instance_id, set()):
            holders = self._holders.get(key)
            if holders is not None:
                holders.pop(instance_id, None)
                if not holders:
                    del self._holders[key]

    def held_prefix(self, instance_id: str, spans: Sequence[ChunkSpan]) -> int:
        """Number of leading ``spans`` that ``instance_id`` holds."""
        n = 0
        for s in spans:
            if instance_id not in self._holders.get(s.key, ()):
                break
            n += 1
        return n

    def prefix_holders(self, spans: Sequence[ChunkSpan]) -> dict[str, int]:
        """:meth:`held_prefix` of every instance at once, walking ``spans`` once: the number
        of leading ``spans`` each instance holding ``spans[0]`` holds."""
        out: dict[str, int] = {}
        get = self._holders.get
        alive: set[str] | None = None
        for n, s in enumerate(spans, 1):
            holders = get(s.key)
            if not holders:
                break
            alive = set(holders) if alive is None else alive.intersection(holders)
            if not alive:
                break
            out.update(dict.fromkeys(alive, n))
        return out

    def holds(self, instance_id: str, key: bytes) -> bool:
        return instance_id in self._holders.get(key, ())

    def count(self, instance_id: str) -> int:
        return len(self._by_instance.get(instance_id, ()))

    def __len__(self) -> int:
        return len(self._holders)


@dataclass
class Job:
    """One operation on chunks, reported by event id.

    ``kind`` is "move" or "copy" (asynchronous: ``source`` → ``destination``), or "pin",
    "unpin", "clear" (one instance, ``source``; they complete before their HTTP answer).
    """

    event_id: str
    kind: str
    source: str
    destination: str
    keys: list[bytes]
    num_tokens: int
    num_chunks: int = 0
    status: str = "pending"
    bytes: int = 0
    total_bytes: int = 0
    error: str | None = None
    error_kind: str | None = None
    created: float = field(default_factory=time.monotonic)
    ended: float | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # Set by POST /events/{id}/cancel: no further fetch batch starts.
    cancel_requested: bool = False

    def to_status(self) -> wire.JobStatusBody:
        end = self.ended if self.ended is not None else time.monotonic()
        return wire.JobStatusBody(
            event_id=self.event_id, status=self.status, kind=self.kind, source=self.source,
            destination=self.destination, num_tokens=self.num_tokens, num_chunks=self.num_chunks,
            bytes=self.bytes, total_bytes=self.total_bytes, elapsed_s=round(end - self.created, 6),
            error=self.error, error_kind=self.error_kind)


class Controller:
    """State and protocol of the controller; the HTTP app is a thin layer over it."""

    def __init__(self, settings: ControllerSettings):
        self.settings = settings
        self.controller_id = uuid.uuid4().hex
        self.instances: dict[str, Instance] = {}
        self.index = ChunkIndex()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        # In-flight commands: req_id -> (instance_id, future of its Reply).
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._req_ids = itertools.count(1)
        self._router: LoopSocket | None = None
        self._pull: LoopSocket | None = None
        self._tasks: list[asyncio.Task] = []
        self._job_tasks: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None
        self.metrics = ControllerMetrics(self)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        ctx = zmq.Context.instance()
        host = "127.0.0.1" if self.settings.host == "localhost" else self.settings.host
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted sidecar takes its name back
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"tcp://{host}:{self.settings.reply_port}")
        self._router = LoopSocket(router)
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(f"tcp://{host}:{self.settings.pull_port}")
        self._pull = LoopSocket(pull)
        self._http = httpx.AsyncClient(timeout=self.settings.tokenize_timeout_s)
        self._tasks = [asyncio.create_task(self._router_loop()),
                       asyncio.create_task(self._pull_loop()),
                       asyncio.create_task(self._watchdog_loop())]

    async def stop(self) -> None:
        for t in self._tasks + list(self._job_tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._job_tasks, return_exceptions=True)
        for s in (self._router, self._pull):
            if s is not None:
                s.close()
        if self._http is not None:
            await self._http.aclose()

    # -- sidecar protocol ------------------------------------------------------------------
    async def _send(self, identity: bytes, msg: Any) -> None:
        assert self._router is not None
        try:
            self._router.send_multipart([identity, wire.sidecar_encoder.encode(msg)])
        except zmq.ZMQError as e:
            logger.warning("cannot send %s to %r: %s", type(msg).__name__, identity, e)

    async def _router_loop(self) -> None:
        assert self._router is not None
        while True:
            identity, raw = await self._router.recv_multipart()
            try:
                msg = wire.sidecar_msg_decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("dropping undecodable message from %r", identity)
                continue
            try:
                await self._on_sidecar_message(identity, msg)
            except Exception:  # noqa: BLE001 - one bad message must not stop the controller
                logger.exception("error handling %s from %r", type(msg).__name__, identity)

    async def _on_sidecar_message(self, identity: bytes, msg: Any) -> None:
        now = time.monotonic()
        if isinstance(msg, wire.Reply):
            if msg.heartbeat is not None:
                inst = self.instances.get(identity.decode(errors="replace"))
                if inst is not None:
                    await self._on_heartbeat(inst, msg.heartbeat, now)
            pending = self._pending.pop(msg.req_id, None)
            if pending is not None and not pending[1].done():
                pending[1].set_result(msg)
            return
        if isinstance(msg, wire.Register):
            if msg.protocol != wire.PROTOCOL_VERSION or identity != msg.instance_id.encode():
                logger.warning("refusing registration of %r (protocol %d)", identity, msg.protocol)
                return
            if not token_matches(self.settings.api_token, msg.auth):
                logger.warning("refusing registration of %r: wrong or missing API token", identity)
                return
            old = self.instances.get(msg.instance_id)
            self.instances[msg.instance_id] = Instance(msg, identity, now, now,
                                                       available_bytes=msg.capacity_bytes)
            if old is not None and old.reg.incarnation != msg.incarnation:
                self.index.drop_instance(msg.instance_id)
            logger.info("instance %s registered (engine %s, sidecar %s)", msg.instance_id,
                        msg.engine_url, msg.sidecar_url)
            await self._send(identity, wire.RegisterAck(self.controller_id))
            return
        inst = self.instances.get(identity.decode(errors="replace"))
        if inst is None:
            await self._send(identity, wire.Resync("unknown instance"))
            return
        if isinstance(msg, wire.Goodbye):
            self.index.drop_instance(inst.instance_id)
            del self.instances[inst.instance_id]
            logger.info("instance %s left (its engine is shutting down)", inst.instance_id)
        elif isinstance(msg, wire.Snapshot):
            self.index.replace(inst.instance_id, msg.chunks)
            inst.applied_seq, inst.behind_since = msg.seq, None
            inst.num_chunks = len(msg.chunks)
        elif isinstance(msg, wire.Heartbeat):
            await self._on_heartbeat(inst, msg, now)

    async def _on_heartbeat(self, inst: Instance, hb: wire.Heartbeat, now: float) -> None:
        """A heartbeat, alone or in a command's reply: liveness, store summary, and a resync
        if the store's events stay ahead of what we applied."""
        inst.last_heartbeat = now
        inst.num_chunks, inst.used_bytes = hb.num_chunks, hb.used_bytes
        inst.available_bytes = hb.available_bytes
        if hb.seq == inst.applied_seq:
            inst.behind_since = None
        elif hb.seq < inst.applied_seq:
            await self._send(inst.identity, wire.Resync("store sequence went backwards"))
        elif inst.behind_since is None:
            inst.behind_since = now  # events may still be in flight on the other socket
        elif now - inst.behind_since > _RESYNC_GRACE_S:
            inst.behind_since = None
            await self._send(inst.identity, wire.Resync("missed store events"))

    async def _pull_loop(self) -> None:
        assert self._pull is not None
        while True:
            raw = await self._pull.recv()
            try:
                batch = wire.event_batch_decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("dropping undecodable event batch")
                continue
            inst = self.instances.get(batch.instance_id)
            if inst is None:
                continue  # not registered yet: its snapshot will cover these
            for ev in batch.events:
                if ev.seq <= inst.applied_seq:
                    continue  # already covered by a snapshot
                if ev.seq != inst.applied_seq + 1:
                    logger.warning("instance %s: event gap (%d after %d); resyncing",
                                   inst.instance_id, ev.seq, inst.applied_seq)
                    await self._send(inst.identity, wire.Resync("event gap"))
                    break
                if ev.kind == "admit":
                    self.index.add(inst.instance_id, ev.key, ev.num_tokens)
                else:
                    self.index.remove(inst.instance_id, ev.key)
                inst.applied_seq = ev.seq

    async def _watchdog_loop(self) -> None:
        """Fail the commands in flight to an instance as soon as it stops heartbeating, so a
        job waiting on a dead peer ends within the heartbeat timeout, not the command's."""
        while True:
            await asyncio.sleep(0.25)
            down = {iid for iid, inst in self.instances.items() if not self.is_up(inst)}
            for req_id, (iid, fut) in list(self._pending.items()):
                if (iid in down or iid not in self.instances) and not fut.done():
                    fut.set_result(wire.Reply(
                        req_id=req_id, ok=False, error_kind="unavailable",
                        error=f"instance {iid} stopped heartbeating "
                              f"({self.settings.heartbeat_timeout_s} s)"))

    async def command(self, instance_id: str, msg: Any, timeout: float | None = None) -> wire.Reply:
        """Send one command (its ``req_id`` is assigned here) and await the reply.

        Returns a failed :class:`~sidecar.wire.Reply` of kind ``timeout`` or ``unavailable``
        instead of raising, so jobs can report the cause.
        """
        inst = self.instances.get(instance_id)
        if inst is None:
            return wire.Reply(req_id=0, ok=False, error_kind="unavailable",
                              error=f"instance {instance_id} is not registered")
        msg.req_id = next(self._req_ids)
        msg.auth = self.settings.api_token
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg.req_id] = (instance_id, fut)
        await self._send(inst.identity, msg)
        timeout = self.settings.command_timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return wire.Reply(req_id=msg.req_id, ok=False, error_kind="timeout",
                              error=f"{type(msg).__name__} to {instance_id}: no answer in {timeout} s")
        finally:
            self._pending.pop(msg.req_id, None)

    # -- queries ---------------------------------------------------------------------------
    def is_up(self, inst: Instance) -> bool:
        return time.monotonic() - inst.last_heartbeat <= self.settings.heartbeat_timeout_s

    def instance(self, instance_id: str) -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            known = ", ".join(sorted(self.instances)) or "none"
            raise ApiError("not_found", f"unknown instance {instance_id!r} (registered: {known})")
        return inst

    async def tokens_of(self, tokens: list[int] | None, prompt: str | None,
                        tokenizer: Instance | None) -> list[int]:
        """Validate ``tokens``, or tokenize ``prompt`` through an engine's own ``/tokenize``."""
        if (tokens is None) == (prompt is None):
            raise ApiError("bad_request", "give exactly one of 'tokens' and 'prompt'")
        if tokens is not None:
            if not tokens:
                raise ApiError("bad_request", "'tokens' is empty")
            if len(tokens) > MAX_TOKENS:
                raise ApiError("bad_request", f"'tokens' has {len(tokens)} ids; at most {MAX_TOKENS}")
            try:  # at C speed: each id fits an int32 and none is negative (no sign bit set)
                valid = struct.pack(f"<{len(tokens)}i", *tokens)[3::4].isascii()
            except struct.error:
                valid = False
            if not valid:  # find the first offending id, to name it
                for i, t in enumerate(tokens):
                    if not 0 <= t < _TOKEN_LIMIT:
                        raise ApiError("bad_request", f"tokens[{i}] = {t} is not a valid token id")
            return tokens
        if not prompt:
            raise ApiError("bad_request", "'prompt' is empty")
        if tokenizer is None:
            raise ApiError("unavailable", "no registered engine to tokenize the prompt")
        assert self._http is not None
        url = tokenizer.reg.engine_url.rstrip("/") + "/tokenize"
        try:
            r = await self._http.post(url, json={"prompt": prompt})
        except httpx.HTTPError as e:
            raise ApiError("unavailable", f"cannot tokenize through {url}: {e}") from None
        if r.status_code != 200:
            raise ApiError("unavailable", f"{url} answered {r.status_code}: {r.text[:200]}")
        try:
            return list(r.json()["tokens"])
        except (ValueError, KeyError, TypeError):
            raise ApiError("unavailable", f"{url} returned no token list") from None

    def lookup(self, tokens: list[int]) -> dict[str, int]:
        """Matched prefix tokens per live instance that holds at least one chunk of ``tokens``
        (an instance that stopped heartbeating is left out: it cannot serve them now)."""
        # Per (fingerprint, chunk_size) group with a live instance: its spans, hashed once, and
        # the leading spans each holder holds, from one walk of the index over them.
        groups: dict[tuple[str, int], tuple[list[ChunkSpan], dict[str, int]]] = {}
        out: dict[str, int] = {}
        for iid, inst in self.instances.items():
            reg = inst.reg
            fp = (reg.fingerprint, reg.chunk_size)
            group = groups.get(fp)
            if group is None:
                if not self.is_up(inst):
                    continue
                spans = chunk_spans(tokens, reg.chunk_size, reg.fingerprint)
                group = groups[fp] = (spans, self.index.prefix_holders(spans))
            n = group[1].get(iid)
            if n and self.is_up(inst):
                out[iid] = group[0][n - 1].end
        return out

    # -- jobs ------------------------------------------------------------------------------
    def create_move(self, src: Instance, dst: Instance, tokens: list[int], copy: bool) -> Job:
        """Validate a move and start its job. Raises ApiError; changes nothing on error."""
        if src.instance_id == dst.instance_id:
            raise ApiError("bad_request", "source and destination are the same instance")
        for inst, role in ((src, "source"), (dst, "destination")):
            if not self.is_up(inst):
                raise ApiError("unavailable", f"{role} instance {inst.instance_id} is down "
                                              f"(no heartbeat for {self.settings.heartbeat_timeout_s} s)")
        if src.reg.fingerprint != dst.reg.fingerprint:
            diffs = [f"{k}: {src.reg.layout.get(k)!r} != {dst.reg.layout.get(k)!r}"
                     for k in sorted(set(src.reg.layout) | set(dst.reg.layout))
                     if src.reg.layout.get(k) != dst.reg.layout.get(k)]
            raise ApiError("incompatible", f"KV of {src.instance_id} and {dst.instance_id} is not "
                                           f"compatible: {'; '.join(diffs) or 'fingerprints differ'}")
        spans = chunk_spans(tokens, src.reg.chunk_size, src.reg.fingerprint)
        n = self.index.held_prefix(src.instance_id, spans)
        if n == 0:
            raise ApiError("not_found", f"{src.instance_id} holds no KV for a prefix of these "
                                        f"{len(tokens)} tokens")
        missing = n - sum(1 for s in spans[:n] if self.index.holds(dst.instance_id, s.key))
        needed = missing * dst.reg.slot_bytes
        if needed > dst.available_bytes:
            raise ApiError("store_full", f"{dst.instance_id} can free {dst.available_bytes} bytes "
                                         f"(the rest is pinned or in use); the move needs {needed}")
        job = self._new_job("copy" if copy else "move", src.instance_id, dst.instance_id,
                            [s.key for s in spans[:n]], spans[n - 1].end)
        task = asyncio.create_task(self._run_job(job))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        return job

    def _new_job(self, kind: str, source: str, destination: str, keys: list[bytes],
                 num_tokens: int) -> Job:
        job = Job(uuid.uuid4().hex, kind, source, destination, keys, num_tokens, len(keys))
        self.jobs[job.event_id] = job
        self.metrics.job_started(job)
        while len(self.jobs) > self.settings.max_jobs:
            old_id, old = next(iter(self.jobs.items()))
            if old.status not in wire.FINAL_STATES:
                break
            del self.jobs[old_id]
        return job

    async def run_store_op(self, kind: str, inst: Instance, tokens: list[int] | None) -> Job:
        """Pin, unpin or clear (all chunks when ``tokens`` is None) at one instance; waits.

        Raises:
            ApiError: instance down, nothing held for ``tokens``, or the sidecar failed.
        """
        if not self.is_up(inst):
            raise ApiError("unavailable", f"instance {inst.instance_id} is down")
        keys: list[bytes] | None = None
        num_tokens = 0
        if tokens is not None:
            spans = chunk_spans(tokens, inst.reg.chunk_size, inst.reg.fingerprint)
            n = self.index.held_prefix(inst.instance_id, spans)
            if n == 0:
                raise ApiError("not_found", f"{inst.instance_id} holds no KV for a prefix of "
                                            f"these {len(tokens)} tokens")
            keys, num_tokens = [s.key for s in spans[:n]], spans[n - 1].end
        job = self._new_job(kind, inst.instance_id, "", keys or [], num_tokens)
        job.status = "running"
        if kind == "clear":
            msg: Any = wire.ClearChunks(keys=keys)
        else:
            msg = wire.PersistChunks(keys=keys or [], persistent=(kind == "pin"))
        reply = await self.command(inst.instance_id, msg)
        if reply.ok:
            job.num_chunks = reply.count  # for a whole-store clear, what was there (num_tokens: 0)
        self._end_job(job, None if reply.ok else reply.error, reply.error_kind)
        if not reply.ok:
            raise ApiError(reply.error_kind or "internal", f"{kind} at {inst.instance_id}: {reply.error}")
        return job

    def _end_job(self, job: Job, error: str | None, kind: str | None = None,
                 cancelled: bool = False) -> None:
        job.error, job.error_kind = error, kind if error and not cancelled else None
        job.status = "cancelled" if cancelled else "failed" if error else "done"
        job.ended = time.monotonic()
        self.metrics.job_ended(job)
        job.finished.set()

    async def _run_job(self, job: Job) -> None:
        job.status = "running"
        cancelled = False
        try:
            await self._transfer(job)
            error = kind = None
        except JobCancelled as e:
            error, kind, cancelled = str(e), None, True
        except JobFailed as e:
            error, kind = str(e), e.kind
        except Exception as e:  # noqa: BLE001
            logger.exception("job %s crashed", job.event_id)
            error, kind = f"internal error: {type(e).__name__}: {e}", "internal"
        self._end_job(job, error, kind, cancelled)
        logger.info("%s %s %s→%s: %s, %d bytes in %.3f s%s", job.kind, job.event_id, job.source,
                    job.destination, job.status, job.bytes, job.ended - job.created,
                    f" ({job.error})" if job.error else "")

    def cancel(self, job: Job) -> None:
        """Ask a running move or copy to stop: batches already sent to the destination
        finish (their chunks stay there, whole and verified), no other starts, the source's
        pins are released and nothing is deleted at the source. The job then ends
        ``cancelled`` — or ``done``, if its last batch had already been sent.

        Raises:
            ApiError: ``conflict`` if the job already ended or is not a move or copy.
        """
        if job.kind not in ("move", "copy"):
            raise ApiError("conflict", f"a {job.kind} job cannot be cancelled (it ends with "
                                       f"its request)")
        if job.status in wire.FINAL_STATES:
            raise ApiError("conflict", f"job {job.event_id} already ended: {job.status}")
        job.cancel_requested = True

    async def _step(self, instance_id: str, msg: Any, what: str) -> wire.Reply:
        """One command of a job; a failed reply ends the job with its kind and cause."""
        reply = await self.command(instance_id, msg)
        if not reply.ok:
            raise JobFailed(reply.error_kind or "internal", f"{what} at {instance_id} failed: {reply.error}")
        return reply

    async def _transfer(self, job: Job) -> None:
        """Pin at the source, fetch at the destination (batches, two in flight), then release
        the pins — deleting the chunks at the source for a move, and only once the destination
        holds every one of them. Raises JobFailed."""
        src = self.instances.get(job.source)
        if src is None or job.destination not in self.instances:
            raise JobFailed("unavailable", "an instance unregistered before the job started")
        if job.cancel_requested:
            raise JobCancelled("cancelled before it started")
        pin_cmd = wire.PinChunks(keys=job.keys, lease_s=2 * self.settings.command_timeout_s)
        t0 = time.perf_counter()
        pin = await self._step(job.source, pin_cmd, "pin")
        t_pin = time.perf_counter()
        job.total_bytes = sum(c.nbytes for c in pin.chunks)
        peer = wire.PeerInfo(job.source, src.reg.agent_name, src.reg.p2p_url, src.reg.incarnation,
                             src.reg.shared_pool)
        window = asyncio.Semaphore(FETCHES_IN_FLIGHT)
        failed = asyncio.Event()

        async def fetch(batch: list[wire.ChunkDesc]) -> bool:
            async with window:
                if failed.is_set() or job.cancel_requested:
                    return False  # an earlier batch failed, or a cancel: do not start this one
                try:
                    reply = await self._step(job.destination,
                                             wire.FetchChunks(source=peer, chunks=batch), "fetch")
                except BaseException:
                    failed.set()
                    raise
                job.bytes += reply.bytes
                return True

        fetched_all = False
        batches = _batches(pin.chunks, self.settings.fetch_batch_bytes)
        tasks = [asyncio.create_task(fetch(b)) for b in batches]
        try:
            # A fetch already sent is waited for, not cancelled: the job ends only once the
            # destination has settled every batch (committed or aborted its reservations), and
            # the source keeps its pins until then. Each command ends within its timeout.
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r  # the first failure, in batch order
            if not all(results):
                raise JobCancelled(
                    f"cancelled after {job.bytes} of {job.total_bytes} bytes (the chunks moved "
                    f"stay at {job.destination}; the source keeps all of them)" if job.bytes else
                    "cancelled before any chunk moved")
            fetched_all = True
            t_fetch = time.perf_counter()
        finally:
            delete = fetched_all and job.kind == "move"
            release = await self.command(job.source, wire.UnpinChunks(
                pin_id=pin_cmd.req_id, delete=delete, transferred_bytes=job.bytes))
            if fetched_all:
                logger.debug("job %s: pin %.2f ms, fetch %.2f ms, release %.2f ms", job.event_id,
                             (t_pin - t0) * 1e3, (t_fetch - t_pin) * 1e3,
                             (time.perf_counter() - t_fetch) * 1e3)
            if not release.ok:
                # The sidecar's lease expiry releases the pins regardless; only a move's
                # delete is lost, and the destination holds the KV: say so, do not hide it.
                logger.warning("release at %s failed after job %s: %s", job.source,
                               job.event_id, release.error)
                if delete:
                    raise JobFailed(release.error_kind or "internal",
                                    f"the destination holds the KV, but the source "
                                    f"{job.source} did not delete it: {release.error}")


def _batches(chunks: list[wire.ChunkDesc], max_bytes: int) -> list[list[wire.ChunkDesc]]:
    """Split chunks into consecutive groups of at most ``max_bytes`` (at least one chunk each)."""
    out: list[list[wire.ChunkDesc]] = [[]]
    size = 0
    for c in chunks:
        if out[-1] and size + c.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(c)
        size += c.nbytes
    return out


# ---------------------------------------------------------------------------------------------
# HTTP app
# ---------------------------------------------------------------------------------------------
def _wait_seconds(request: Request) -> float | None:
    """The ``wait`` query parameter: None when absent; 0-60 s; else a bad_request ApiError."""
    raw = request.query_params.get("wait")
    if raw is None:
        return None
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= 60:  # also refuses nan
        raise ApiError("bad_request", f"wait must be seconds between 0 and 60, got {raw!r}")
    return wait


async def _wait_for_end(job: Job, wait: float | None) -> wire.JobStatusBody:
    """The job's status once it ended, or after ``wait`` seconds if it is still running
    (``None``: at once)."""
    if wait is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(job.finished.wait(), wait)
    return job.to_status()


def _position(pos: tuple[str, str], what: str, ctl: Controller) -> Instance:
    instance_id, location = pos
    inst = ctl.instance(instance_id)
    if location != wire.LOCATION:
        raise ApiError("bad_request", f"{what}: unknown location {location!r}; "
                                      f"vllm-kvmove stores KV in {wire.LOCATION!r}")
    return inst


def create_controller_app(settings: ControllerSettings | None = None) -> Starlette:
    """Build the controller's Starlette app; sockets open and close with its lifespan."""
    ctl = Controller(settings or ControllerSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await ctl.start()
        try:
            yield
        finally:
            await ctl.stop()

    def require_token(request: Request) -> None:
        check_bearer(request, ctl.settings.api_token)

    async def move(request: Request) -> Response:
        """``?wait=S``: answer with the job's status once it ends (or after S <= 60 s) instead
        of at once — one request for a small move, no poll."""
        require_token(request)
        wait = _wait_seconds(request)  # a bad value must be refused before the job starts
        body = await read_json(request, wire.MoveRequest)
        src = _position(body.old_position, "old_position", ctl)
        dst = _position(body.new_position, "new_position", ctl)
        tokens = await ctl.tokens_of(body.tokens, body.prompt, src)
        copy = bool(body.copy if body.copy is not None else body.should_copy)
        job = ctl.create_move(src, dst, tokens, copy)
        if wait is None:
            return json_response(wire.MoveResponse(job.num_tokens, job.event_id))
        return json_response(await _wait_for_end(job, wait))

    def _job(event_id: str) -> Job:
        job = ctl.jobs.get(event_id)
        if job is None:
            raise ApiError("not_found", f"unknown event_id {event_id!r} (never created by this "
                                        f"controller; if it restarted since, the job's outcome is unknown)")
        return job

    async def event(request: Request) -> Response:
        """``?wait=S``: long-poll, answering as soon as the job ends (or after S <= 60 s)."""
        job = _job(request.path_params["event_id"])
        wait = _wait_seconds(request)
        return json_response(await _wait_for_end(job, wait))

    async def cancel(request: Request) -> Response:
        """Stop a move or copy (see :meth:`Controller.cancel`); ``?wait=S``: answer once it
        ended (cancelled, or done if it was past its last batch)."""
        require_token(request)
        job = _job(request.path_params["event_id"])
        wait = _wait_seconds(request)
        ctl.cancel(job)
        return json_response(await _wait_for_end(job, wait))

    async def events(request: Request) -> Response:
        recent = list(itertools.islice(reversed(ctl.jobs.values()), query_limit(request, 100)))
        return json_response({"events": [j.to_status() for j in recent]})

    def store_op(kind: str):
        async def handler(request: Request) -> Response:
            require_token(request)
            body = await read_json(request, wire.PinRequest)
            inst = _position((body.instance_id, body.location), "position", ctl)
            tokens = None
            if body.tokens is not None or body.prompt is not None or kind != "clear":
                tokens = await ctl.tokens_of(body.tokens, body.prompt, inst)
            job = await ctl.run_store_op(kind, inst, tokens)
            return json_response({"event_id": job.event_id, "num_tokens": job.num_tokens,
                                  "num_chunks": job.num_chunks})
        return handler

    async def check_finish(request: Request) -> Response:
        body = await read_json(request, wire.EventIdRequest)
        return json_response(_job(body.event_id).to_status())

    async def lookup(request: Request) -> Response:
        body = await read_json(request, wire.LookupRequest)
        tokenizer = None
        if body.prompt is not None:
            if body.instance_id is not None:
                tokenizer = ctl.instance(body.instance_id)
            else:
                tokenizer = next((i for i in ctl.instances.values() if ctl.is_up(i)), None)
        tokens = await ctl.tokens_of(body.tokens, body.prompt, tokenizer)
        t0 = time.perf_counter()
        matched = ctl.lookup(tokens)
        ctl.metrics.lookup_seconds.observe(time.perf_counter() - t0)
        return json_response({"event_id": uuid.uuid4().hex, "layout_info": {
            iid: [wire.LOCATION, n] for iid, n in matched.items()}})

    async def instances(request: Request) -> Response:
        now = time.monotonic()
        return json_response({"instances": [{
            "instance_id": i.instance_id, "up": ctl.is_up(i), "engine_url": i.reg.engine_url,
            "sidecar_url": i.reg.sidecar_url, "p2p_url": i.reg.p2p_url, "model": i.reg.model,
            "fingerprint": i.reg.fingerprint, "layout": i.reg.layout,
            "chunk_size": i.reg.chunk_size, "num_chunks": ctl.index.count(i.instance_id),
            "used_bytes": i.used_bytes, "capacity_bytes": i.reg.capacity_bytes,
            "available_bytes": i.available_bytes,
            "same_host_copy": i.reg.shared_pool is not None,
            "last_heartbeat_s_ago": round(now - i.last_heartbeat, 3)}
            for i in ctl.instances.values()]})

    status_page = (Path(__file__).parent / "static" / "status.html").read_bytes()

    async def openapi(request: Request) -> Response:
        from sidecar.openapi import controller_openapi

        return json_response(controller_openapi())

    async def index(request: Request) -> Response:
        return Response(status_page, media_type="text/html; charset=utf-8")

    async def health(request: Request) -> Response:
        if request.method == "POST":  # LMCache: {"instance_id"} -> per-worker error codes
            body = await read_json(request, wire.InstanceRequest)
            inst = ctl.instance(body.instance_id)
            return json_response({"event_id": uuid.uuid4().hex,
                                  "error_codes": {"0": 0 if ctl.is_up(inst) else 1}})
        up = sum(1 for i in ctl.instances.values() if ctl.is_up(i))
        return json_response({"status": "ok", "controller_id": ctl.controller_id,
                              "instances": len(ctl.instances), "instances_up": up,
                              "chunks_indexed": len(ctl.index)})

    async def query_worker_info(request: Request) -> Response:
        """LMCache's worker listing: one worker (the sidecar) per instance."""
        body = await read_json(request, wire.InstanceRequest)
        inst = ctl.instance(body.instance_id)
        host, _, port = inst.reg.sidecar_url.removeprefix("http://").rpartition(":")
        wall = time.time() - time.monotonic()  # monotonic -> epoch seconds
        return json_response({"event_id": uuid.uuid4().hex, "worker_infos": [{
            "instance_id": inst.instance_id, "worker_id": 0, "ip": host, "port": int(port),
            "peer_init_url": inst.reg.p2p_url, "registration_time": inst.registered_at + wall,
            "last_heartbeat_time": inst.last_heartbeat + wall}]})

    app = Starlette(
        routes=[Route("/", index, methods=["GET"]),
                Route("/openapi.json", openapi, methods=["GET"]),
                Route("/move", move, methods=["POST"]),
                Route("/events", events, methods=["GET"]),
                Route("/events/{event_id}", event, methods=["GET"]),
                Route("/events/{event_id}/cancel", cancel, methods=["POST"]),
                Route("/pin", store_op("pin"), methods=["POST"]),
                Route("/unpin", store_op("unpin"), methods=["POST"]),
                Route("/clear", store_op("clear"), methods=["POST"]),
                Route("/check_finish", check_finish, methods=["POST"]),
                Route("/lookup", lookup, methods=["POST"]),
                Route("/instances", instances, methods=["GET"]),
                Route("/health", health, methods=["GET", "POST"]),
                Route("/query_worker_info", query_worker_info, methods=["POST"]),
                Route("/metrics", metrics_endpoint(ctl.metrics.registry), methods=["GET"])],
        exception_handlers=ERROR_HANDLERS, lifespan=lifespan)
    app.state.controller = ctl
    return app


def main(argv: list[str] | None = None) -> int:
    """Console script ``kvmove-controller``."""
    import uvicorn

    p = argparse.ArgumentParser(prog="kvmove-controller",
                                description="Federate vllm-kvmove sidecars and move KV between engines.")
    p.add_argument("--host", default="localhost", help="interface for HTTP and ZMQ (default localhost)")
    p.add_argument("--port", type=int, default=9000, help="HTTP port (default 9000)")
    p.add_argument("--monitor-ports", default='{"pull": 8300, "reply": 8400}',
                   help='JSON {"pull": PORT, "reply": PORT}: ZMQ ports sidecars connect to')
    p.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="seconds without heartbeat before an instance counts as down")
    p.add_argument("--api-token", default=os.environ.get("KVMOVE_API_TOKEN", ""),
                   help="shared secret (default: env KVMOVE_API_TOKEN): required as a bearer "
                        "token on mutating endpoints and from registering sidecars")
    p.add_argument("--fetch-batch-mib", type=float, default=FETCH_BATCH_BYTES / 2**20,
                   help="a move's fetch is sent in commands of at most this many MiB "
                        f"(default {FETCH_BATCH_BYTES >> 20}); progress advances per command")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    if a.fetch_batch_mib <= 0:
        p.error("--fetch-batch-mib must be > 0")
    try:
        ports = json.loads(a.monitor_ports)
        pull, reply = int(ports["pull"]), int(ports["reply"])
    except (ValueError, KeyError, TypeError):
        p.error('--monitor-ports must be JSON like {"pull": 8300, "reply": 8400}')
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ControllerSettings(host=a.host, port=a.port, pull_port=pull, reply_port=reply,
                                  heartbeat_timeout_s=a.heartbeat_timeout, api_token=a.api_token,
                                  fetch_batch_bytes=int(a.fetch_batch_mib * 2**20))
    uvicorn.run(create_controller_app(settings), host=a.host, port=a.port,
                log_level=a.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
