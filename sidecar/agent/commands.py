"""What a sidecar does when the controller commands it, and the transfer leases it holds.

Contract
--------
* Called by the sidecar's receive loop (:mod:`sidecar.agent.runtime`), one task per command on
  the sidecar's event loop; any number may run at once. :meth:`CommandExecutor.run` never
  raises: every outcome is a :class:`~sidecar.protocol.Reply`, failures carrying a kind from
  the HTTP error map and a cause.
* Commands touch the store only through its public, thread-safe API; big leases and fetches
  run on worker threads so the loop keeps serving heartbeats and other commands.
* Commands come only from the controller: with a fleet secret the socket they arrive on is
  CURVE-authenticated (only fleet members connect), so they carry no credentials of their own.
* Leases: a :class:`~sidecar.protocol.LeaseChunks` holds chunks at this (source) store, and a
  :class:`~sidecar.protocol.FetchChunks` with ``hold`` the batch's chunks at this
  (destination) store, until the lease's :class:`~sidecar.protocol.EndLease`, its deadline
  (:meth:`LeaseTable.expire`, called every second) or a new controller
  (:meth:`LeaseTable.end_all`) — so no crashed controller or lost message leaves chunks held
  for ever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Callable

from sidecar import protocol
from sidecar.agent.fetch import INLINE_BYTES, ChunkFetcher, FetchRefused, IntegrityError
from vllm_kvmove.store import ChunkStore, StoreError
from vllm_kvmove.transfer import TransferError

logger = logging.getLogger("vllm_kvmove.sidecar")


class CommandRefused(Exception):
    """A command this sidecar will not run (``kind`` from the error map)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class LeaseTable:
    """Transfer leases held at this store: ``LeaseChunks.req_id -> (keys, deadline)``.

    An :meth:`end` may arrive before its lease exists: the controller ends the lease of a
    fetch it gave up on (a timeout, a dead link), and the fetch may still complete later,
    here. Such an end leaves a tombstone (kept :data:`TOMBSTONE_S`, at most
    :data:`MAX_TOMBSTONES`), and a lease added under it is released at once.
    """

    TOMBSTONE_S = 600.0
    MAX_TOMBSTONES = 4096

    def __init__(self, store: ChunkStore):
        self.store = store
        self._leases: dict[int, tuple[list[bytes], float]] = {}
        self._ended: dict[int, float] = {}  # lease id -> when its tombstone goes (insertion order)

    def add(self, lease_id: int, keys: list[bytes], lease_s: float) -> bool:
        """Record holds the caller already took on ``keys``; False (and the holds released)
        if the lease was ended before it began."""
        if self._ended.pop(lease_id, None) is not None:
            self.store.release(keys)
            return False
        self._leases[lease_id] = (keys, time.monotonic() + lease_s)
        return True

    def end(self, lease_id: int, delete: bool) -> int:
        """Release a lease's holds (deleting its chunks first when ``delete``); returns the
        chunks it held, 0 if it ended already or has not begun (then a tombstone waits for
        it)."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            now = time.monotonic()
            self._ended[lease_id] = now + self.TOMBSTONE_S
            while len(self._ended) > self.MAX_TOMBSTONES or \
                    next(iter(self._ended.values())) < now:
                del self._ended[next(iter(self._ended))]
            return 0
        keys = lease[0]
        if delete:  # a move: the destination holds them, the source lets go
            self.store.delete(keys)
        self.store.release(keys)
        return len(keys)

    def _end_where(self, expired: Callable[[float], bool], why: str) -> int:
        gone = [lid for lid, (_, deadline) in self._leases.items() if expired(deadline)]
        for lid in gone:
            self.end(lid, delete=False)
        if gone:
            logger.warning("released %d transfer lease(s): %s", len(gone), why)
        return len(gone)

    def expire(self) -> int:
        """End every lease past its deadline; returns how many."""
        now = time.monotonic()
        return self._end_where(lambda deadline: deadline < now, "lease expired")

    def end_all(self, why: str) -> int:
        """End every lease (a new controller: the old one's jobs are gone)."""
        return self._end_where(lambda deadline: True, why)

    def __len__(self) -> int:
        return len(self._leases)


class CommandExecutor:
    """Runs commands against one engine's store, fetcher and leases.

    Args:
        store: the engine's store.
        fetcher: the engine's :class:`~sidecar.agent.fetch.ChunkFetcher`.
        counters: the sidecar's transfer counters, updated here.
        hash_executor: threads a lease computes missing checksums on (the engine's copy
            threads); None: the lease's own thread.
    """

    def __init__(self, store: ChunkStore, fetcher: ChunkFetcher,
                 counters: protocol.TransferCounters,
                 hash_executor: concurrent.futures.Executor | None = None):
        self.store, self.fetcher, self.counters = store, fetcher, counters
        self.hash_executor = hash_executor
        self.leases = LeaseTable(store)

    async def run(self, msg: Any) -> protocol.Reply:
        """Run a command and turn any failure into a failed Reply."""
        try:
            return await self._execute(msg)
        except (StoreError, TransferError, IntegrityError, FetchRefused, CommandRefused) as e:
            return protocol.Reply(req_id=msg.req_id, ok=False, error_kind=e.kind, error=str(e))
        except Exception as e:  # noqa: BLE001
            logger.exception("command %s failed", type(msg).__name__)
            return protocol.Reply(req_id=msg.req_id, ok=False, error_kind="internal",
                                  error=f"{type(e).__name__}: {e}")

    async def _execute(self, msg: Any) -> protocol.Reply:
        store = self.store
        if isinstance(msg, protocol.LeaseChunks):
            # Inline unless there are checksums to compute: a hop to a worker thread and back
            # measured 0.07-0.27 ms each way here, as much as a small lease itself.
            small = store.unsummed_bytes(msg.keys) <= INLINE_BYTES
            infos = (store.hold(msg.keys) if small else await asyncio.to_thread(
                store.hold, msg.keys, True, self.hash_executor))
            self.leases.add(msg.req_id, list(msg.keys), msg.lease_s)
            self.counters.leased_chunks += len(infos)
            base = store.base_addr
            return protocol.Reply(req_id=msg.req_id, ok=True, count=len(infos), chunks=[
                protocol.ChunkDesc(i.key, i.num_tokens, base + i.offset, i.nbytes, i.checksum,
                                   i.parent)
                for i in infos])
        if isinstance(msg, protocol.EndLease):
            count = self.leases.end(msg.lease_id, msg.delete)
            self.counters.bytes_out += msg.transferred_bytes
            return protocol.Reply(req_id=msg.req_id, ok=True, count=count)
        if isinstance(msg, protocol.SetPinned):
            return protocol.Reply(req_id=msg.req_id, ok=True,
                                  count=store.set_pinned(msg.keys, msg.pinned))
        if isinstance(msg, protocol.ClearChunks):
            n = store.clear() if msg.keys is None else store.delete(msg.keys)
            return protocol.Reply(req_id=msg.req_id, ok=True, count=n)
        if isinstance(msg, protocol.FetchChunks):
            return await self._fetch(msg)
        if isinstance(msg, protocol.ListChunks):
            listing = [protocol.ChunkListing(*s) for s in store.summaries()]
            return protocol.Reply(req_id=msg.req_id, ok=True, count=len(listing),
                                  listing=listing)
        raise CommandRefused("bad_request", f"unknown command {type(msg).__name__}")

    async def _fetch(self, msg: protocol.FetchChunks) -> protocol.Reply:
        fetcher, counters = self.fetcher, self.counters
        try:
            inline, mapped = fetcher.plan(msg)
            nbytes, count, same_host = (fetcher.fetch(msg, mapped) if inline
                                        else await asyncio.to_thread(fetcher.fetch, msg, mapped))
            if msg.hold:  # the fetch held every chunk of the batch: until this lease ends
                self.leases.add(msg.req_id, [c.key for c in msg.chunks], msg.lease_s)
        except Exception:
            counters.fetch_failures += 1
            raise
        counters.fetches += 1
        counters.same_host_fetches += same_host
        counters.bytes_in += nbytes
        return protocol.Reply(req_id=msg.req_id, ok=True, count=count, bytes=nbytes)
