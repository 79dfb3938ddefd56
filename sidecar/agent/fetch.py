"""ChunkFetcher: a destination's side of a transfer — reserve, read, verify, then publish.

Contract
--------
* Owner: the sidecar (one per engine), around the engine's store, its NIXL endpoint and its
  mappings of same-host peers' pools. Called by the sidecar's ``FetchChunks`` handler, on a
  worker thread (or inline on the sidecar's loop when the fetch is small and needs no
  handshake); several fetches may run at once.
* A fetch publishes nothing unless every chunk arrived and matched its checksum: chunks are
  reserved (invisible), read, verified, and only then committed; on any failure every
  reservation is aborted. Chunks the store already holds are skipped; one that another writer
  is still writing fails the fetch (``ChunkBusy``, kind ``conflict``): it is not here yet.
  With ``hold``, every chunk of the batch is held when the fetch succeeds — taken atomically
  with the commit, or with the finding that the chunk was already here — so nothing evicts
  it before the caller's lease ends.
* Transports: when the source's pool is in shared memory on this host (``same_host_copy``),
  the fetch maps it and copies the chunks itself (:mod:`vllm_kvmove.shm`: on the copy threads,
  each chunk hashed in the same pass). Otherwise it READs over NIXL, big fetches in pieces of
  :data:`PIECE_BYTES`, each hashed on the verify thread while the next one is read.
* Failure: :class:`~vllm_kvmove.transfer.TransferError` (the peer is forgotten, so the next
  fetch handshakes anew), :class:`IntegrityError` (a checksum differs) or
  :class:`FetchRefused` (the chunks do not fit this engine's layout).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Callable

from sidecar import protocol
from vllm_kvmove.checksum import checksum_stream
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.shm import MappedPool, PeerPools
from vllm_kvmove.store import ChunkStore
from vllm_kvmove.transfer import NixlTransfer, ReadRange, TransferError, split_ranges

logger = logging.getLogger("vllm_kvmove.sidecar")

# Below this size a fetch runs on the sidecar's event loop itself: a thread hop costs more.
INLINE_BYTES = 1 << 20
# Verification pipeline granularity: a NIXL fetch is read in pieces this big, each hashed on
# the verify thread while the next is read (larger: fewer NIXL transfers; smaller: more
# overlap).
PIECE_BYTES = 32 << 20


class IntegrityError(Exception):
    """A fetched chunk's bytes do not hash to the checksum its source gave."""

    kind = "integrity"


class FetchRefused(Exception):
    """A fetch names chunks that cannot be stored here (``kind`` from the error map)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ChunkFetcher:
    """Reads chunks from peers into one store.

    Args:
        store: this engine's store.
        layout: this engine's KV layout (a fetched chunk must fit it).
        transfer: this engine's NIXL endpoint.
        peer_pools: mappings of same-host peers' pools, or None (NIXL only).
        verify: check every chunk's checksum before publishing it.
        timeout_s: bound on any wait on the peer.
        thread_init: run by the verify thread when it starts.
    """

    def __init__(self, store: ChunkStore, layout: KVLayout, transfer: NixlTransfer,
                 peer_pools: PeerPools | None, verify: bool, timeout_s: float,
                 thread_init: Callable[[], None] | None = None):
        self.store, self.layout, self.transfer = store, layout, transfer
        self.peer_pools, self.verify, self.timeout_s = peer_pools, verify, timeout_s
        # One thread hashes the pieces of every NIXL fetch in order (see _read_pipelined).
        self._verify_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="kvmove-verify", initializer=thread_init)

    def close(self) -> None:
        self._verify_pool.shutdown(wait=False)

    def plan(self, msg: protocol.FetchChunks) -> tuple[bool, MappedPool | None]:
        """Whether ``msg`` may run inline (small, and needing no handshake), and the source's
        pool mapped here if it is on this host (looked up once: the copy then uses it)."""
        small = sum(c.nbytes for c in msg.chunks) <= INLINE_BYTES
        mapped = self.mapped(msg.source) if small else None
        inline = small and (mapped is not None or self.transfer.knows_peer(
            msg.source.agent_name, msg.source.p2p_url, msg.source.incarnation))
        return inline, mapped

    def mapped(self, source: protocol.PeerInfo) -> MappedPool | None:
        """The source's pool mapped here (same host, shared pool), or None: use NIXL."""
        if self.peer_pools is None:
            return None
        return self.peer_pools.get(source.shared_pool)

    def fetch(self, msg: protocol.FetchChunks,
              mapped: MappedPool | None = None) -> tuple[int, int, bool]:
        """Read, verify and publish ``msg.chunks`` from ``msg.source``.

        Args:
            msg: the command.
            mapped: the source's pool, if :meth:`plan` already mapped it.
        Returns:
            ``(bytes copied, chunks published, whether the same-host path was used)``.
        Raises:
            FetchRefused, TransferError, IntegrityError; StoreFull if no room can be made,
            ChunkBusy if another writer is writing one of the chunks here.
        """
        store, layout = self.store, self.layout
        for c in msg.chunks:
            if not 0 < c.num_tokens <= layout.chunk_size or c.nbytes != layout.valid_bytes(c.num_tokens):
                raise FetchRefused("incompatible",
                                   f"chunk {c.key.hex()}: {c.nbytes} bytes for {c.num_tokens} "
                                   f"tokens does not fit this engine's layout")
        reserved: list[tuple[protocol.ChunkDesc, int]] = []
        present: list[bytes] = []  # already here (held when msg.hold)
        try:
            for c in msg.chunks:
                slot = store.reserve(c.key, c.num_tokens, hold=msg.hold)
                if slot is not None:
                    reserved.append((c, slot * store.slot_bytes))
                else:
                    present.append(c.key)
            t_read = time.perf_counter()
            if mapped is None:
                mapped = self.mapped(msg.source)
            try:
                moved = self._read_verified(msg.source, reserved, mapped)
            except TransferError:
                self.transfer.forget_peer(msg.source.agent_name)  # re-handshake next time
                raise
        except BaseException:
            for c, _ in reserved:
                store.abort(c.key)
            if msg.hold:
                store.release(present)
            raise
        for c, _ in reserved:
            store.commit(c.key, c.checksum, hold=msg.hold)
        logger.debug("fetched %d chunks (%d bytes) from %s in %.1f ms (read and verify)",
                     len(reserved), moved, msg.source.instance_id,
                     (time.perf_counter() - t_read) * 1e3)
        return moved, len(reserved), mapped is not None and bool(reserved)

    def _read_verified(self, source: protocol.PeerInfo,
                       reserved: list[tuple[protocol.ChunkDesc, int]],
                       mapped: MappedPool | None) -> int:
        """Copy the reserved chunks from ``source`` and check each one's checksum (when
        verification is on); returns bytes copied. Raises TransferError or IntegrityError.

        Same host with a shared pool: copied from the mapped pool on the copy threads, each
        chunk checksummed in the same pass (:meth:`vllm_kvmove.shm.MappedPool.copy`).
        Otherwise a NIXL READ, verified in a pipeline: the bytes are read in pieces of at most
        :data:`PIECE_BYTES`, and each piece is hashed (streaming XXH3, the same digest as
        one-shot) on the verify thread while the next piece is read here — both release the
        GIL, so on two cores the hash (~13 GB/s on one core) hides behind the copy instead of
        adding to it.
        """
        store, transfer = self.store, self.transfer
        ranges = [ReadRange(c.addr, store.base_addr + off, c.nbytes) for c, off in reserved]
        if not ranges:
            return 0  # this store holds them all already
        if mapped is not None:
            digests = mapped.copy(ranges, checksums=self.verify)
            moved = sum(r.nbytes for r in ranges)
        else:
            transfer.connect_peer(source.agent_name, source.p2p_url, self.timeout_s,
                                  source.incarnation)
            if not self.verify:  # one transfer: fastest
                return transfer.read(source.agent_name, ranges, self.timeout_s)
            hashers = [checksum_stream() for _ in reserved]
            moved = self._read_pipelined(source, ranges, hashers)
            digests = [h.intdigest() for h in hashers]
        for (c, _), digest in zip(reserved, digests or ()):
            if digest != c.checksum:
                raise IntegrityError(f"chunk {c.key.hex()} from {source.instance_id}: checksum "
                                     f"{digest:08x} != {c.checksum:08x}")
        return moved

    def _read_pipelined(self, source: protocol.PeerInfo, ranges: list[ReadRange],
                        hashers: list) -> int:
        """NIXL READ of ``ranges`` in pieces, each fed to its chunks' hashers on the verify
        thread while the next piece is read; returns bytes read."""
        store, transfer = self.store, self.transfer
        pieces = split_ranges(ranges, PIECE_BYTES)
        moved = 0
        pending: list[concurrent.futures.Future] = []
        try:
            for piece in pieces:
                moved += transfer.read(source.agent_name, [r for _, r in piece], self.timeout_s)
                work = [(hashers[i], store.pool[r.local_addr - store.base_addr:
                                                r.local_addr - store.base_addr + r.nbytes].numpy())
                        for i, r in piece]
                if len(pieces) == 1:
                    _hash_pieces(work)  # nothing to overlap with
                else:
                    pending.append(self._verify_pool.submit(_hash_pieces, work))
        finally:
            concurrent.futures.wait(pending)  # no hashing may outlive the reservation
        for f in pending:
            f.result()
        return moved


def _hash_pieces(work: list[tuple[Any, Any]]) -> None:
    """Feed each (streaming hasher, bytes) pair, in order (runs on the verify thread)."""
    for hasher, data in work:
        hasher.update(data)
