"""Drains: everything one instance holds, moved (or copied) to other instances as one job.

Contract
--------
* A :class:`Drain` is the state and the steps of one ``"drain"`` job. The controller creates it
  (:meth:`~sidecar.controller.service.Controller.create_drain`, which validates and marks the
  source *draining*) and runs :meth:`Drain.run` as the job's task. A *batch move* (``POST
  /move`` with several prefixes, or all a source holds) runs the same steps into one
  destination, over the chunks it selected. It reaches the fleet only
  through the callables it is given (:class:`DrainHooks`): the source's chunk listing, one
  batch's transfer (a move or copy of its own, under its own chunk claims), each
  destination's free room and per-chunk cost, and whether an instance is up. So it knows
  nothing of sockets or HTTP, and tests drive it with fakes.
* Units: the source's chunks grouped into prefix families by their prompt parents
  (:func:`prefix_units`), each ordered parents first — so any leading part of a unit is a
  usable prefix, and a unit is never spread over destinations (a prompt's tail without its
  head would be useless there).
* Plan (:func:`assign`): units, pinned ones first and then the largest, each whole to the
  destination left with the most room after taking it. A unit that fits nowhere whole is
  split: the leading part that fits the roomiest destination is *copied* there, and the whole
  unit stays at the source, skipped for its rest ("no room") — a move of the head would leave
  the source a tail it cannot use. Room is a destination's *empty* slots: a drain never evicts
  a destination's own KV to make room.
* Steps: one worker per destination, each sending batches of whole units (at most
  ``batch_bytes`` — the controller makes it a second at the drain's slowest cap — or one
  bigger unit) one after another; destinations in parallel. Every
  batch is a transfer with :func:`~sidecar.controller.jobs.run_transfer`'s invariants: the
  source deletes a batch's chunks only once its destination holds all of them, so a failed or
  cancelled batch leaves its units at the source — a drain never leaves KV held nowhere. A
  failed batch:
    - whose destination is down: the destination is *lost*; this batch and the rest of its
      queue are planned again over the other destinations (so is its queue when a drain of its
      own begins: a draining instance takes no KV);
    - whose source is down: every unit not yet moved fails (there is nothing left to read);
    - of several units: each is tried again alone (one bad unit does not fail its neighbours);
    - of one unit: the unit fails with the cause (skipped when the source no longer holds it).
* Cancel (``job.cancel_requested``): no batch starts after it; batches in flight finish whole;
  units not started are skipped ("cancelled").
* Rounds: once its plan is done, the source is listed again and chunks it gained meanwhile
  (its engine may still be serving) are drained too, up to :data:`MAX_ROUNDS` listings.
* Outcome: ``done`` when every unit moved, ``cancelled`` after a cancel, else ``failed`` with
  a summary (``store_full`` when units were left for want of room); the status's ``drain``
  names every unit that did not move and why (:class:`~sidecar.protocol.DrainStatus`).
* Runs on the controller's event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from sidecar import protocol
from sidecar.controller.jobs import Job, JobCancelled, JobFailed

logger = logging.getLogger("vllm_kvmove.controller")

# How many times a drain lists its source (the first plan, then what the source gained).
MAX_ROUNDS = 3
# Units reported by name in a drain's status (the counts cover all).
MAX_PROBLEMS = 100
# Most bytes per batch (whole units; one bigger unit is a batch of its own): a cancel stops a
# drain within a batch, and a failure retries at most this much alone.
DRAIN_BATCH_BYTES = 256 << 20


@dataclass
class Unit:
    """A prefix family (or the part of one that fits a destination), parents first.

    Attributes:
        keys: chunk keys, every chunk after its parent.
        tokens: each chunk's tokens, in the same order.
        pinned: the keys an operator pinned at the source (pinned at the destination too).
        solo: set when its batch failed: it is tried again alone.
        keep: copy it, even in a move (the head of a split unit: the rest stays at the
            source, and needs it).
    """

    keys: list[bytes]
    tokens: list[int]
    pinned: set[bytes] = field(default_factory=set)
    solo: bool = False
    keep: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens)

    def split(self, n: int) -> tuple["Unit", "Unit"]:
        """The first ``n`` chunks (a usable prefix: parents come first) and the rest."""
        head, tail = self.keys[:n], self.keys[n:]
        return (Unit(head, self.tokens[:n], self.pinned & set(head)),
                Unit(tail, self.tokens[n:], self.pinned & set(tail)))


def prefix_units(listing: Iterable[protocol.ChunkListing]) -> list[Unit]:
    """Group a store's chunks into prefix families: a chunk whose parent is listed joins its
    parent's unit; the others start one. Each unit is ordered parents first (depth first, so a
    prompt's chunks stay together), in the listing's order otherwise."""
    chunks = {c.key: c for c in listing}
    children: dict[bytes, list[bytes]] = {}
    roots = []
    for c in chunks.values():
        if c.parent is not None and c.parent in chunks and c.parent != c.key:
            children.setdefault(c.parent, []).append(c.key)
        else:
            roots.append(c.key)
    units, seen = [], set()
    # Every chunk is reached from a root, except on a parent cycle (impossible for hash-chained
    # keys, but a listing is a peer's word): those start units of their own.
    for start in roots + list(chunks):
        if start in seen:
            continue
        keys, stack = [], [start]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            keys.append(k)
            stack.extend(reversed(children.get(k, ())))
        units.append(Unit(keys, [chunks[k].num_tokens for k in keys],
                          {k for k in keys if chunks[k].pinned}))
    return units


def assign(units: list[Unit], room: dict[str, int],
           chunk_cost: Callable[[str, bytes], int]) -> tuple[dict[str, list[Unit]],
                                                             list[tuple[Unit, str]]]:
    """Plan units over destinations (see the module docstring).

    Args:
        units: what to place.
        room: bytes each destination can take (updated in place as units are placed).
        chunk_cost: bytes a chunk takes at a destination (0 if it holds it already).
    Returns:
        ``(plan, skipped)``: units per destination, in sending order (a split unit's head
        marked ``keep``); units (or tails of units) that fit nowhere, with why.
    """
    plan: dict[str, list[Unit]] = {d: [] for d in room}
    skipped: list[tuple[Unit, str]] = []
    for unit in sorted(units, key=lambda u: (not u.pinned, -len(u.keys))):
        if not room:
            skipped.append((unit, "no destination is left"))
            continue
        costs = {d: [chunk_cost(d, k) for k in unit.keys] for d in room}
        fits = [(room[d] - sum(c), d) for d, c in costs.items() if sum(c) <= room[d]]
        if fits:
            d = max(fits)[1]
            plan[d].append(unit)
            room[d] -= sum(costs[d])
            continue
        d = max(room, key=lambda x: (room[x], x))
        n = used = 0
        for c in costs[d]:
            if used + c > room[d]:
                break
            used, n = used + c, n + 1
        why = (f"no room: it needs {sum(costs[d]) - used} more bytes than any destination "
               f"has free ({d}: {room[d]} bytes)")
        if n:
            head, unit = unit.split(n)
            head.keep = True
            plan[d].append(head)
            room[d] -= used
        skipped.append((unit, why))
    return plan, skipped


@dataclass
class DrainHooks:
    """How a drain reaches the fleet (the controller's, or a test's fakes).

    Attributes:
        list_chunks: the source's chunks now (every rank's, for a tensor-parallel engine).
        transfer: ``await transfer(job, destination, pinned)`` moves (``job.kind`` "move")
            or copies ``job.keys`` from the source; raises
            :class:`~sidecar.controller.jobs.JobFailed`.
        room: bytes a destination can take now (its empty slots).
        chunk_cost: bytes a chunk takes at a destination (0 if it holds it already).
        alive: whether an instance is up.
        chunk_bytes: bytes a chunk of n tokens is, over every rank of the source.
        accepts: whether a destination takes KV now (up, and not being drained itself).
    """

    list_chunks: Callable[[], Awaitable[list[protocol.ChunkListing]]]
    transfer: Callable[[Job, str, set[bytes]], Awaitable[None]]
    room: Callable[[str], int]
    chunk_cost: Callable[[str, bytes], int]
    alive: Callable[[str], bool]
    chunk_bytes: Callable[[int], int]
    accepts: Callable[[str], bool] | None = None


class Drain:
    """One drain job's plan and progress (see the module docstring).

    Args:
        job: the ``"drain"`` job (its ``source``, ``cancel_requested``, ``bytes``).
        destinations: the instances it may fill.
        copy: copy instead of move.
        hooks: see :class:`DrainHooks`.
        batch_bytes: most bytes per batch.
    """

    def __init__(self, job: Job, destinations: list[str], copy: bool, hooks: DrainHooks,
                 batch_bytes: int = DRAIN_BATCH_BYTES):
        self.job, self.copy, self.hooks, self.batch_bytes = job, copy, hooks, batch_bytes
        self.destinations = {d: protocol.DrainDestination(d) for d in destinations}
        self.units = Counter()  # total, done, failed, skipped
        self.chunks = Counter()  # total, done
        self.problems: list[protocol.DrainProblem] = []
        self.problem_kinds: Counter[str] = Counter()
        # Units waiting per destination, and the worker sending them (one per destination).
        self._queues: dict[str, deque[Unit]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._in_flight: dict[str, Job] = {}
        self._bytes_done = 0
        self._source_lost = False
        self.tokens = 0  # of the chunks listed

    # -- progress --------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        """Bytes moved so far, batches in flight included."""
        return self._bytes_done + sum(j.bytes for j in self._in_flight.values())

    def to_status(self) -> protocol.DrainStatus:
        u = self.units
        return protocol.DrainStatus(
            units_total=u["total"], units_done=u["done"], units_failed=u["failed"],
            units_skipped=u["skipped"], chunks_total=self.chunks["total"],
            chunks_done=self.chunks["done"], copy=self.copy,
            destinations=list(self.destinations.values()), problems=list(self.problems))

    def _problem(self, unit: Unit, outcome: str, reason: str, kind: str) -> None:
        self.units[outcome] += 1
        self.problem_kinds[kind] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(protocol.DrainProblem(
                unit.keys[0].hex(), len(unit.keys), unit.num_tokens, outcome, reason))

    # -- steps -----------------------------------------------------------------------------
    async def run(self) -> None:
        """List, plan, move; again for what the source gained. Raises JobCancelled or
        JobFailed when not every unit moved (the status says which and why)."""
        seen: set[bytes] = set()
        for _ in range(MAX_ROUNDS):
            if self.job.cancel_requested or self._source_lost:
                break
            listing = [c for c in await self.hooks.list_chunks() if c.key not in seen]
            if not listing:
                break
            seen.update(c.key for c in listing)
            units = prefix_units(listing)
            self.units["total"] += len(units)
            self.chunks["total"] += len(listing)
            self.job.num_chunks = self.chunks["total"]
            self.tokens += sum(c.num_tokens for c in listing)
            self.job.num_tokens = max(self.job.num_tokens, self.tokens)
            self.job.total_bytes += sum(self.hooks.chunk_bytes(c.num_tokens) for c in listing)
            await self._execute(units)
        self._finish()

    def _accepts(self, d: str) -> bool:
        accepts = self.hooks.accepts or self.hooks.alive
        return not self.destinations[d].lost and accepts(d)

    def _live(self) -> list[str]:
        return [d for d in self.destinations if self._accepts(d)]

    def _plan(self, units: list[Unit]) -> None:
        """Place ``units`` over the destinations that take KV now (their room less what is
        queued or in flight to them) and queue them there, starting workers as needed."""
        room = {d: max(0, self.hooks.room(d) - self._pending(d)) for d in self._live()}
        plan, skipped = assign(units, room, self.hooks.chunk_cost)
        # A unit split in two (the part that fitted, the rest) counts as two from now on.
        self.units["total"] += sum(map(len, plan.values())) + len(skipped) - len(units)
        for unit, why in skipped:
            self._problem(unit, "skipped", why, "store_full")
        for d, queued in plan.items():
            if queued:
                self._queues.setdefault(d, deque()).extend(queued)
                if d not in self._workers or self._workers[d].done():
                    self._workers[d] = asyncio.create_task(self._worker(d))

    def _pending(self, d: str) -> int:
        """Bytes still to land at ``d``: its queue and its batch in flight."""
        cost = self.hooks.chunk_cost
        return sum(self._cost(d, u) for u in self._queues.get(d, ())) + sum(
            cost(d, k) for job in self._in_flight.values() if job.destination == d
            for k in job.keys)

    def _cost(self, d: str, unit: Unit) -> int:
        return sum(self.hooks.chunk_cost(d, k) for k in unit.keys)

    async def _execute(self, units: list[Unit]) -> None:
        self._plan(units)
        while any(not w.done() for w in self._workers.values()):
            await asyncio.wait([w for w in self._workers.values() if not w.done()])
        for w in self._workers.values():
            w.result()  # a bug in a worker surfaces as the job's internal error

    async def _worker(self, d: str) -> None:
        q = self._queues[d]
        while q:
            if self.job.cancel_requested or self._source_lost:
                while q:
                    unit = q.popleft()
                    if self._source_lost:
                        self._problem(unit, "failed", f"the source {self.job.source} is down",
                                      "unavailable")
                    else:
                        self._problem(unit, "skipped", "cancelled", "cancelled")
                return
            if not self._accepts(d):  # down, or a drain of its own began: the others take it
                self._lose(d, [], "it takes no KV now")
                return
            batch = [q.popleft()]
            size = self._cost(d, batch[0])
            while q and not batch[0].solo and not q[0].solo and q[0].keep == batch[0].keep \
                    and size + self._cost(d, q[0]) <= self.batch_bytes:
                size += self._cost(d, q[0])
                batch.append(q.popleft())
            keys = [k for u in batch for k in u.keys]
            child = Job(uuid.uuid4().hex, "copy" if self.copy or batch[0].keep else "move",
                        self.job.source, d, keys, sum(u.num_tokens for u in batch), len(keys))
            self._in_flight[child.event_id] = child
            try:
                await self.hooks.transfer(child, d, set().union(*(u.pinned for u in batch)))
            except (JobFailed, JobCancelled) as e:
                kind = e.kind if isinstance(e, JobFailed) else "cancelled"
                self._failed_batch(d, batch, kind, str(e))
                if self.destinations[d].lost:
                    return
                continue
            finally:
                del self._in_flight[child.event_id]
                self._bytes_done += child.bytes
            info = self.destinations[d]
            info.units += len(batch)
            info.chunks += len(keys)
            info.bytes += child.bytes
            self.units["done"] += len(batch)
            self.chunks["done"] += len(keys)

    def _failed_batch(self, d: str, batch: list[Unit], kind: str, why: str) -> None:
        if not self.hooks.alive(self.job.source):
            self._source_lost = True
            for unit in batch:
                self._problem(unit, "failed", why, kind)
            return
        if not self._accepts(d):  # (a dead peer's commands fail once it is seen down)
            self._lose(d, batch, why)
            return
        if len(batch) > 1:  # each again, alone
            for unit in reversed(batch):
                unit.solo = True
                self._queues[d].appendleft(unit)
            return
        outcome = "skipped" if kind in ("not_found", "cancelled") else "failed"
        self._problem(batch[0], outcome, why, kind)

    def _lose(self, d: str, batch: list[Unit], why: str) -> None:
        """Destination ``d`` is lost: what it was to take (a failed ``batch`` and its queue)
        is planned again over the others."""
        q = self._queues[d]
        logger.warning("drain %s: destination %s lost (%s); planning its %d unit(s) again",
                       self.job.event_id, d, why, len(batch) + len(q))
        self.destinations[d].lost = True
        rest = batch + list(q)
        q.clear()
        for unit in rest:
            unit.solo = False
        self._plan(rest)

    def _finish(self) -> None:
        u = self.units
        left = u["total"] - u["done"]
        if self.job.cancel_requested and left:
            raise JobCancelled(f"cancelled: {u['done']} of {u['total']} units moved; the "
                               f"other {left} stay at {self.job.source}")
        if left:
            kind = self.problem_kinds.most_common(1)[0][0] if self.problem_kinds else "internal"
            if kind == "cancelled":
                kind = "conflict"
            raise JobFailed(kind, f"{left} of {u['total']} units did not move "
                                  f"({u['skipped']} skipped, {u['failed']} failed) and stay at "
                                  f"{self.job.source}: see the drain's problems")
