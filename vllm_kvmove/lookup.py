"""Lookup channel: the scheduler asks the worker's store how much of a prompt it holds.

vLLM calls ``get_num_new_matched_tokens`` in the EngineCore process, but the store lives in
the worker process. The worker runs a :class:`LookupServer` (a ZMQ REP socket on an IPC path
derived from the instance id) and the scheduler a :class:`LookupClient`.

Contract: a request is a msgpack list of chunk keys; the reply is the number of leading keys
held and ready. A tensor-parallel engine has one server per rank (one store each); the
scheduler asks them all at once and uses the shortest answer. The server only reads the
store (side-effect free, as vLLM requires). The client never blocks the scheduler for longer than its timeout: on timeout it answers 0 (a
cache miss, never a wrong hit) and reconnects.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Sequence

import msgspec
import zmq

from vllm_kvmove.store import ChunkStore

logger = logging.getLogger(__name__)


def lookup_path(instance_id: str, rank: int = 0) -> str:
    """IPC endpoint shared by the scheduler and the worker of tensor-parallel ``rank`` of one
    engine."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id)
    suffix = f"-rank{rank}" if rank else ""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'kvmove-{safe}{suffix}-lookup.ipc')}"


class LookupServer:
    """Answers prefix lookups against ``store`` on a daemon thread.

    Args:
        store: the worker's store.
        endpoint: ZMQ endpoint to bind (see :func:`lookup_path`).
    """

    def __init__(self, store: ChunkStore, endpoint: str):
        self._store = store
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvmove-lookup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        dec, enc = msgspec.msgpack.Decoder(list[bytes]), msgspec.msgpack.Encoder()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            msg = self._sock.recv()
            try:
                n = self._store.match_prefix(dec.decode(msg))
            except Exception:  # noqa: BLE001 - a bad request must not kill the server
                logger.exception("bad lookup request")
                n = 0
            self._sock.send(enc.encode(n))
        self._sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class LookupClient:
    """Scheduler-side client of :class:`LookupServer`.

    Args:
        endpoint: the server's endpoint.
        timeout_ms: longest wait for one answer.
    """

    def __init__(self, endpoint: str, timeout_ms: int = 1000):
        self._endpoint = endpoint
        self._timeout_ms = timeout_ms
        self._ctx = zmq.Context.instance()
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(int)
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
            s.setsockopt(zmq.SNDTIMEO, self._timeout_ms)
            s.connect(self._endpoint)
            self._sock = s
        return self._sock

    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` the worker's store holds; 0 on timeout or error."""
        return match_prefix_everywhere([self], keys)

    def _send(self, keys: Sequence[bytes]) -> bool:
        try:
            self._socket().send(self._enc.encode(list(keys)))
            return True
        except zmq.ZMQError as e:
            self._failed(e)
            return False

    def _receive(self) -> int:
        try:
            return self._dec.decode(self._socket().recv())
        except zmq.ZMQError as e:
            self._failed(e)
            return 0

    def _failed(self, e: Exception) -> None:
        logger.warning("kvmove lookup to %s failed (%s); treating as a miss", self._endpoint, e)
        if self._sock is not None:
            self._sock.close()
        self._sock = None  # a REQ socket is stuck after a timeout: start afresh

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def match_prefix_everywhere(clients: Sequence[LookupClient], keys: Sequence[bytes]) -> int:
    """Leading ``keys`` that every client's store holds (a tensor-parallel engine's ranks:
    a prefix is usable only where every rank holds its shard). The requests go out together
    and the answers are awaited together, so N ranks cost one round trip, not N; a rank that
    fails or times out counts as holding nothing."""
    if not keys:
        return 0
    sent = [c._send(keys) for c in clients]
    held = [c._receive() if ok else 0 for c, ok in zip(clients, sent)]
    return min(held)
