"""Lookup channel: the scheduler asks the worker's store how much of a prompt it holds; the
other ranks of an MLA engine hold and read rank 0's store through it.

vLLM calls ``get_num_new_matched_tokens`` in the EngineCore process, but the store lives in
the worker process. The worker runs a :class:`LookupServer` (a ZMQ REP socket on an IPC path
derived from the instance id and rank) and the scheduler a :class:`LookupClient`.

Contract
--------
* Requests are msgpack-encoded tagged structs (:data:`Request`), each answered by one reply:
    - :class:`Match` (the scheduler): the number of leading keys held and ready. Reads the
      store only (side-effect free, as vLLM requires of a lookup). A tensor-parallel engine
      has one server per rank (one store each); the scheduler asks them all at once and uses
      the shortest answer (:func:`match_prefix_everywhere`).
    - :class:`PoolInfo`, :class:`Hold`, :class:`Release` (the other ranks of an MLA engine,
      worker processes of the same engine on the same host, through :class:`RankZeroStore`):
      an MLA model's cache is the same on every rank, so rank 0's store is the engine's only
      one; rank r > 0 maps its pool read-only (``PoolInfo``: its
      :class:`~vllm_kvmove.shm.PoolHandle`) and copies a step's loads from it, holding the
      chunks meanwhile (``Hold``: each key's slot, or -1 where the chunk is not held and
      ready; ``Release``). The server keeps a ledger of the holds each rank took: a release
      of what a rank does not hold is ignored (a client whose hold timed out may release what
      it asked for, safely), so a confused peer cannot free another's hold.
* The client never blocks its caller longer than its timeout: a lookup that times out
  answers 0 (a cache miss, never a wrong hit), a hold that times out holds nothing (the
  loads are recomputed), and the socket is made afresh.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import warnings
from collections import Counter
from typing import Sequence, Union

import msgspec
import torch
import zmq

from vllm_kvmove.layout import KVLayout
from vllm_kvmove.shm import MappedPool, PeerPools, PoolHandle
from vllm_kvmove.store import ChunkMissing, ChunkStore, pool_layer_rows

logger = logging.getLogger(__name__)


class Match(msgspec.Struct, tag="match"):
    """How many leading ``keys`` the store holds (reply: int)."""

    keys: list[bytes]


class PoolInfo(msgspec.Struct, tag="pool"):
    """The store's shared pool (reply: :class:`~vllm_kvmove.shm.PoolHandle` or None)."""


class Hold(msgspec.Struct, tag="hold"):
    """Hold each of ``keys`` for tensor-parallel ``rank`` (reply: list of each key's slot, -1
    where it is not held and ready)."""

    keys: list[bytes]
    rank: int


class Release(msgspec.Struct, tag="release"):
    """End ``rank``'s holds of ``keys`` (reply: 0); keys it does not hold are ignored."""

    keys: list[bytes]
    rank: int


Request = Union[Match, PoolInfo, Hold, Release]


def lookup_path(instance_id: str, rank: int = 0) -> str:
    """IPC endpoint shared by the scheduler and the worker of tensor-parallel ``rank`` of one
    engine."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id)
    suffix = f"-rank{rank}" if rank else ""
    return f"ipc://{os.path.join(tempfile.gettempdir(), f'kvmove-{safe}{suffix}-lookup.ipc')}"


class LookupServer:
    """Answers :data:`Request` s against ``store`` on a daemon thread.

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
        self._held: dict[int, Counter[bytes]] = {}  # rank -> its holds (a ledger)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvmove-lookup", daemon=True)
        self._thread.start()

    def _answer(self, req: Request) -> object:
        store = self._store
        if isinstance(req, Match):
            return store.match_prefix(req.keys)
        if isinstance(req, PoolInfo):
            return store.shared_pool
        ledger = self._held.setdefault(req.rank, Counter())
        if isinstance(req, Hold):
            slots = []
            for key in req.keys:
                try:
                    (info,) = store.hold([key], checksums=False)
                except ChunkMissing:
                    slots.append(-1)
                    continue
                ledger[key] += 1
                slots.append(info.offset // store.slot_bytes)
            return slots
        mine = []
        for key in req.keys:  # one by one: a key named twice but held once is released once
            if ledger[key] > 0:
                ledger[key] -= 1
                if not ledger[key]:
                    del ledger[key]
                mine.append(key)
        store.release(mine)
        return 0

    def _run(self) -> None:
        dec, enc = msgspec.msgpack.Decoder(Request), msgspec.msgpack.Encoder()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            msg = self._sock.recv()
            try:
                answer = self._answer(dec.decode(msg))
            except Exception:  # noqa: BLE001 - a bad request must not kill the server
                logger.exception("bad lookup request")
                answer = None
            self._sock.send(enc.encode(answer))
        self._sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class LookupClient:
    """Client of a :class:`LookupServer` (the scheduler's, and an MLA engine's other ranks').

    Args:
        endpoint: the server's endpoint.
        timeout_ms: longest wait for one answer.
    """

    def __init__(self, endpoint: str, timeout_ms: int = 1000):
        self._endpoint = endpoint
        self._timeout_ms = timeout_ms
        self._ctx = zmq.Context.instance()
        self._enc = msgspec.msgpack.Encoder()
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

    def ask(self, request: Request, reply_type: type, default: object) -> object:
        """Send ``request`` and return its reply decoded as ``reply_type``; ``default`` on a
        timeout, an error or a reply of another type (logged)."""
        if not self._send(request):
            return default
        return self._receive(reply_type, default)

    def _send(self, request: Request) -> bool:
        try:
            self._socket().send(self._enc.encode(request))
            return True
        except zmq.ZMQError as e:
            self._failed(e)
            return False

    def _receive(self, reply_type: type, default: object) -> object:
        try:
            return msgspec.msgpack.decode(self._socket().recv(), type=reply_type)
        except (zmq.ZMQError, msgspec.ValidationError) as e:
            self._failed(e)
            return default

    def _failed(self, e: Exception) -> None:
        logger.warning("kvmove lookup channel %s failed (%s)", self._endpoint, e)
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
    request = Match(list(keys))
    sent = [c._send(request) for c in clients]
    held = [c._receive(int, 0) if ok else 0 for c, ok in zip(clients, sent)]
    return min(held)


class RankZeroStore:
    """Rank 0's store, as rank ``rank`` > 0 of an MLA engine reads it (see the module
    docstring): its pool mapped read-only, chunks held and released over the channel.

    Args:
        endpoint: rank 0's lookup endpoint.
        rank: this worker's tensor-parallel rank.
        layout: the engine's KV layout (the same on every rank).
        wait_s: how long to wait for rank 0's store at start-up (the ranks start together).
    Raises:
        RuntimeError: rank 0's pool cannot be had or mapped within ``wait_s`` (it must be a
            shared pool on this host): the engine does not start.
    """

    def __init__(self, endpoint: str, rank: int, layout: KVLayout, wait_s: float = 120.0):
        self.rank, self.layout = rank, layout
        self._client = LookupClient(endpoint, timeout_ms=2000)
        deadline = time.monotonic() + wait_s
        handle = None
        while handle is None:
            handle = self._client.ask(PoolInfo(), PoolHandle | None, None)
            if handle is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {rank}: rank 0's store did not offer its pool at "
                                       f"{endpoint} within {wait_s:.0f} s")
                time.sleep(0.2)
        self._pools = PeerPools(threads=1)
        pool = self._pools.get(handle)
        if pool is None:
            raise RuntimeError(f"rank {rank}: cannot map rank 0's store pool (pid {handle.pid})")
        self._pool: MappedPool = pool
        with warnings.catch_warnings():  # read-only memory, read only: copies by address
            warnings.simplefilter("ignore", UserWarning)
            self._tensor = torch.from_numpy(pool.view)
        self.num_slots = handle.nbytes // layout.chunk_bytes

    def layer_rows(self, layer: int) -> torch.Tensor:
        """Rank 0's pool rows of ``layer`` (:meth:`ChunkStore.layer_rows`), read-only."""
        return pool_layer_rows(self._tensor, self.layout, self.num_slots, layer)

    def hold(self, keys: Sequence[bytes]) -> list[int | None]:
        """Hold ``keys`` at rank 0; each one's slot, None where it is not held (gone since
        the lookup, or the channel failed: then the keys asked for are released again, in
        case the request got there)."""
        slots = self._client.ask(Hold(list(keys), self.rank), list[int], None)
        if slots is None or len(slots) != len(keys):
            self.release(keys)
            return [None] * len(keys)
        out = [slot if 0 <= slot < self.num_slots else None for slot in slots]
        self.release([k for k, slot, o in zip(keys, slots, out) if o is None and slot >= 0])
        return out

    def release(self, keys: Sequence[bytes]) -> None:
        """End this rank's holds of ``keys`` at rank 0."""
        if keys:
            self._client.ask(Release(list(keys), self.rank), int, None)

    def close(self) -> None:
        """Close the channel and unmap rank 0's pool — once the caller has dropped the rows
        :meth:`layer_rows` gave (a view still in use keeps the mapping, logged)."""
        self._client.close()
        self._tensor = None
        try:
            self._pools.close()
        except BufferError:
            logger.info("rank %d: rank 0's pool stays mapped until its views go", self.rank)
