"""Jobs: the state machine every operation goes through, the table that reports them by event
id, and the steps of a move or copy between two sidecars.

Contract
--------
* A :class:`Job` is created ``pending`` and ends in exactly one final state::

      pending ──begin()──▶ running ──finish()──▶ done | failed | cancelled

  (:data:`~sidecar.protocol.FINAL_STATES`). ``finish`` records the cause (and its kind, a key
  of the HTTP error map) and wakes everyone waiting on ``finished``. Pin, unpin and clear end
  before their HTTP answer; move and copy run as tasks, and may be asked to stop
  (:meth:`Job.request_cancel`).
* :class:`JobTable` remembers the latest ``max_jobs`` jobs (the oldest *finished* ones are
  forgotten first) and counts them in the metrics.
* :func:`run_transfer` is a move's or copy's steps. It talks to sidecars only through the
  ``command`` callable it is given (the channel's, or a test's fake), and keeps these
  invariants — together, a move never leaves a chunk held nowhere. A tensor-parallel engine's
  ranks each have a lane (:class:`Lane`), rank r to rank r, and "the source" below is every
  rank of it, "the destination" every rank of the other:
    - the source holds every chunk (a lease) from before the first byte is read until the
      destination settled every batch it was sent (committed whole, or aborted);
    - batches go two at a time (one copies while the other verifies), each no sooner than
      the bandwidth caps allow (:mod:`~sidecar.controller.pacing`); after a failed batch
      or a cancel no new batch starts, and the ones already sent are waited for, not
      abandoned;
    - the source deletes its chunks (a move) only after the destination holds every one —
      committed, and held there by the fetch's own lease (nothing evicts them meanwhile)
      until the source's delete is done;
    - no other operation works on the same chunks of either instance meanwhile (the caller
      holds :class:`~sidecar.controller.locks.ChunkLocks` claims for the job's whole life).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from sidecar import protocol
from sidecar.controller.instances import describe_holder
from sidecar.controller.metrics import ControllerMetrics
from sidecar.controller.pacing import RateLimit, grant_bytes
from sidecar.httpkit import ApiError

logger = logging.getLogger("vllm_kvmove.controller")

# Fetch commands of one job in flight at once: one copies while the other verifies checksums.
FETCHES_IN_FLIGHT = 2
# Most bytes (of the first source's shards) per fetch of a job that converts: the destination
# reads each such batch into a staging buffer of its own, so this bounds that memory (times
# the shards read, times the fetches in flight) and lets one batch convert while the next is
# read.
CONVERT_BATCH_BYTES = 64 << 20

# How a job talks to a sidecar: ``await command(holder, msg, depends_on=(...))`` → its
# Reply (a failed Reply for timeouts and dead peers, the commanded one or one it depends on;
# never raises for a peer's fault).
Command = Callable[..., Awaitable[protocol.Reply]]


class JobFailed(Exception):
    """A job step failed; ``kind`` is a key of the error map (e.g. ``store_full``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class JobCancelled(Exception):
    """A move or copy stopped at a cancel request, with the source's lease ended."""


@dataclass
class Job:
    """One operation on chunks, reported by event id.

    ``kind`` is "move" or "copy" (asynchronous: ``source`` → ``destination``), "drain"
    (asynchronous: everything ``source`` holds, to the instances in ``destination``; its
    progress is ``drain``, a :class:`~sidecar.controller.drain.Drain`), or "pin", "unpin",
    "clear" (one instance, ``source``; they end before their HTTP answer).
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
    # Set by request_cancel(): no further fetch batch starts.
    cancel_requested: bool = False
    # A move's, copy's or drain's own bandwidth cap (max_bytes_per_s in POST /move, /drain).
    max_bytes_per_s: int | None = None
    # A drain's plan and progress (sidecar.controller.drain.Drain).
    drain: Any = None
    # A move's or copy's time by phase (set by run_transfer as each phase ends).
    phases: protocol.JobPhases | None = None

    def begin(self) -> None:
        self.status = "running"

    def finish(self, error: str | None = None, kind: str | None = None,
               cancelled: bool = False) -> None:
        """Enter the final state: ``cancelled``, ``failed`` (``error`` given) or ``done``."""
        self.error, self.error_kind = error, kind if error and not cancelled else None
        self.status = "cancelled" if cancelled else "failed" if error else "done"
        self.ended = time.monotonic()
        self.finished.set()

    def request_cancel(self) -> None:
        """Ask a running move or copy to stop: batches already sent to the destination
        finish (their chunks stay there, whole and verified), no other starts, the source's
        lease ends and nothing is deleted at the source. The job then ends ``cancelled`` — or
        ``done``, if its last batch had already been sent.

        Raises:
            ApiError: ``conflict`` if the job already ended or is not a move or copy.
        """
        if self.kind not in protocol.TRANSFER_KINDS:
            raise ApiError("conflict", f"a {self.kind} job cannot be cancelled (it ends with "
                                       f"its request)")
        # (A drain stops between batches: those in flight finish whole.)
        if self.status in protocol.FINAL_STATES:
            raise ApiError("conflict", f"job {self.event_id} already ended: {self.status}")
        self.cancel_requested = True

    async def wait(self, seconds: float | None) -> protocol.JobStatusBody:
        """The status once the job ended, or after ``seconds`` if it is still running
        (``None``: at once)."""
        if seconds is not None:
            try:
                await asyncio.wait_for(self.finished.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return self.to_status()

    def to_status(self) -> protocol.JobStatusBody:
        end = self.ended if self.ended is not None else time.monotonic()
        return protocol.JobStatusBody(
            event_id=self.event_id, status=self.status, kind=self.kind, source=self.source,
            destination=self.destination, num_tokens=self.num_tokens, num_chunks=self.num_chunks,
            bytes=self.bytes if self.drain is None else self.drain.bytes,
            total_bytes=self.total_bytes, elapsed_s=round(end - self.created, 6),
            error=self.error, error_kind=self.error_kind, max_bytes_per_s=self.max_bytes_per_s,
            drain=None if self.drain is None else self.drain.to_status(), phases=self.phases)


class JobTable:
    """The latest jobs, by event id (insertion order: oldest first).

    Args:
        max_jobs: how many to remember; beyond it the oldest finished ones are forgotten.
        metrics: counts every job started and ended.
    """

    def __init__(self, max_jobs: int, metrics: ControllerMetrics):
        self.max_jobs = max_jobs
        self.metrics = metrics
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def new(self, kind: str, source: str, destination: str, keys: list[bytes],
            num_tokens: int, event_id: str | None = None) -> Job:
        """A new ``pending`` job (its id: ``event_id``, or a fresh one)."""
        job = Job(event_id or uuid.uuid4().hex, kind, source, destination, keys, num_tokens,
                  len(keys))
        self._jobs[job.event_id] = job
        self.metrics.job_started(kind)
        while len(self._jobs) > self.max_jobs:
            old_id, old = next(iter(self._jobs.items()))
            if old.status not in protocol.FINAL_STATES:
                break
            del self._jobs[old_id]
        return job

    def finish(self, job: Job, error: str | None = None, kind: str | None = None,
               cancelled: bool = False) -> None:
        """:meth:`Job.finish`, counted in the metrics."""
        job.finish(error, kind, cancelled)
        self.metrics.job_ended(job.kind, job.status, job.ended - job.created,
                               job.bytes if job.kind in protocol.TRANSFER_KINDS else 0)

    def require(self, event_id: str) -> Job:
        """The job, or a ``not_found`` ApiError."""
        job = self._jobs.get(event_id)
        if job is None:
            raise ApiError("not_found", f"unknown event_id {event_id!r} (never created by this "
                                        f"controller; if it restarted since, the job's outcome "
                                        f"is unknown)")
        return job

    def recent(self, limit: int) -> list[Job]:
        """Up to ``limit`` jobs, newest first."""
        out = []
        for job in reversed(self._jobs.values()):
            if len(out) >= limit:
                break
            out.append(job)
        return out

    def __len__(self) -> int:
        return len(self._jobs)


async def _step(command: Command, holder: str, msg: Any, what: str,
                depends_on: tuple[str, ...] = ()) -> protocol.Reply:
    """One command of a job; a failed reply ends the job with its kind and cause."""
    reply = await command(holder, msg, depends_on=depends_on)
    if not reply.ok:
        raise JobFailed(reply.error_kind or "internal",
                        f"{what} at {describe_holder(holder)} failed: {reply.error}")
    return reply


@dataclass(frozen=True)
class Source:
    """One source rank a lane reads from: its sidecar's holder name
    (:func:`~sidecar.controller.instances.holder_name`), how to reach its pool, its rank."""

    holder: str
    peer: protocol.PeerInfo
    rank: int = 0


@dataclass(frozen=True)
class Lane:
    """One destination rank's part of a move or copy: its shard of every chunk, read from
    ``sources`` — the same rank of the source engine when both engines have one format (an
    engine without tensor parallelism has one lane of one source), or every source rank
    whose heads it holds when the job converts (:func:`vllm_kvmove.convert.source_ranks`)."""

    destination: str
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Conversion:
    """The source engine's format, when it differs from the destination's: every fetch then
    carries it (:class:`~sidecar.protocol.Conversion`) and the destination converts."""

    layout: dict
    world_size: int


async def run_transfer(job: Job, lanes: list[Lane], command: Command,
                       fetch_batch_bytes: int, lease_s: float,
                       limits: tuple[RateLimit, ...] = (),
                       conversion: Conversion | None = None,
                       blocks: dict[bytes, protocol.ChunkBlocksMsg] | None = None,
                       pinned: set[bytes] | None = None, background: bool = False) -> None:
    """Lease the chunks at every source rank, fetch them at every destination rank (batches,
    two in flight per lane), then end the leases — deleting the chunks at the sources for a
    move, and only once every lane's destination holds every one of them (a tensor-parallel
    engine holds a chunk only when every rank holds its shard).

    Args:
        job: a move or copy; its ``bytes`` and ``total_bytes`` advance as batches settle.
        lanes: one per destination rank, in rank order.
        command: see :data:`Command`.
        fetch_batch_bytes: most bytes per fetch command (of its first source's shards).
        lease_s: the sources' lease, a bound on how long a lost job can hold its chunks.
        limits: bandwidth caps every batch waits for before it is sent (the job's own, the
            controller's); batches shrink to 1/20 s at the slowest cap.
        conversion: the source's format, when the destination must convert.
        blocks: each chunk's vLLM blocks in the destination's hashing, by key, when the
            destination publishes KV events (every fetch then names its chunks' blocks).
        pinned: chunks to pin at the destination as they land (a drain carries pins over).
        background: take the caps' grants behind every operator's move (a drain's batches).
    Raises:
        JobFailed: a step failed (its kind and cause); JobCancelled: a cancel stopped it.
    """
    if job.cancel_requested:
        raise JobCancelled("cancelled before it started")
    t0 = time.perf_counter()
    job.phases = phases = protocol.JobPhases()
    # Every source rank any lane reads from, leased once (a split reads one from several).
    holders = list(dict.fromkeys(s.holder for lane in lanes for s in lane.sources))
    lease_cmds = {h: protocol.LeaseChunks(keys=job.keys, lease_s=lease_s) for h in holders}
    replies = dict(zip(holders, await asyncio.gather(*(
        command(h, cmd) for h, cmd in lease_cmds.items()))))
    failed_lease = next((h for h in holders if not replies[h].ok), None)
    if failed_lease is not None:
        # All or none: the ranks that did lease let go at once, with nothing deleted.
        await asyncio.gather(*(command(h, protocol.EndLease(lease_id=lease_cmds[h].req_id))
                               for h in holders if replies[h].ok))
        r = replies[failed_lease]
        raise JobFailed(r.error_kind or "internal",
                        f"lease at {describe_holder(failed_lease)} failed: {r.error}")
    t_lease = time.perf_counter()
    phases.lease_s = round(t_lease - t0, 6)
    leased = {h: replies[h].chunks for h in holders}  # in key order, every key (all or none)
    job.total_bytes = sum(c.nbytes for lane in lanes for s in lane.sources
                          for c in leased[s.holder])
    failed = asyncio.Event()
    hold = job.kind == "move"  # the destination keeps its copy held until the source deleted
    # (destination, lease id) of the fetches that may hold chunks there: all that were sent
    # (one that failed here — a timeout, a dead link — may still complete there; its end then
    # waits for it).
    held_at_destination: list[tuple[str, int]] = []
    source_bytes = dict.fromkeys(holders, 0)  # what each source gave

    def fetch_command(lane: Lane, picked: list[int]) -> protocol.FetchChunks:
        first = lane.sources[0]
        chunks = [leased[first.holder][i] for i in picked]
        convert = None if conversion is None else protocol.Conversion(
            conversion.layout, conversion.world_size,
            [protocol.ShardRead(s.peer, s.rank, [leased[s.holder][i] for i in picked])
             for s in lane.sources])
        return protocol.FetchChunks(
            source=first.peer, chunks=chunks, hold=hold, lease_s=lease_s, convert=convert,
            blocks=None if blocks is None else [blocks[c.key] for c in chunks],
            pinned=[c.key in pinned for c in chunks] if pinned else None)

    async def fetch(lane: Lane, window: asyncio.Semaphore, picked: list[int]) -> bool:
        async with window:
            if failed.is_set() or job.cancel_requested:
                return False  # an earlier batch failed, or a cancel: do not start this one
            shares = [sum(leased[s.holder][i].nbytes for i in picked) for s in lane.sources]
            for limit in limits:
                await limit.take(sum(shares), background=background)
            if failed.is_set() or job.cancel_requested:
                return False  # ...which may have come while it waited for its turn
            cmd = fetch_command(lane, picked)
            try:
                reply = await _step(command, lane.destination, cmd, "fetch",
                                    depends_on=tuple(s.holder for s in lane.sources))
            except BaseException:
                failed.set()
                raise
            finally:
                if hold and cmd.req_id:
                    held_at_destination.append((lane.destination, cmd.req_id))
            job.bytes += reply.bytes
            for s, share in zip(lane.sources, shares):  # what was read, by source
                source_bytes[s.holder] += reply.bytes * share // max(1, sum(shares))
            return True

    fetched_all = False
    batch_bytes = grant_bytes(list(limits), fetch_batch_bytes)
    if conversion is not None:
        batch_bytes = min(batch_bytes, CONVERT_BATCH_BYTES)
    per_lane = [[(lane, window, picked) for picked in
                 batch_indices(leased[lane.sources[0].holder], batch_bytes)]
                for lane, window in zip(lanes, [asyncio.Semaphore(FETCHES_IN_FLIGHT)
                                                for _ in lanes])]
    # Lanes interleaved, so a shared cap serves the ranks in turn.
    order = [item for group in itertools.zip_longest(*per_lane) for item in group if item]
    tasks = [asyncio.create_task(fetch(*item)) for item in order]
    try:
        # A fetch already sent is waited for, not cancelled: the job ends only once the
        # destinations have settled every batch (committed or aborted their reservations),
        # and the sources keep their leases until then. Each command ends within its timeout.
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
    finally:
        t_fetch = time.perf_counter()
        phases.transfer_s = round(t_fetch - t_lease, 6)
        delete = fetched_all and job.kind == "move"
        ends = dict(zip(holders, await asyncio.gather(*(
            command(h, protocol.EndLease(lease_id=lease_cmds[h].req_id, delete=delete,
                                         transferred_bytes=source_bytes[h]))
            for h in holders))))
        if held_at_destination:
            # The sources' deletes are done (or did not happen): the destination may let go.
            # Not awaited: the job's outcome does not depend on it, and a lost one expires.
            _in_background(asyncio.gather(*(
                command(dest, protocol.EndLease(lease_id=lease_id))
                for dest, lease_id in held_at_destination)))
        phases.release_s = round(time.perf_counter() - t_fetch, 6)
        for h, end in ends.items():
            if end.ok:
                continue
            # The sidecar's lease expiry releases the holds regardless; only a move's delete
            # is lost, and the destination holds the KV: say so, do not hide it.
            logger.warning("end of lease at %s failed after job %s: %s", describe_holder(h),
                           job.event_id, end.error)
            if delete:
                raise JobFailed(end.error_kind or "internal",
                                f"the destination holds the KV, but the source "
                                f"{describe_holder(h)} did not delete it: {end.error}")


_BACKGROUND: set[asyncio.Future] = set()


def _in_background(fut: asyncio.Future) -> None:
    """Let ``fut`` run on its own (kept referenced until done, so it is not collected)."""
    fut = asyncio.ensure_future(fut)
    _BACKGROUND.add(fut)
    fut.add_done_callback(_BACKGROUND.discard)


def batch_indices(chunks: list[protocol.ChunkDesc], max_bytes: int) -> list[list[int]]:
    """Split chunks into consecutive groups of at most ``max_bytes`` (at least one chunk
    each); each group as the chunks' indices."""
    out: list[list[int]] = [[]]
    size = 0
    for i, c in enumerate(chunks):
        if out[-1] and size + c.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += c.nbytes
    return out
