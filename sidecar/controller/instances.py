"""The registered instances: who is up, what each sent, and what its holdings are.

Contract
--------
* :class:`InstanceRegistry` owns every :class:`Instance` and feeds the
  :class:`~sidecar.controller.index.ChunkIndex` from their snapshots and sequence-numbered
  events. It knows nothing of sockets: :mod:`sidecar.controller.channel` decodes messages and
  hands them here; each method returns what must be answered (an ack, a resync reason), and the
  channel sends it.
* Sequence numbers: an event batch that starts past ``applied_seq + 1`` is a gap (resync); a
  heartbeat showing a ``seq`` ahead of what was applied for longer than :data:`RESYNC_GRACE_S`
  means events were lost (resync); one behind it means the store restarted its numbering
  (resync).
* Liveness: an instance is *up* while its last heartbeat (alone, or inside a command's reply)
  is at most ``heartbeat_timeout_s`` old.
* Identity: an instance is bound to the connection (ROUTER routing id) its accepted
  registration came on; :meth:`InstanceRegistry.bound` is the only way to find the instance
  a message speaks for. A registration is validated like HTTP input (bounds by the decoder,
  coherence here) and refused with a reason. A second start claiming a live instance's id
  (another incarnation, while the first still heartbeats) is refused and displaces nothing;
  the same start on a new connection (it reconnected) is rebound.
* Used only on the controller's event loop (not thread-safe).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sidecar import protocol
from sidecar.controller.index import ChunkIndex
from sidecar.httpkit import ApiError

logger = logging.getLogger("vllm_kvmove.controller")

# How long a heartbeat may show events we never received before we ask for a snapshot.
RESYNC_GRACE_S = 1.0


@dataclass
class Instance:
    """What the controller knows of one engine (from its Register and heartbeats)."""

    reg: protocol.Register
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
        self._by_identity: dict[bytes, str] = {}  # routing id -> the instance bound to it

    # -- queries ---------------------------------------------------------------------------
    def is_up(self, inst: Instance) -> bool:
        return time.monotonic() - inst.last_heartbeat <= self.heartbeat_timeout_s

    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

    def bound(self, identity: bytes) -> Instance | None:
        """The instance whose accepted registration came on the connection ``identity``."""
        iid = self._by_identity.get(identity)
        return None if iid is None else self.instances.get(iid)

    def require(self, instance_id: str) -> Instance:
        """The instance, or a ``not_found`` ApiError naming the registered ones."""
        inst = self.instances.get(instance_id)
        if inst is None:
            known = ", ".join(sorted(self.instances)) or "none"
            raise ApiError("not_found", f"unknown instance {instance_id!r} (registered: {known})")
        return inst

    def require_up(self, inst: Instance, role: str = "instance") -> None:
        """Raise an ``unavailable`` ApiError if ``inst`` stopped heartbeating."""
        if not self.is_up(inst):
            raise ApiError("unavailable", f"{role} {inst.instance_id} is down (no heartbeat "
                                          f"for {self.heartbeat_timeout_s} s)")

    def any_up(self) -> Instance | None:
        return next((i for i in self.instances.values() if self.is_up(i)), None)

    def count_up(self) -> int:
        return sum(1 for i in self.instances.values() if self.is_up(i))

    def down_ids(self) -> set[str]:
        return {iid for iid, inst in self.instances.items() if not self.is_up(inst)}

    def __len__(self) -> int:
        return len(self.instances)

    # -- what sidecars send ----------------------------------------------------------------
    def register(self, identity: bytes, msg: protocol.Register, now: float) -> str | None:
        """Accept a registration (binding the instance to ``identity``), or refuse it.

        Returns:
            None if accepted (the channel then acks it), else the reason it was refused.
        """
        reason = _refusal(msg)
        old = self.instances.get(msg.instance_id)
        if reason is None and old is not None and old.reg.incarnation != msg.incarnation \
                and old.identity != identity and self.is_up(old):
            reason = (f"instance id {msg.instance_id!r} is registered by another live sidecar "
                      f"(start {old.reg.incarnation}, pid {old.reg.pid}); two engines with one "
                      f"instance_id?")
        if reason is not None:
            logger.warning("refusing the registration of %r: %s", msg.instance_id, reason)
            return reason
        if old is not None:
            self._by_identity.pop(old.identity, None)
            if old.reg.incarnation != msg.incarnation:
                self.index.drop_instance(msg.instance_id)
        self.instances[msg.instance_id] = Instance(msg, identity, now, now,
                                                   available_bytes=msg.capacity_bytes)
        self._by_identity[identity] = msg.instance_id
        logger.info("instance %s registered (engine %s, sidecar %s)", msg.instance_id,
                    msg.engine_url, msg.sidecar_url)
        return None

    def goodbye(self, inst: Instance) -> None:
        """The instance's engine is shutting down: forget it and its chunks."""
        self.index.drop_instance(inst.instance_id)
        del self.instances[inst.instance_id]
        self._by_identity.pop(inst.identity, None)
        logger.info("instance %s left (its engine is shutting down)", inst.instance_id)

    def apply_snapshot(self, inst: Instance, snap: protocol.Snapshot) -> None:
        self.index.replace(inst.instance_id, ((c.key, c.num_tokens) for c in snap.chunks))
        inst.applied_seq, inst.behind_since = snap.seq, None
        inst.num_chunks = len(snap.chunks)

    def apply_heartbeat(self, inst: Instance, hb: protocol.Heartbeat, now: float) -> str | None:
        """Liveness and store summary; returns a resync reason if the store's events stay
        ahead of what was applied (or went backwards), else None."""
        inst.last_heartbeat = now
        inst.num_chunks, inst.used_bytes = hb.num_chunks, hb.used_bytes
        inst.available_bytes = hb.available_bytes
        if hb.seq == inst.applied_seq:
            inst.behind_since = None
        elif hb.seq < inst.applied_seq:
            return "store sequence went backwards"
        elif inst.behind_since is None:
            inst.behind_since = now  # events may still be in flight on the other socket
        elif now - inst.behind_since > RESYNC_GRACE_S:
            inst.behind_since = None
            return "missed store events"
        return None

    def apply_events(self, inst: Instance, events: list[protocol.StoreEventMsg]) -> str | None:
        """Apply a batch of store events in order; returns a resync reason at a gap."""
        for ev in events:
            if ev.seq <= inst.applied_seq:
                continue  # already covered by a snapshot
            if ev.seq != inst.applied_seq + 1:
                logger.warning("instance %s: event gap (%d after %d); resyncing",
                               inst.instance_id, ev.seq, inst.applied_seq)
                return "event gap"
            if ev.kind == "admit":
                self.index.add(inst.instance_id, ev.key, ev.num_tokens)
            else:
                self.index.remove(inst.instance_id, ev.key)
            inst.applied_seq = ev.seq
        return None


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
    if msg.layout.get("chunk_size", msg.chunk_size) != msg.chunk_size:
        return f"chunk_size {msg.chunk_size} differs from the layout's {msg.layout['chunk_size']}"
    return None
