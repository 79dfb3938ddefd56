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
* Conversion: a fetch whose source engine has another format (block size, packing, tensor
  parallelism: ``FetchChunks.convert``) reads every source shard it names into a staging
  buffer (:class:`StagingBuffers`, registered with NIXL), verifies each shard's checksum, and
  writes this rank's shard in this store's format into the slot
  (:func:`vllm_kvmove.convert.convert_chunk`); the slot's checksum is computed later, as for
  a chunk the engine saved. Same reservation, failure and publication rules.
* Failure: :class:`~vllm_kvmove.transfer.TransferError` (the peer is forgotten, so the next
  fetch handshakes anew), :class:`IntegrityError` (a checksum differs) or
  :class:`FetchRefused` (the chunks do not fit this engine's layout, or cannot be converted).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

import torch

from sidecar import protocol
from vllm_kvmove.blockhash import ChunkBlocks
from vllm_kvmove.checksum import checksum_stream
from vllm_kvmove.convert import conversion_obstacles, convert_chunk, source_ranks
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
# Converted fetches that may run at once (one reading while another converts: the controller
# keeps two fetches in flight per lane), each with a staging buffer of its own.
STAGING_BUFFERS = 2


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
        rank, world_size: this store's tensor-parallel rank and degree (for conversions).
    """

    def __init__(self, store: ChunkStore, layout: KVLayout, transfer: NixlTransfer,
                 peer_pools: PeerPools | None, verify: bool, timeout_s: float,
                 thread_init: Callable[[], None] | None = None, rank: int = 0,
                 world_size: int = 1):
        self.store, self.layout, self.transfer = store, layout, transfer
        self.peer_pools, self.verify, self.timeout_s = peer_pools, verify, timeout_s
        self.rank, self.world_size = rank, world_size
        # One thread hashes the pieces of every NIXL fetch in order (see _read_pipelined).
        self._verify_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="kvmove-verify", initializer=thread_init)
        self.staging = StagingBuffers(transfer, STAGING_BUFFERS)

    def close(self) -> None:
        self._verify_pool.shutdown(wait=False)
        self.staging.close()

    def plan(self, msg: protocol.FetchChunks) -> tuple[bool, MappedPool | None]:
        """Whether ``msg`` may run inline (small, and needing no handshake), and the source's
        pool mapped here if it is on this host (looked up once: the copy then uses it)."""
        if msg.convert is not None:
            return False, None  # several sources, and a conversion: on a thread
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
        """Read, verify and publish ``msg.chunks`` from ``msg.source`` (converting them from
        every shard of ``msg.convert``, when given).

        Args:
            msg: the command.
            mapped: the source's pool, if :meth:`plan` already mapped it.
        Returns:
            ``(bytes copied, chunks published, whether the same-host path was used)``.
        Raises:
            FetchRefused, TransferError, IntegrityError; StoreFull if no room can be made,
            ChunkBusy if another writer is writing one of the chunks here.
        """
        store = self.store
        source_layout = self._check(msg)
        reserved: list[tuple[int, int]] = []  # (index in msg.chunks, slot offset in the pool)
        present: list[bytes] = []  # already here (held when msg.hold)
        try:
            for i, c in enumerate(msg.chunks):
                slot = store.reserve(c.key, c.num_tokens, hold=msg.hold)
                if slot is not None:
                    reserved.append((i, slot * store.slot_bytes))
                else:
                    present.append(c.key)
            t_read = time.perf_counter()
            if msg.convert is not None:
                assert source_layout is not None
                moved, same_host = self._read_converted(msg.convert, source_layout, msg.chunks,
                                                        reserved)
            else:
                if mapped is None:
                    mapped = self.mapped(msg.source)
                moved = self._read_verified(msg.source, [
                    (msg.chunks[i], store.pool[off:off + msg.chunks[i].nbytes])
                    for i, off in reserved], mapped)
                same_host = mapped is not None
        except BaseException:
            for i, _ in reserved:
                store.abort(msg.chunks[i].key)
            if msg.hold:
                store.release(present)
            raise
        for i, _ in reserved:
            c = msg.chunks[i]
            # A converted chunk's bytes are not the source's: its checksum is computed here,
            # later (the store's backlog, as for a chunk the engine saved).
            store.commit(c.key, None if msg.convert is not None else c.checksum, hold=msg.hold,
                         blocks=None if msg.blocks is None else _chunk_blocks(msg.blocks[i]),
                         parent=c.parent, pinned=msg.pinned is not None and msg.pinned[i])
        if msg.pinned is not None and present:  # already here: pinned as the source had them
            here = set(present)
            store.set_pinned([c.key for c, pin in zip(msg.chunks, msg.pinned)
                              if pin and c.key in here])
        logger.debug("fetched %d chunks (%d bytes) from %s in %.1f ms (read and verify%s)",
                     len(reserved), moved, msg.source.instance_id,
                     (time.perf_counter() - t_read) * 1e3,
                     " and convert" if msg.convert is not None else "")
        return moved, len(reserved), same_host and bool(reserved)

    def _check(self, msg: protocol.FetchChunks) -> KVLayout | None:
        """Refuse a fetch whose chunks cannot be stored here (every shard's sizes against its
        layout; a conversion this store cannot make). Returns the source's layout for a
        conversion, else None."""
        layout, shards, source = self.layout, [msg.chunks], None
        if msg.blocks is not None and len(msg.blocks) != len(msg.chunks):
            raise FetchRefused("bad_request", "blocks must name every chunk's blocks, in order")
        if msg.pinned is not None and len(msg.pinned) != len(msg.chunks):
            raise FetchRefused("bad_request", "pinned must say for every chunk, in order")
        conv = msg.convert
        if conv is not None:
            try:
                source = KVLayout(**conv.layout)
            except (TypeError, ValueError) as e:
                raise FetchRefused("bad_request", f"unreadable source layout: {e}") from None
            if source.fingerprint() != layout.fingerprint():
                raise FetchRefused("incompatible", "the source's chunks are of other KV "
                                                   "(its layout's fingerprint differs)")
            problems = conversion_obstacles(source, conv.world_size, layout, self.world_size)
            if problems:
                raise FetchRefused("incompatible", f"cannot convert: {'; '.join(problems)}")
            needed = source_ranks(source, conv.world_size, layout, self.world_size, self.rank)
            if not set(needed) <= {s.rank for s in conv.shards} or \
                    conv.shards[0].chunks != msg.chunks:
                raise FetchRefused("bad_request", f"a conversion to rank {self.rank} needs the "
                                                  f"shards of source ranks {needed}, the first "
                                                  f"being the fetch's own chunks")
            layout, shards = source, [s.chunks for s in conv.shards]
        for chunks in shards:
            if len(chunks) != len(msg.chunks):
                raise FetchRefused("bad_request", "every shard must list the fetch's chunks")
            for c, mine in zip(chunks, msg.chunks):
                if c.key != mine.key or c.num_tokens != mine.num_tokens:
                    raise FetchRefused("bad_request", f"shards disagree on chunk {mine.key.hex()}")
                if not 0 < c.num_tokens <= layout.chunk_size or \
                        c.nbytes != layout.valid_bytes(c.num_tokens):
                    raise FetchRefused("incompatible",
                                       f"chunk {c.key.hex()}: {c.nbytes} bytes for {c.num_tokens} "
                                       f"tokens does not fit {'the source' if conv else 'this'} "
                                       f"engine's layout")
        return source

    def _read_converted(self, conv: protocol.Conversion, source: KVLayout,
                        chunks: list[protocol.ChunkDesc],
                        reserved: list[tuple[int, int]]) -> tuple[int, bool]:
        """Read every shard of the reserved chunks into a staging buffer, verify them, and
        write this rank's shard of each into its slot. Returns (bytes read, whether every
        shard came over the same-host path)."""
        store, dst = self.store, self.layout
        if not reserved:
            return 0, False
        total = sum(s.chunks[i].nbytes for s in conv.shards for i, _ in reserved)
        moved, same_host = 0, True
        with self.staging.take(total) as buf:
            views: dict[tuple[int, int], torch.Tensor] = {}  # (shard, chunk index) -> bytes
            off = 0
            for n, shard in enumerate(conv.shards):
                targets = []
                for i, _ in reserved:
                    c = shard.chunks[i]
                    views[n, i] = buf[off:off + c.nbytes]
                    targets.append((c, views[n, i]))
                    off += c.nbytes
                mapped = self.mapped(shard.source)
                same_host = same_host and mapped is not None
                moved += self._read_verified(shard.source, targets, mapped)
            for i, slot_off in reserved:
                num_tokens = chunks[i].num_tokens
                slot = store.pool[slot_off:slot_off + dst.valid_bytes(num_tokens)]
                convert_chunk([(s.rank, views[n, i]) for n, s in enumerate(conv.shards)],
                              source, conv.world_size, dst, self.world_size, self.rank,
                              num_tokens, slot)
        return moved, same_host

    def _read_verified(self, source: protocol.PeerInfo,
                       targets: list[tuple[protocol.ChunkDesc, torch.Tensor]],
                       mapped: MappedPool | None) -> int:
        """Copy each chunk of ``targets`` from ``source`` into its local bytes (a slot of the
        pool, or a staging buffer: memory NIXL knows) and check each one's checksum (when
        verification is on); returns bytes copied. Raises TransferError (the NIXL peer is then
        forgotten: the next fetch handshakes anew) or IntegrityError.

        Same host with a shared pool: copied from the mapped pool on the copy threads, each
        chunk checksummed in the same pass (:meth:`vllm_kvmove.shm.MappedPool.copy`).
        Otherwise a NIXL READ, verified in a pipeline: the bytes are read in pieces of at most
        :data:`PIECE_BYTES`, and each piece is hashed (streaming XXH3, the same digest as
        one-shot) on the verify thread while the next piece is read here — both release the
        GIL, so on two cores the hash (~13 GB/s on one core) hides behind the copy instead of
        adding to it.
        """
        transfer = self.transfer
        ranges = [ReadRange(c.addr, local.data_ptr(), c.nbytes) for c, local in targets]
        if not ranges:
            return 0  # this store holds them all already
        if mapped is not None:
            digests = mapped.copy(ranges, checksums=self.verify)
            moved = sum(r.nbytes for r in ranges)
        else:
            try:
                transfer.connect_peer(source.agent_name, source.p2p_url, self.timeout_s,
                                      source.incarnation)
                if not self.verify:  # one transfer: fastest
                    return transfer.read(source.agent_name, ranges, self.timeout_s)
                hashers = [checksum_stream() for _ in targets]
                moved = self._read_pipelined(source, ranges, [t for _, t in targets], hashers)
            except TransferError:
                transfer.forget_peer(source.agent_name)  # re-handshake next time
                raise
            digests = [h.intdigest() for h in hashers]
        for (c, _), digest in zip(targets, digests or ()):
            if digest != c.checksum:
                raise IntegrityError(f"chunk {c.key.hex()} from {source.instance_id}: checksum "
                                     f"{digest:08x} != {c.checksum:08x}")
        return moved

    def _read_pipelined(self, source: protocol.PeerInfo, ranges: list[ReadRange],
                        locals_: list[torch.Tensor], hashers: list) -> int:
        """NIXL READ of ``ranges`` (into ``locals_``, range by range) in pieces, each fed to
        its chunks' hashers on the verify thread while the next piece is read; returns bytes
        read."""
        transfer = self.transfer
        pieces = split_ranges(ranges, PIECE_BYTES)
        moved = 0
        pending: list[concurrent.futures.Future] = []
        try:
            for piece in pieces:
                moved += transfer.read(source.agent_name, [r for _, r in piece], self.timeout_s)
                work = []
                for i, r in piece:  # the piece's bytes within range i's local bytes
                    at = r.local_addr - ranges[i].local_addr
                    work.append((hashers[i], locals_[i][at:at + r.nbytes].numpy()))
                if len(pieces) == 1:
                    _hash_pieces(work)  # nothing to overlap with
                else:
                    pending.append(self._verify_pool.submit(_hash_pieces, work))
        finally:
            concurrent.futures.wait(pending)  # no hashing may outlive the reservation
        for f in pending:
            f.result()
        return moved


def _chunk_blocks(msg: protocol.ChunkBlocksMsg) -> ChunkBlocks:
    return ChunkBlocks(msg.parent, tuple(msg.hashes), tuple(msg.token_ids), msg.block_size)


class StagingBuffers:
    """Host memory that converted fetches read the source's shards into (they do not fit a
    slot as they are), registered with NIXL as a READ destination: ``count`` buffers, so as
    many converted fetches overlap (one reads while another converts), each grown to the
    largest fetch it served (and registered anew), and kept until the sidecar stops.

    Args:
        transfer: the NIXL endpoint the buffers are registered with.
        count: how many fetches may hold a buffer at once.
    """

    def __init__(self, transfer: NixlTransfer, count: int):
        self._transfer = transfer
        self._lock = threading.Lock()
        self._free = threading.Semaphore(count)
        self._idle: list[tuple[torch.Tensor, object]] = []  # (buffer, its registration)

    @contextlib.contextmanager
    def take(self, nbytes: int) -> Iterator[torch.Tensor]:
        """``nbytes`` of a buffer (uint8), the caller's alone until it exits; waits while
        ``count`` fetches hold one.

        Raises:
            TransferError: NIXL refused to register a bigger buffer.
        """
        with self._free:
            with self._lock:
                buf, registration = self._idle.pop() if self._idle else (None, None)
            try:
                if buf is None or buf.numel() < nbytes:
                    if registration is not None:
                        self._transfer.deregister_local(registration)
                        registration = None  # a failure below must not keep it as idle
                    buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
                    registration = self._transfer.register_local(buf.data_ptr(), buf.numel())
                yield buf[:nbytes]
            finally:
                if registration is not None:
                    with self._lock:
                        self._idle.append((buf, registration))

    def close(self) -> None:
        with self._lock:
            for _, registration in self._idle:
                self._transfer.deregister_local(registration)
            self._idle.clear()


def _hash_pieces(work: list[tuple[Any, Any]]) -> None:
    """Feed each (streaming hasher, bytes) pair, in order (runs on the verify thread)."""
    for hasher, data in work:
        hasher.update(data)
