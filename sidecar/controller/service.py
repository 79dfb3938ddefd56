"""Controller: what the controller does for an HTTP request — validate, look up, start jobs —
over the registry, the index, the job table and the sidecar channel.

Contract
--------
* One per controller process, living on its event loop (nothing here is thread-safe). The
  HTTP layer (:mod:`sidecar.controller.api`) parses requests and calls these methods; they
  raise :class:`~sidecar.httpkit.ApiError` for anything the client must hear, and *change
  nothing* when they do: every check runs before a job is created or a command is sent.
* Moves and copies answer at once with their job; the job runs as a task
  (:func:`~sidecar.controller.jobs.run_transfer`). Pin, unpin and clear wait for their one
  command and answer with the finished job.
* Operations on the same chunks of one instance never overlap: a move claims its chunks at
  both ends exclusively, a copy shares its source's, a clear claims what it clears
  (:class:`~sidecar.controller.locks.ChunkLocks`); a request whose claims conflict with a job
  in flight is refused with ``conflict`` (409) before anything starts.
* Engines speak as a whole (:mod:`~sidecar.controller.instances`): a move is planned as one
  lane per destination rank (:meth:`Controller._plan`) — rank r from rank r between engines of
  one format, else from every source rank whose heads it holds, the destination converting
  (:mod:`vllm_kvmove.convert`); a move between compatible engines whose formats cannot be
  converted is refused (409) naming the fields. A destination that publishes KV events is
  told each chunk's vLLM blocks, named in its hashing from the move's tokens.
* A drain (:meth:`Controller.create_drain`, :mod:`~sidecar.controller.drain`) is one job of
  many moves: each batch claims its chunks like a move, and its fetches yield to operators'
  moves under the controller's cap. While an instance drains, nothing moves into it (409). An
  engine shutting down with ``drain_on_shutdown`` asks for its drain itself (a
  :class:`~sidecar.protocol.Leaving` from any rank); every rank hears how it ended
  (:class:`~sidecar.protocol.DrainEnded`), whoever started it.
* Lookups answer from the index alone, never asking a sidecar.
* Prompts are tokenized by an engine's own ``/tokenize`` (the engine whose KV is meant), so
  the controller needs no tokenizer of its own.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import uuid
from typing import Any

import httpx
import msgspec

from sidecar import protocol
from sidecar.controller.channel import SidecarChannel
from sidecar.controller.drain import DRAIN_BATCH_BYTES, Drain, DrainHooks
from sidecar.controller.index import ChunkIndex
from sidecar.controller.instances import Instance, InstanceRegistry, Member
from sidecar.controller.jobs import (Conversion, Job, JobCancelled, JobFailed, JobTable, Lane,
                                     Source, run_transfer)
from sidecar.controller.locks import ChunkLocks, Claim
from sidecar.controller.metrics import ControllerMetrics
from sidecar.controller.pacing import RateLimit
from sidecar.controller.settings import ControllerSettings
from sidecar.httpkit import ApiError, verify_with
from vllm_kvmove.blockhash import BlockHasher
from vllm_kvmove.convert import conversion_obstacles, needs_conversion, source_ranks
from vllm_kvmove.hashing import ChunkSpan, chunk_spans
from vllm_kvmove.layout import layout_mismatch

logger = logging.getLogger("vllm_kvmove.controller")


class Controller:
    """The controller's state and use cases (see the module docstring).

    Attributes:
        controller_id: random per start; sidecars see it change when the controller restarts.
        index: who holds which chunk.
        registry: the registered instances.
        jobs: the latest jobs.
        channel: the sockets to the sidecars and the command RPC.
        metrics: Prometheus metrics.
    """

    def __init__(self, settings: ControllerSettings):
        self.settings = settings
        self.controller_id = uuid.uuid4().hex
        self.index = ChunkIndex()
        self.registry = InstanceRegistry(self.index, settings.heartbeat_timeout_s)
        self.metrics = ControllerMetrics(self.registry, self.index)
        self.jobs = JobTable(settings.max_jobs, self.metrics)
        self.locks = ChunkLocks()
        # Every move's and copy's batches together, when the operator capped them.
        self.bandwidth = (RateLimit(settings.max_bytes_per_s)
                          if settings.max_bytes_per_s else None)
        self.channel = SidecarChannel(settings, self.registry, self.controller_id, self.metrics)
        self.channel.on_leaving = self._on_leaving
        self._job_tasks: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None
        # Instances being drained -> the drain's event id (nothing moves into them meanwhile).
        self.draining: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.channel.start()
        self._http = httpx.AsyncClient(timeout=self.settings.tokenize_timeout_s,
                                       verify=verify_with(self.settings.tls_ca))

    async def stop(self) -> None:
        for t in list(self._job_tasks):
            t.cancel()
        await asyncio.gather(*self._job_tasks, return_exceptions=True)
        await self.channel.stop()
        if self._http is not None:
            await self._http.aclose()

    # -- requests --------------------------------------------------------------------------
    async def tokens_of(self, tokens: list[int] | None, prompt: str | None,
                        tokenizer: Instance | None) -> list[int]:
        """Validate ``tokens``, or tokenize ``prompt`` through ``tokenizer``'s ``/tokenize``.

        Raises:
            ApiError: ``bad_request`` (neither or both given, empty, too long, an id out of
                range), ``unavailable`` (no engine to tokenize, or it failed).
        """
        if (tokens is None) == (prompt is None):
            raise ApiError("bad_request", "give exactly one of 'tokens' and 'prompt'")
        if tokens is not None:
            if not tokens:
                raise ApiError("bad_request", "'tokens' is empty")
            if len(tokens) > protocol.MAX_TOKENS:
                raise ApiError("bad_request", f"'tokens' has {len(tokens)} ids; at most "
                                              f"{protocol.MAX_TOKENS}")
            try:  # at C speed: each id fits an int32 and none is negative (no sign bit set)
                valid = struct.pack(f"<{len(tokens)}i", *tokens)[3::4].isascii()
            except struct.error:
                valid = False
            if not valid:  # find the first offending id, to name it
                for i, t in enumerate(tokens):
                    if not 0 <= t < protocol.TOKEN_ID_LIMIT:
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
        on every rank (an instance that stopped heartbeating is left out: it cannot serve them
        now). O(holders of the prompt's first chunk), not O(instances): the prompt is hashed
        once per way the fleet names chunks (:meth:`Registry.groups`), and only the
        instances the index names are visited."""
        out: dict[str, int] = {}
        registry = self.registry
        for group in registry.groups():
            fingerprint, chunk_size = group
            spans = chunk_spans(tokens, chunk_size, fingerprint)
            held = self.index.prefix_holders(spans)
            for holder in held:
                member = registry.member(holder)
                if member is None or member.instance_id in out:
                    continue
                inst = registry.get(member.instance_id)
                if inst is None or inst.naming != group or not registry.is_up(inst):
                    continue
                n = held[holder] if inst.world_size == 1 else \
                    min(held.get(h, 0) for h in inst.holders)
                if n:
                    out[inst.instance_id] = spans[n - 1].end
        return out

    def held_prefix(self, inst: Instance, spans: list[ChunkSpan]) -> list[ChunkSpan]:
        """The leading ``spans`` (a prompt's, at ``inst``) that every rank of ``inst`` holds
        (at least one).

        Raises:
            ApiError: ``not_found`` if it holds none.
        """
        n = self.registry.held_prefix(inst, spans)
        if n == 0:
            raise ApiError("not_found", f"{inst.instance_id} holds no KV for a prefix of these "
                                        f"{spans[-1].end} tokens")
        return spans[:n]

    @staticmethod
    def spans_at(inst: Instance, tokens: list[int]) -> list[ChunkSpan]:
        """The chunks ``tokens`` make at ``inst`` (its chunk size and fingerprint)."""
        return chunk_spans(tokens, inst.reg.chunk_size, inst.reg.fingerprint)

    # -- jobs ------------------------------------------------------------------------------
    def _check_pair(self, src: Instance, dst: Instance) -> None:
        """Raise the ApiError that refuses moving ``src``'s KV into ``dst``, if any: the same
        instance, either down, ``dst`` draining, KV not compatible or not convertible."""
        if src.instance_id == dst.instance_id:
            raise ApiError("bad_request", "source and destination are the same instance")
        self.registry.require_up(src, "source instance")
        self.registry.require_up(dst, "destination instance")
        draining = self.draining.get(dst.instance_id)
        if draining is not None:
            raise ApiError("conflict", f"{dst.instance_id} is being drained (job {draining}): "
                                       f"it takes no KV until the drain ends")
        if src.reg.fingerprint != dst.reg.fingerprint:
            diffs = layout_mismatch(src.reg.layout, dst.reg.layout)
            raise ApiError("incompatible", f"KV of {src.instance_id} and {dst.instance_id} is not "
                                           f"compatible: {'; '.join(diffs) or 'fingerprints differ'}")
        problems = conversion_obstacles(src.layout, src.world_size, dst.layout, dst.world_size)
        if problems:
            raise ApiError("incompatible", f"KV of {src.instance_id} cannot be converted for "
                                           f"{dst.instance_id}: {'; '.join(problems)}")

    def create_move(self, src: Instance, dst: Instance, tokens: list[int], copy: bool,
                    max_bytes_per_s: int | None = None) -> Job:
        """Validate a move (or copy) and start its job, paced at ``max_bytes_per_s`` (and the
        controller's cap). Raises ApiError; changes nothing on error."""
        self._check_pair(src, dst)
        spans = self.spans_at(src, tokens)
        kind = "copy" if copy else "move"
        holder = f"{kind} {uuid.uuid4().hex}"
        # Claimed first, on every chunk of the prompt: an operation in flight on any of them
        # is a 409 naming it, whoever holds what at this instant.
        every = tuple(s.key for s in spans)
        self.locks.acquire(holder, [Claim(src.instance_id, every, exclusive=not copy),
                                    Claim(dst.instance_id, every, exclusive=True)])
        try:
            spans = self.held_prefix(src, spans)
            missing = sum(1 for s in spans if not self.registry.holds(dst, s.key))
            needed = missing * dst.reg.slot_bytes  # at each rank: its shard of every chunk
            if needed > dst.available_bytes:
                where = "" if dst.world_size == 1 else " (at its fullest rank)"
                raise ApiError("store_full", f"{dst.instance_id} can free {dst.available_bytes} "
                                             f"bytes{where} (the rest is held, pinned or in use); "
                                             f"the move needs {needed}")
        except ApiError:
            self.locks.release(holder)
            raise
        job = self.jobs.new(kind, src.instance_id, dst.instance_id, [s.key for s in spans],
                            spans[-1].end, event_id=holder.split()[1])
        job.max_bytes_per_s = max_bytes_per_s
        self._start(job, self._move_steps(job, tokens[:job.num_tokens]), holder)
        return job

    def _start(self, job: Job, steps: Any, holder: str | None = None) -> None:
        """Run a job's ``steps`` (a coroutine) as its task: it ends the job with their outcome
        and releases the job's chunk claims (``holder``'s), whatever happens."""
        task = asyncio.create_task(self._run_job(job, steps, holder))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)

    async def _run_job(self, job: Job, steps: Any, holder: str | None) -> None:
        job.begin()
        cancelled = False
        error = kind = None
        try:
            await steps
        except JobCancelled as e:
            error, cancelled = str(e), True
        except JobFailed as e:
            error, kind = str(e), e.kind
        except Exception as e:  # noqa: BLE001
            logger.exception("job %s crashed", job.event_id)
            error, kind = f"internal error: {type(e).__name__}: {e}", "internal"
        finally:
            if holder is not None:
                self.locks.release(holder)
            if job.drain is not None:
                job.bytes = job.drain.bytes
            if job.kind == "drain":
                self.draining.pop(job.source, None)
        self.jobs.finish(job, error, kind, cancelled)
        if job.kind == "drain":
            self._tell_drained(job.source, job)
        logger.info("%s %s %s→%s: %s, %d bytes in %.3f s%s", job.kind, job.event_id, job.source,
                    job.destination, job.status, job.bytes, job.ended - job.created,
                    f" ({job.error})" if job.error else "")

    async def _move_steps(self, job: Job, tokens: list[int]) -> None:
        src = self.registry.get(job.source)
        dst = self.registry.get(job.destination)
        if src is None or dst is None or not (src.complete and dst.complete):
            raise JobFailed("unavailable", "an instance unregistered before the job started")
        await self._transfer(job, src, dst, self._limits(job.max_bytes_per_s), tokens=tokens)

    def _limits(self, max_bytes_per_s: int | None) -> tuple[RateLimit, ...]:
        """The caps a job's batches wait for: its own (a new pacer, shared by all its batches)
        and the controller's (shared by every job)."""
        own = RateLimit(max_bytes_per_s) if max_bytes_per_s else None
        return tuple(lim for lim in (own, self.bandwidth) if lim is not None)

    async def _transfer(self, job: Job, src: Instance, dst: Instance,
                        limits: tuple[RateLimit, ...], tokens: list[int] | None = None,
                        pinned: set[bytes] | None = None, background: bool = False) -> None:
        """``job.keys`` from ``src`` to ``dst`` (:func:`run_transfer`, planned by
        :meth:`_plan`), with the destination's block names when it publishes KV events and
        ``tokens`` (the keys' prompt) are known."""
        lanes, conversion = self._plan(src, dst)
        blocks = None
        if dst.reg.block_hashing is not None and tokens is not None:
            blocks = await asyncio.to_thread(_blocks_by_key, dst, job.keys, tokens)
        # The source's lease bounds how long a lost job holds its chunks; a capped job needs it
        # to last at least as long as the cap makes it (twice over: the controller's cap is
        # shared). Past it a read may fail its checksum — the job then fails, and nothing is
        # lost — so the margin is generous.
        lease_s = 2 * self.settings.command_timeout_s
        if limits:
            slowest = min(lim.bytes_per_s for lim in limits)
            lease_s = min(lease_s + 2 * len(job.keys) * src.reg.slot_bytes / slowest,
                          protocol.MAX_LEASE_S)
        await run_transfer(job, lanes, self.channel.command, self.settings.fetch_batch_bytes,
                           lease_s=lease_s, limits=limits, conversion=conversion, blocks=blocks,
                           pinned=pinned, background=background)

    def create_batch_move(self, src: Instance, dst: Instance, prefixes: list[list[int]] | None,
                          copy: bool, max_bytes_per_s: int | None = None) -> Job:
        """Validate a move (or copy) of what ``src`` holds of several ``prefixes`` (None: of
        everything it holds) and start its job: a drain's steps (:class:`Drain`: prefix
        families, batches, failures) into ``dst`` alone, the destination evicting to make
        room as for any move. Raises ApiError; changes nothing on error."""
        self._check_pair(src, dst)
        registry = self.registry
        if prefixes is None:
            keys = {k for k in self.index.keys_of(src.holders[0]) if registry.holds(src, k)}
        else:
            keys = set()
            for tokens in prefixes:
                spans = self.spans_at(src, tokens)
                keys.update(s.key for s in spans[:registry.held_prefix(src, spans)])
        if not keys:
            raise ApiError("not_found", f"{src.instance_id} holds no KV "
                                        f"{'at all' if prefixes is None else 'of these prefixes'}")
        missing = sum(1 for k in keys if not registry.holds(dst, k))
        if missing * dst.reg.slot_bytes > dst.available_bytes:
            raise ApiError("store_full", f"{dst.instance_id} can free {dst.available_bytes} "
                                         f"bytes (the rest is held, pinned or in use); the move "
                                         f"needs {missing * dst.reg.slot_bytes}")
        job = self.jobs.new("copy" if copy else "move", src.instance_id, dst.instance_id, [],
                            sum(self.index.num_tokens(src.holders[0], k) for k in keys))
        job.max_bytes_per_s = max_bytes_per_s
        limits = self._limits(max_bytes_per_s)
        job.drain = Drain(job, [dst.instance_id], copy,
                          self._drain_hooks(src.instance_id, limits, select=keys, evict=True),
                          _batch_bytes(limits))
        self._start(job, job.drain.run())
        return job

    def create_drain(self, src: Instance, to: list[Instance] | None, copy: bool,
                     max_bytes_per_s: int | None = None) -> Job:
        """Validate a drain of ``src`` into ``to`` (default: every other instance that is up,
        can take its KV and is not draining) and start its job; ``src`` counts as draining
        until it ends. Raises ApiError; changes nothing on error."""
        self.registry.require_up(src, "instance to drain")
        if src.instance_id in self.draining:
            raise ApiError("conflict", f"{src.instance_id} is being drained already (job "
                                       f"{self.draining[src.instance_id]})")
        if to is None:
            to = []
            for other in self.registry.instances.values():
                try:
                    self._check_pair(src, other)
                except ApiError:
                    continue
                to.append(other)
            if not to:
                raise ApiError("unavailable", f"no other instance that is up and can take the "
                                              f"KV of {src.instance_id}")
        else:
            for dst in to:
                self._check_pair(src, dst)
        dests = list(dict.fromkeys(d.instance_id for d in to))
        job = self.jobs.new("drain", src.instance_id, ",".join(dests), [], 0)
        job.max_bytes_per_s = max_bytes_per_s
        limits = self._limits(max_bytes_per_s)
        job.drain = Drain(job, dests, copy, self._drain_hooks(src.instance_id, limits),
                          _batch_bytes(limits))
        self.draining[src.instance_id] = job.event_id
        self._start(job, job.drain.run())
        return job

    def _on_leaving(self, member: Member) -> None:
        """An engine is shutting down and asks for its drain (any rank; again is harmless):
        start it, unless it runs already; if it cannot start, say why at once."""
        inst = self.registry.get(member.reg.instance_id)
        if inst is None or inst.instance_id in self.draining:
            return
        try:
            job = self.create_drain(inst, None, copy=False)
        except ApiError as e:
            logger.warning("%s is shutting down; no drain: %s", inst.instance_id, e.message)
            self._tell_drained(inst.instance_id, None, e.message)
            return
        logger.info("%s is shutting down: drain %s to %s", inst.instance_id, job.event_id,
                    job.destination)

    def _tell_drained(self, instance_id: str, job: Job | None, why: str = "") -> None:
        """Send every rank of ``instance_id`` how its drain ended (``job``), or why none ran."""
        inst = self.registry.get(instance_id)
        if inst is None:
            return
        if job is None:
            msg = protocol.DrainEnded(event_id="", status="failed", error=why)
        else:
            st = job.drain.to_status()
            msg = protocol.DrainEnded(
                event_id=job.event_id, status=job.status, error=job.error or "",
                units_done=st.units_done, units_total=st.units_total,
                chunks_done=st.chunks_done, bytes=job.bytes,
                destinations=[d.instance_id for d in st.destinations if d.units])
        for m in inst.ranked():
            self.channel.notify(m.holder, msg)

    def _drain_hooks(self, source: str, limits: tuple[RateLimit, ...],
                     select: set[bytes] | None = None, evict: bool = False) -> DrainHooks:
        """How a drain of ``source`` (or a batch move: only the chunks in ``select``) reaches
        the fleet: listings and batches through the channel (paced by ``limits``, behind
        operators' moves), room and costs from the heartbeats and the index (room: empty
        slots, or with ``evict`` what a destination can free, as for any move)."""
        registry = self.registry

        def live(iid: str) -> Instance:
            inst = registry.get(iid)
            if inst is None or not registry.is_up(inst):
                raise JobFailed("unavailable", f"{iid} is down")
            return inst

        async def list_chunks() -> list[protocol.ChunkListing]:
            inst = live(source)
            replies = await asyncio.gather(*(self.channel.command(m.holder, protocol.ListChunks())
                                             for m in inst.ranked()))
            failed = next((r for r in replies if not r.ok), None)
            if failed is not None:
                raise JobFailed(failed.error_kind or "internal",
                                f"listing the chunks of {source} failed: {failed.error}")
            # A tensor-parallel engine holds a chunk where every rank holds its shard.
            every = set.intersection(*({c.key for c in r.listing} for r in replies))
            if select is not None:
                every &= select
            return [c for c in replies[0].listing if c.key in every]

        async def transfer(batch: Job, destination: str, pinned: set[bytes]) -> None:
            src, dst = live(source), live(destination)
            holder = f"drain {batch.event_id}"
            try:
                self.locks.acquire(holder, [
                    Claim(source, tuple(batch.keys), exclusive=batch.kind == "move"),
                    Claim(destination, tuple(batch.keys), exclusive=True)])
            except ApiError as e:
                raise JobFailed(e.kind, e.message) from None
            try:
                await self._transfer(batch, src, dst, limits, pinned=pinned, background=True)
            finally:
                self.locks.release(holder)

        def room(iid: str) -> int:
            inst = registry.get(iid)
            return 0 if inst is None else inst.available_bytes if evict else inst.free_bytes

        def chunk_cost(iid: str, key: bytes) -> int:
            inst = registry.get(iid)
            if inst is None:
                return 1 << 62
            return 0 if registry.holds(inst, key) else inst.reg.slot_bytes

        def alive(iid: str) -> bool:
            inst = registry.get(iid)
            return inst is not None and registry.is_up(inst)

        src = registry.require(source)
        per_rank, ranks = src.layout.valid_bytes, src.world_size
        return DrainHooks(list_chunks, transfer, room, chunk_cost, alive,
                          lambda n: per_rank(n) * ranks,
                          accepts=lambda iid: alive(iid) and iid not in self.draining)

    @staticmethod
    def _plan(src: Instance, dst: Instance) -> tuple[list[Lane], Conversion | None]:
        """The lanes of a transfer from ``src`` to ``dst`` (both complete), and the source's
        format when the destination must convert: rank r to rank r when both engines have
        one format, else each destination rank from every source rank whose heads it holds."""
        src_layout, dst_layout = src.layout, dst.layout
        convert = needs_conversion(src_layout, src.world_size, dst_layout, dst.world_size)
        lanes = []
        for d in dst.ranked():
            ranks = (source_ranks(src_layout, src.world_size, dst_layout, dst.world_size, d.rank)
                     if convert else [d.rank])
            lanes.append(Lane(d.holder, tuple(
                Source(m.holder, protocol.PeerInfo(src.instance_id, m.reg.agent_name,
                                                   m.reg.p2p_url, m.reg.incarnation,
                                                   m.reg.shared_pool), m.rank)
                for m in (src.members[r] for r in ranks))))
        conversion = Conversion(src.reg.layout, src.world_size) if convert else None
        return lanes, conversion

    async def run_store_op(self, kind: str, inst: Instance, tokens: list[int] | None) -> Job:
        """Pin, unpin or clear (all chunks when ``tokens`` is None) at one instance; waits.

        Raises:
            ApiError: instance down, nothing held for ``tokens``, or the sidecar failed.
        """
        self.registry.require_up(inst)
        keys: list[bytes] | None = None
        num_tokens = 0
        holder = f"{kind} {uuid.uuid4().hex}"
        spans = None if tokens is None else self.spans_at(inst, tokens)
        if kind == "clear":  # a pin changes no holding: it claims nothing
            self.locks.acquire(holder, [Claim(inst.instance_id, None if spans is None
                                              else tuple(s.key for s in spans), exclusive=True)])
        try:
            if spans is not None:
                spans = self.held_prefix(inst, spans)
                keys, num_tokens = [s.key for s in spans], spans[-1].end
        except ApiError:
            self.locks.release(holder)
            raise
        job = self.jobs.new(kind, inst.instance_id, "", keys or [], num_tokens,
                            event_id=holder.split()[1])
        job.begin()
        msg: Any
        if kind == "clear":
            msg = protocol.ClearChunks(keys=keys)
        else:
            msg = protocol.SetPinned(keys=keys or [], pinned=(kind == "pin"))
        try:  # every rank at once (a command object per rank: each gets its own req_id)
            replies = await asyncio.gather(*(
                self.channel.command(m.holder, msgspec.structs.replace(msg))
                for m in inst.ranked()))
        finally:
            self.locks.release(holder)
        failed = next((r for r in replies if not r.ok), None)
        if failed is None:
            # For a whole-store clear, what was there (num_tokens: 0) at the rank with most.
            job.num_chunks = max(r.count for r in replies)
        self.jobs.finish(job, None if failed is None else failed.error,
                         None if failed is None else failed.error_kind)
        if failed is not None:
            raise ApiError(failed.error_kind or "internal",
                           f"{kind} at {inst.instance_id}: {failed.error}")
        return job


def _batch_bytes(limits: tuple[RateLimit, ...]) -> int:
    """A drain's (or batch move's) batch size: at most a second at its slowest cap, so that a
    cancel stops it soon."""
    if not limits:
        return DRAIN_BATCH_BYTES
    return max(1, min(DRAIN_BATCH_BYTES, int(min(lim.bytes_per_s for lim in limits))))


def _blocks_by_key(dst: Instance, keys: list[bytes],
                   tokens: list[int]) -> dict[bytes, protocol.ChunkBlocksMsg]:
    """Each chunk's vLLM blocks in ``dst``'s hashing (``keys``: the chunks of ``tokens``, in
    order). Runs on a thread: a long prompt's blocks are thousands of SHA-256s."""
    h = dst.reg.block_hashing
    assert h is not None
    hasher = BlockHasher(h.algo, h.seed, h.block_size)
    chunks = hasher.prompt_blocks(tokens, dst.reg.chunk_size)
    return {key: protocol.ChunkBlocksMsg(b.parent, list(b.hashes), list(b.token_ids),
                                         b.block_size) for key, b in zip(keys, chunks)}
