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
* Used only on the controller's event loop (not thread-safe).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sidecar import protocol
from sidecar.controller.index import ChunkIndex
from sidecar.httpkit import ApiError, token_matches

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
        api_token: the fleet's secret; a registration without it is refused.
    """

    def __init__(self, index: ChunkIndex, heartbeat_timeout_s: float, api_token: str):
        self.index = index
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.api_token = api_token
        self.instances: dict[str, Instance] = {}

    # -- queries ---------------------------------------------------------------------------
    def is_up(self, inst: Instance) -> bool:
        return time.monotonic() - inst.last_heartbeat <= self.heartbeat_timeout_s

    def get(self, instance_id: str) -> Instance | None:
        return self.instances.get(instance_id)

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
    def register(self, identity: bytes, msg: protocol.Register, now: float) -> bool:
        """Accept or refuse a registration; True if accepted (the channel then acks it)."""
        if msg.protocol != protocol.PROTOCOL_VERSION or identity != msg.instance_id.encode():
            logger.warning("refusing registration of %r (protocol %d)", identity, msg.protocol)
            return False
        if not token_matches(self.api_token, msg.auth):
            logger.warning("refusing registration of %r: wrong or missing API token", identity)
            return False
        old = self.instances.get(msg.instance_id)
        self.instances[msg.instance_id] = Instance(msg, identity, now, now,
                                                   available_bytes=msg.capacity_bytes)
        if old is not None and old.reg.incarnation != msg.incarnation:
            self.index.drop_instance(msg.instance_id)
        logger.info("instance %s registered (engine %s, sidecar %s)", msg.instance_id,
                    msg.engine_url, msg.sidecar_url)
        return True

    def goodbye(self, inst: Instance) -> None:
        """The instance's engine is shutting down: forget it and its chunks."""
        self.index.drop_instance(inst.instance_id)
        del self.instances[inst.instance_id]
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
