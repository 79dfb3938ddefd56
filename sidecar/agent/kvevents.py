"""KVEventPublisher: the store's KV events on a ZMQ PUB socket of the sidecar, in vLLM's own
format — so a router sees KV moved into an engine the moment it lands, even when the engine
is idle (vLLM publishes its own stream, connector events included, only when it steps).

Contract
--------
* Owner: the sidecar, when ``kv_events_port`` is set; used on the sidecar's event loop only.
* Input: the store events the sidecar drains (:meth:`publish`); those of chunks whose vLLM
  blocks are named (:class:`vllm_kvmove.blockhash.ChunkBlocks`) become ``BlockStored`` /
  ``BlockRemoved`` with ``medium="CPU"`` (:func:`vllm_kvmove.blockhash.kv_event`), the rest
  are skipped.
* Output: ZMQ frames ``[topic, seq, batch]`` — vLLM's ``ZmqEventPublisher`` framing: ``seq`` an
  8-byte big-endian count of batches from 1 (a subscriber that sees a gap lost batches: a PUB
  socket drops for slow subscribers), ``batch`` a msgpack
  :class:`~sidecar.protocol.KVEventBatch` that vLLM's own decoder reads.
* Security: the socket binds ``sidecar_host`` (loopback only without a fleet secret) and, with
  the secret, is a CURVE server admitting fleet members only, like every sidecar socket.
* No replay socket: a subscriber that missed batches re-reads the engine's state elsewhere
  (the controller's ``/lookup`` for the host tier).
"""

from __future__ import annotations

import time
from typing import Iterable

import msgspec
import zmq

from sidecar import protocol
from vllm_kvmove.blockhash import kv_event
from vllm_kvmove.store import StoreEvent
from vllm_kvmove.zmqauth import FleetSecurity

_EVENT_TYPES = {"BlockStored": protocol.KVBlockStored, "BlockRemoved": protocol.KVBlockRemoved}
_encoder = msgspec.msgpack.Encoder()


def default_topic(instance_id: str, model: str, rank: int) -> str:
    """``kv@<instance_id>@<model>`` (rank r > 0: ``kv@<instance_id>.rank<r>@<model>``), the
    ``kv@<pod>@<model>`` shape routers such as llm-d's KV indexer parse."""
    return f"kv@{instance_id}{f'.rank{rank}' if rank else ''}@{model}"


def to_batch(events: Iterable[StoreEvent]) -> protocol.KVEventBatch | None:
    """The vLLM events of ``events`` as one batch, or None if none has named blocks."""
    out = []
    for ev in events:
        if ev.blocks is None:
            continue
        made = kv_event(ev.kind, ev.blocks)
        if made is not None:
            out.append(_EVENT_TYPES[made[0]](**made[1]))
    return protocol.KVEventBatch(time.time(), out) if out else None


class KVEventPublisher:
    """A PUB socket on ``host:port`` publishing under ``topic``.

    Args:
        host, port: where to bind.
        topic: the ZMQ topic of every message.
        security: the fleet's CURVE settings.
    Raises:
        SecurityError: a non-loopback ``host`` without a fleet secret; zmq.ZMQError: the
            port is taken.
    """

    def __init__(self, host: str, port: int, topic: str, security: FleetSecurity):
        host = "127.0.0.1" if host in ("localhost", "") else host
        security.check_bind(host, "the sidecar's KV events socket (kv_events_port)")
        self.topic = topic.encode()
        self.endpoint = f"tcp://{host}:{port}"
        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 100_000)
        security.server(self._sock)
        self._sock.bind(self.endpoint)
        self.seq = 0

    def publish(self, events: Iterable[StoreEvent]) -> int:
        """Publish the vLLM events of ``events`` as one batch (if any); returns how many."""
        batch = to_batch(events)
        if batch is None:
            return 0
        self.seq += 1
        try:
            self._sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"),
                                       _encoder.encode(batch)], flags=zmq.NOBLOCK)
        except zmq.Again:  # no subscriber keeps up: PUB drops, the seq gap says so
            pass
        return len(batch.events)

    def close(self) -> None:
        self._sock.close()
