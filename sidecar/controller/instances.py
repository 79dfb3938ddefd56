"""The registered instances: who is up, what each sent, and what its holdings are.

Contract
--------
* :class:`InstanceRegistry` owns every :class:`Instance` — one engine — and its
  :class:`Member` sidecars, one per tensor-parallel rank, each with a store holding that rank's
  shard of every chunk. It feeds the :class:`~sidecar.controller.index.ChunkIndex` from the
  members' snapshots and sequence-numbered events, under each member's :attr:`Member.holder`
  name. It knows nothing of sockets: :mod:`sidecar.controller.channel` decodes messages and
  hands them here; each method returns what must be answered (an ack, a resync reason), and the
  channel sends it.
* An engine speaks as a whole: it is *up* only while all ``world_size`` ranks are registered
  and heartbeat, and it holds a chunk only where every rank holds its shard
  (:meth:`InstanceRegistry.held_prefix`, :meth:`InstanceRegistry.holds`). A rank that
  stops heartbeating makes the engine down.
* Sequence numbers (per member: each rank's store numbers its own): an event batch that starts
  past ``applied_seq + 1`` is a gap (resync); a heartbeat showing a ``seq`` ahead of what was
  applied for longer than :data:`RESYNC_GRACE_S` means events were lost (resync); one behind it
  means the store restarted its numbering (resync).
* Snapshots: one larger than a slice (:data:`~sidecar.controller.index.SLICE_KEYS` chunks)
  is applied by a task on the event loop, a slice per turn of the loop, so lookups go on
  meanwhile (they see the member's old holdings until the new ones are in whole). Events
  newer than the snapshot are checked for gaps as they come but reach the index only after
  it; a later snapshot, a re-registration or a goodbye abandons one still being applied.
* Liveness: a member is *up* while its last heartbeat (alone, or inside a command's reply) is
  at most ``heartbeat_timeout_s`` old.
* Identity: a member is bound to the connection (ROUTER routing id) its accepted registration
  came on; :meth:`InstanceRegistry.bound` is the only way to find the member a message speaks
  for. A registration is validated like HTTP input (bounds by the decoder, coherence here —
  its layout must be a :class:`~vllm_kvmove.layout.KVLayout` of its fingerprint) and
  refused with a reason. A second start claiming a live member's (instance, rank) (another
  incarnation, while the first still heartbeats) is refused and displaces nothing; the same
  start on a new connection (it reconnected) is rebound. A rank whose engine-wide fields
  (world size, fingerprint, ...) disagree with a live rank of the same instance is refused;
  ranks that disagree but are down are forgotten (the engine restarted with another set-up).
* Used only on the controller's event loop (not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from sidecar import protocol
from sidecar.controller.index import ChunkIndex
from sidecar.httpkit import ApiError
from vllm_kvmove.blockhash import BlockHasher
from vllm_kvmove.hashing import ChunkSpan
from vllm_kvmove.layout import KVLayout

logger = logging.getLogger("vllm_kvmove.controller")

# How long a heartbeat may show events we never received before we ask for a snapshot.
RESYNC_GRACE_S = 1.0

# The Register fields that describe the engine, not one rank: every rank must agree on them.
ENGINE_FIELDS = ("world_size", "fingerprint", "model", "chunk_size", "slot_bytes", "engine_url")


def holder_name(instance_id: str, rank: int) -> str:
    """The index's and the channel's name of one rank's sidecar: the instance id for rank 0
    (so an engine without tensor parallelism is named as before), ``"<id>\\x00<rank>"`` for the
    others (instance ids have no control characters, so no two names collide)."""
    return instance_id if rank == 0 else f"{instance_id}\x00{rank}"


def describe_holder(holder: str) -> str:
    """A holder name as a person reads it: ``"e1"``, ``"e1 rank 1"``."""
    instance_id, _, rank = holder.partition("\x00")
    return f"{instance_id} rank {rank}" if rank else instance_id


@dataclass
class Member:
    """One rank's sidecar (from its Register and heartbeats)."""

    reg: protocol.Register
    identity: bytes
    registered_at: float
    last_heartbeat: float
    applied_seq: int = 0
    behind_since: float | None = None
    num_chunks: int = 0
    used_bytes: int = 0
    available_bytes: int = 0  # free or evictable, as of the last heartbeat
    # While a snapshot is being applied in slices: its task, and the events (kind, key,
    # num_tokens) held back until it is in.
    snapshot_task: asyncio.Task | None = None
    held_back: list[tuple[str, bytes, int]] | None = None

    @property
    def instance_id(self) -> str:
        return self.reg.instance_id

    @property
    def rank(self) -> int:
        return self.reg.rank

    @property
    def holder(self) -> str:
        """This sidecar's name in the index and the channel (:func:`holder_name`)."""
        return holder_name(self.reg.instance_id, self.reg.rank)

    def describe(self) -> str:
        return describe_holder(self.holder)


@dataclass
class Instance:
    """One engine: its ranks' sidecars, by rank (some may not have registered yet)."""

    instance_id: str
    world_size: int
    members: dict[int, Member] = field(default_factory=dict)

    @property
    def reg(self) -> protocol.Register:
        """The lowest registered rank's registration: its engine-wide fields
        (:data:`ENGINE_FIELDS`) are every rank's."""
        return self.members[min(self.members)].reg

    @property
    def naming(self) -> tuple[str, int]:
        """How the engine names a prompt's chunks: ``(fingerprint, chunk_size)`` (engines
        alike hash a prompt to the same keys)."""
        reg = self.reg
        return reg.fingerprint, reg.chunk_size

    @property
    def layout(self) -> KVLayout:
        """The engine's KV layout (per rank; checked readable at registration)."""
        return KVLayout(**self.reg.layout)

    @property
    def complete(self) -> bool:
        return len(self.members) == self.world_size

    @property
    def holders(self) -> list[str]:
        """Every rank's :attr:`Member.holder` name (registered or not), in rank order."""
        return [holder_name(self.instance_id, r) for r in range(self.world_size)]

    def ranked(self) -> list[Member]:
        """The registered members, in rank order."""
        return [self.members[r] for r in sorted(self.members)]

    @property
    def available_bytes(self) -> int:
        """Free or evictable bytes at the rank with the least (each rank stores a shard)."""
        return min((m.available_bytes for m in self.members.values()), default=0)

    @property
    def free_bytes(self) -> int:
        """Bytes of empty slots at the rank with the least, as of the last heartbeats (what a
        drain fills: it never evicts a destination's own KV to make room)."""
        return min((m.reg.capacity_bytes // m.reg.slot_bytes * m.reg.slot_bytes - m.used_bytes
                    for m in self.members.values()), default=0)

    @property
    def used_bytes(self) -> int:
        return sum(m.used_bytes for m in self.members.values())

    @property
    def capacity_bytes(self) -> int:
        return sum(m.reg.capacity_bytes for m in self.members.values())

    @property
    def last_heartbeat(self) -> float:
        """The oldest last heartbeat among the registered ranks."""
        return min(m.last_heartbeat for m in self.members.values())


class InstanceRegistry:
    """Every registered instance, by id.

    Args:
        index: the chunk index this registry keeps up to date.
        heartbeat_timeout_s: see :class:`~sidecar.controller.settings.ControllerSettings`.
    """

    def __init__(self, index: ChunkIndex, heartbeat_timeout_s: float):
        self.index = index
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.instances: dict[str, Instance] = {}
        self._by_identity: dict[bytes, Member] = {}  # routing id -> the member bound to it
        self._by_holder: dict[str, Member] = {}
        # groups(): recomputed only after the membership changed (every register, forget).
        self._version = 0
        self._groups: tuple[int, dict[tuple[str, int], int]] = (-1, {})

    # -- queries ---------------------------------------------------------------------------
    def groups(self) -> dict[tuple[str, int], int]:
        """``{(fingerprint, chunk_size): instances}`` of the registered instances: the ways a
        prompt's chunks are named in this fleet (usually one). A lookup hashes a prompt once
        per group and asks the index who holds it, instead of visiting every instance."""
        version, groups = self._groups
        if version != self._version:
            groups = {}
            for inst in self.instances.values():
                groups[inst.naming] = groups.get(inst.naming, 0) + 1
            self._groups = (self._version, groups)
        return groups

    def member_up(self, member: Member) -> bool:
        return time.monotonic() - member.last_heartbeat <= self.heartbeat_timeout_s

    def is_up(self, inst: Instance) -> bool:
        """Every rank registered and heartbeating."""
        return inst.complete and all(self.member_up(m) for m in inst.members.values())

    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    def member(self, holder: str) -> Member | None:
        """The registered sidecar named ``holder`` (:func:`holder_name`), or None."""
        return self._by_holder.get(holder)

    def bound(self, identity: bytes) -> Member | None:
        """The member whose accepted registration came on the connection ``identity``."""
        return self._by_identity.get(identity)

    def require(self, instance_id: str) -> Instance:
        """The instance, or a ``not_found`` ApiError naming the registered ones."""
        inst = self.instances.get(instance_id)
        if inst is None:
            known = ", ".join(sorted(self.instances)) or "none"
            raise ApiError("not_found", f"unknown instance {instance_id!r} (registered: {known})")
        return inst

    def require_up(self, inst: Instance, role: str = "instance") -> None:
        """Raise an ``unavailable`` ApiError if a rank of ``inst`` is missing or stopped
        heartbeating, naming it."""
        missing = [r for r in range(inst.world_size) if r not in inst.members]
        if missing:
            raise ApiError("unavailable", f"{role} {inst.instance_id} is down (rank(s) "
                                          f"{missing} of {inst.world_size} not registered)")
        down = [m for m in inst.ranked() if not self.member_up(m)]
        if down:
            which = ("" if inst.world_size == 1
                     else f": rank(s) {[m.rank for m in down]} of {inst.world_size}")
            raise ApiError("unavailable", f"{role} {inst.instance_id} is down (no heartbeat "
                                          f"for {self.heartbeat_timeout_s} s{which})")

    def any_up(self) -> Instance | None:
        return next((i for i in self.instances.values() if self.is_up(i)), None)

    def count_up(self) -> int:
        return sum(1 for i in self.instances.values() if self.is_up(i))

    def down_holders(self) -> set[str]:
        """The names of registered sidecars that stopped heartbeating."""
        return {h for h, m in self._by_holder.items() if not self.member_up(m)}

    def held_prefix(self, inst: Instance, spans: Sequence[ChunkSpan]) -> int:
        """Number of leading ``spans`` every rank of ``inst`` holds."""
        return min(self.index.held_prefix(h, spans) for h in inst.holders)

    def holds(self, inst: Instance, key: bytes) -> bool:
        """Every rank of ``inst`` holds ``key``."""
        return all(self.index.holds(h, key) for h in inst.holders)

    def count_chunks(self, inst: Instance) -> int:
        """Chunks every rank of ``inst`` holds."""
        if inst.world_size == 1:
            return self.index.count(inst.instance_id)
        first, *rest = inst.holders
        return sum(1 for k in self.index.keys_of(first)
                   if all(self.index.holds(h, k) for h in rest))

    def __len__(self) -> int:
        return len(self.instances)

    # -- what sidecars send ----------------------------------------------------------------
    def register(self, identity: bytes, msg: protocol.Register, now: float) -> str | None:
        """Accept a registration (binding its member to ``identity``), or refuse it.

        Returns:
            None if accepted (the channel then acks it), else the reason it was refused.
        """
        reason = _refusal(msg)
        inst = self.instances.get(msg.instance_id)
        old = None if inst is None else inst.members.get(msg.rank)
        if reason is None and old is not None and old.reg.incarnation != msg.incarnation \
                and old.identity != identity and self.member_up(old):
            reason = (f"{old.describe()} is registered by another live sidecar (start "
                      f"{old.reg.incarnation}, pid {old.reg.pid}); two engines with one "
                      f"instance_id?")
        if reason is None and inst is not None:
            for other in inst.ranked():
                if other.rank == msg.rank:
                    continue
                diffs = _disagreement(msg, other.reg)
                if diffs and self.member_up(other):
                    reason = (f"rank {msg.rank} of {msg.instance_id!r} disagrees with its live "
                              f"rank {other.rank}: {'; '.join(diffs)}")
                    break
        if reason is not None:
            logger.warning("refusing the registration of %r rank %d: %s", msg.instance_id,
                           msg.rank, reason)
            return reason
        if inst is not None and any(_disagreement(msg, m.reg) for m in inst.members.values()):
            # Every rank that disagrees is down (checked above): the engine restarted with
            # another set-up; its old ranks are gone.
            for m in inst.ranked():
                self._forget(inst, m)
            inst = None
        if inst is None:
            inst = self.instances[msg.instance_id] = Instance(msg.instance_id, msg.world_size)
        if old is not None and old.rank in inst.members:
            self._by_identity.pop(old.identity, None)
            if old.reg.incarnation != msg.incarnation:
                self.index.drop_instance(old.holder)
        member = Member(msg, identity, now, now, available_bytes=msg.capacity_bytes)
        self._version += 1
        inst.members[msg.rank] = member
        self._by_identity[identity] = member
        self._by_holder[member.holder] = member
        logger.info("instance %s registered (engine %s, sidecar %s)", member.describe(),
                    msg.engine_url, msg.sidecar_url)
        return None

    def _forget(self, inst: Instance, member: Member) -> None:
        self._version += 1
        self.index.drop_instance(member.holder)
        inst.members.pop(member.rank, None)
        self._by_identity.pop(member.identity, None)
        self._by_holder.pop(member.holder, None)

    def goodbye(self, member: Member) -> None:
        """A rank's engine is shutting down: forget that rank and its chunks (and the
        instance, once no rank is left)."""
        inst = self.instances.get(member.instance_id)
        if inst is None or inst.members.get(member.rank) is not member:
            return
        self._forget(inst, member)
        if not inst.members:
            del self.instances[inst.instance_id]
        logger.info("instance %s left (its engine is shutting down)", member.describe())

    def apply_snapshot(self, member: Member, snap: protocol.Snapshot) -> None:
        """Make ``snap`` the member's holdings: at once if it fits one slice (or no event loop
        runs), else in slices by a task (see the module docstring)."""
        member.applied_seq, member.behind_since = snap.seq, None
        member.num_chunks = snap.num_chunks
        member.held_back = member.snapshot_task = None  # one still being applied is abandoned
        # The records are read as they are applied, a slice per turn of the loop.
        steps = self.index.replace_steps(member.holder, protocol.unpack_chunks(snap.chunks))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            for _ in steps:
                pass
            return
        switched = next(steps, None)  # the first slice, now
        if switched is None:  # that was all
            return
        if not switched:
            member.held_back = []
        member.snapshot_task = loop.create_task(self._apply_in_slices(member, steps, switched),
                                                name=f"snapshot of {member.describe()}")

    async def _apply_in_slices(self, member: Member, steps: Iterator[bool],
                               switched: bool) -> None:
        task = asyncio.current_task()
        try:
            while True:
                if switched:
                    self._release_held_back(member, task)
                await asyncio.sleep(0)
                try:
                    switched = next(steps)
                except StopIteration as done:
                    switched = done.value
                    break
        finally:
            steps.close()  # cancelled: finishes (or abandons) it at once
            if switched:
                self._release_held_back(member, task)
            if member.snapshot_task is task:
                member.snapshot_task = member.held_back = None

    def _release_held_back(self, member: Member, task: asyncio.Task | None) -> None:
        """The member's snapshot is in: apply the events held back meanwhile."""
        if member.snapshot_task is not task or member.held_back is None:
            return
        held, member.held_back = member.held_back, None
        if self._by_holder.get(member.holder) is member:
            self._apply_to_index(member.holder, held)

    def _apply_to_index(self, holder: str, events: list[tuple[str, bytes, int]]) -> None:
        for kind, key, num_tokens in events:
            if kind == "admit":
                self.index.add(holder, key, num_tokens)
            else:
                self.index.remove(holder, key)

    def apply_heartbeat(self, member: Member, hb: protocol.Heartbeat, now: float) -> str | None:
        """Liveness and store summary; returns a resync reason if the store's events stay
        ahead of what was applied (or went backwards), else None."""
        member.last_heartbeat = now
        member.num_chunks, member.used_bytes = hb.num_chunks, hb.used_bytes
        member.available_bytes = hb.available_bytes
        if hb.seq == member.applied_seq:
            member.behind_since = None
        elif hb.seq < member.applied_seq:
            return "store sequence went backwards"
        elif member.behind_since is None:
            member.behind_since = now  # events may still be in flight on the other socket
        elif now - member.behind_since > RESYNC_GRACE_S:
            member.behind_since = None
            return "missed store events"
        return None

    def apply_events(self, member: Member, events: list[protocol.StoreEventMsg]) -> str | None:
        """Apply a batch of store events in order; returns a resync reason at a gap."""
        holder = member.holder
        for ev in events:
            if ev.seq <= member.applied_seq:
                continue  # already covered by a snapshot
            if ev.seq != member.applied_seq + 1:
                logger.warning("instance %s: event gap (%d after %d); resyncing",
                               member.describe(), ev.seq, member.applied_seq)
                return "event gap"
            if member.held_back is not None:  # a snapshot is being applied: after it
                member.held_back.append((ev.kind, ev.key, ev.num_tokens))
            elif ev.kind == "admit":
                self.index.add(holder, ev.key, ev.num_tokens)
            else:
                self.index.remove(holder, ev.key)
            member.applied_seq = ev.seq
        return None


def _disagreement(msg: protocol.Register, reg: protocol.Register) -> list[str]:
    """``"field: mine != theirs"`` for each of :data:`ENGINE_FIELDS` two ranks' registrations
    disagree on (empty: they describe one engine alike)."""
    return [f"{f}: {getattr(msg, f)!r} != {getattr(reg, f)!r}" for f in ENGINE_FIELDS
            if getattr(msg, f) != getattr(reg, f)]


def _refusal(msg: protocol.Register) -> str | None:
    """Why a registration the decoder accepted (every field within its bounds) is still
    unusable, or None."""
    if msg.protocol != protocol.PROTOCOL_VERSION:
        return (f"protocol version {msg.protocol}; this controller speaks "
                f"{protocol.PROTOCOL_VERSION}")
    if not msg.instance_id.isprintable() or msg.instance_id != msg.instance_id.strip():
        return "instance_id has control characters or surrounding spaces"
    for name in ("engine_url", "sidecar_url"):
        if not getattr(msg, name).startswith(("http://", "https://")):
            return f"{name} must be an http(s) URL, got {getattr(msg, name)!r}"
    host, _, port = msg.p2p_url.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"p2p_url must be host:port, got {msg.p2p_url!r}"
    if msg.capacity_bytes < msg.slot_bytes:
        return f"capacity_bytes {msg.capacity_bytes} holds no slot of {msg.slot_bytes} bytes"
    try:
        layout = KVLayout(**msg.layout)
    except (TypeError, ValueError) as e:
        return f"layout is not a KV layout: {e}"
    if layout.fingerprint() != msg.fingerprint or layout.model != msg.model:
        return "fingerprint or model differs from the layout's"
    if msg.block_hashing is not None:
        try:
            BlockHasher(msg.block_hashing.algo, msg.block_hashing.seed,
                        msg.block_hashing.block_size)
        except ValueError as e:
            return f"block_hashing: {e}"
        if msg.block_hashing.block_size != layout.block_size:
            return "block_hashing.block_size differs from the layout's"
    if msg.rank >= msg.world_size:
        return f"rank {msg.rank} is not below world_size {msg.world_size}"
    if msg.layout.get("chunk_size", msg.chunk_size) != msg.chunk_size:
        return f"chunk_size {msg.chunk_size} differs from the layout's {msg.layout['chunk_size']}"
    return None
