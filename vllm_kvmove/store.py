"""ChunkStore: the engine's bounded host-memory KV store (location ``LocalCPUBackend``).

Contract
--------
* Owner: one ``ChunkStore`` per engine, created in the **worker** process by the connector
  (the KV tensors live there). Other processes reach it only through the lookup channel
  (:mod:`vllm_kvmove.lookup`) and the sidecar.
* Callers: the connector's worker side (``reserve``/``commit`` on save, ``hold``/``release``
  around a load, ``match_prefix`` via the lookup server), and the sidecar's command handlers
  (``hold``/``release``/``delete``/``set_pinned``/``reserve``/``commit``/``abort``,
  ``snapshot``, ``drain_events``). Every public method is thread-safe and O(chunks touched: a
  use also touches the chunks before it in its prompt, see Eviction); none copies
  chunk data or blocks on I/O while holding the lock.
* Memory: one pool of ``capacity_bytes // chunk_bytes`` fixed-size slots, allocated once, so the
  transfer layer registers it with NIXL once. A chunk's bytes live at
  ``pool[slot * chunk_bytes : slot * chunk_bytes + valid_bytes]``. With ``shared=True`` the
  pool is a memfd (:func:`vllm_kvmove.shm.allocate_pool`) that same-host peers may map to
  copy held chunks themselves; ``shared_pool`` describes it.
* Visibility: a chunk is *writing* from ``reserve`` until ``commit`` and invisible to
  ``match_prefix``, ``hold`` and ``snapshot`` until then; ``abort`` frees it without a trace.
  Readers therefore never see a half-written chunk, and a second writer of the same key is
  refused (:class:`ChunkBusy`): a reservation never counts as held.
* Holds and pins: ``hold``/``release`` are counted, short-lived references taken around a
  load or a transfer; ``set_pinned`` sets or clears an operator's never-evict flag (the
  controller's ``/pin`` and ``/unpin``), idempotent. Eviction: when a slot is needed and none
  is free, the least recently used *ready* chunk that is neither held nor pinned is evicted.
  Using a chunk (a save, a load or a transfer) also uses the chunks before it in its prompt
  (its ``parent`` chain): a prompt's head is never older than its tail, so eviction takes a
  prompt from its end — a head without its tail still serves a prefix, a tail without its
  head serves nothing.
  ``delete`` (and ``clear``) removes pinned chunks too — it is an explicit request, not
  eviction — but a held chunk's slot is freed only at its last ``release`` (so a source
  keeps KV until a destination has it).
* Memory commitment: the pool's pages are committed as chunks are first written — a page
  fault per 4 KiB page, which made an engine's first move several times slower than later
  ones. ``prefault`` commits them ahead of need, a piece at a time (the sidecar calls it from
  a background thread at start-up, ``prefault_pool``), without touching any byte, so it is
  safe beside writers.
* Events: every admit (commit) and evict/delete appends a :class:`StoreEvent` with a sequence
  number that increases by one per event; a consumer that sees a gap must re-read
  ``snapshot()``. The event buffer is bounded; overflowing it drops the oldest events, which
  consumers detect as a gap.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import OrderedDict, deque
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from vllm_kvmove.blockhash import ChunkBlocks
from vllm_kvmove.checksum import checksum
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.shm import PoolHandle, allocate_pool, populate_write

logger = logging.getLogger(__name__)

_EVENT_BUFFER = 1 << 16


class StoreError(Exception):
    """Base of store errors; ``kind`` names it for the control plane's error map."""

    kind = "store_error"


class StoreFull(StoreError):
    """No free slot and nothing evictable (everything held, pinned or being written)."""

    kind = "store_full"


class ChunkMissing(StoreError):
    """A key named by the caller is not (or no longer) in the store, or not ready."""

    kind = "not_found"


class ChunkBusy(StoreError):
    """Another writer is writing the chunk (reserved, not committed), or it is deleted but
    still held: it is not in the store, and it cannot be written now."""

    kind = "conflict"


class StoreEvent(NamedTuple):
    """One change of the store's contents.

    Attributes:
        seq: position in this store's event stream, starting at 1, no gaps.
        kind: ``"admit"`` (chunk became visible) or ``"evict"`` (chunk is gone, by eviction,
            delete or clear).
        key: the chunk key.
        num_tokens: tokens in the chunk.
        blocks: the vLLM blocks the chunk holds, when its writer named them (for KV events).
    """

    seq: int
    kind: str
    key: bytes
    num_tokens: int
    blocks: ChunkBlocks | None = None


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """Where a ready chunk lives, as handed to the transfer layer.

    Attributes:
        key: chunk key.
        num_tokens: tokens in the chunk.
        offset: byte offset of the chunk in the pool.
        nbytes: valid bytes (a contiguous prefix of the slot).
        checksum: XXH3-64 of the valid bytes (:func:`vllm_kvmove.checksum.checksum`).
        parent: the key of the chunk before it in its prompt (None: it starts the prompt, or
            its writer did not say).
    """

    key: bytes
    num_tokens: int
    offset: int
    nbytes: int
    checksum: int
    parent: bytes | None = None


class ChunkSummary(NamedTuple):
    """A ready chunk as :meth:`ChunkStore.summaries` lists it: its key, tokens, the key of the
    chunk before it in its prompt (None: first, or unknown) and the operator's pin."""

    key: bytes
    num_tokens: int
    parent: bytes | None
    pinned: bool


@dataclass(slots=True)
class _Entry:
    key: bytes
    slot: int
    num_tokens: int
    ready: bool = False
    holds: int = 0
    pinned: bool = False
    doomed: bool = False
    checksum: int | None = None
    blocks: ChunkBlocks | None = None
    parent: bytes | None = None
    touched: int = 0  # the last use (_use's op number) that moved it to the recent end


def pool_layer_rows(pool: torch.Tensor, layout: KVLayout, num_slots: int,
                    layer: int) -> torch.Tensor:
    """``layer``'s block slabs of every slot of a pool of ``num_slots`` chunk slots laid out
    as a :class:`ChunkStore`'s, as ``uint8[num_slots * blocks_per_chunk, block_slab_bytes]``
    (see :meth:`ChunkStore.layer_rows`; also a peer's mapped pool)."""
    lay = layout
    return pool[:num_slots * lay.chunk_bytes].view(
        num_slots * lay.blocks_per_chunk, lay.num_layers, lay.block_slab_bytes)[:, layer]


class ChunkStore:
    """A bounded, LRU map from chunk key to KV bytes in one host-memory pool.

    Args:
        layout: KV layout of the engine (fixes the slot size).
        capacity_bytes: pool size; rounded down to whole slots (at least one).
        shared: allocate the pool as shared memory peers on this host can map (falls back
            to private memory, with a warning, where memfd is unavailable).
    """

    def __init__(self, layout: KVLayout, capacity_bytes: int, shared: bool = False):
        self.layout = layout
        self.slot_bytes = layout.chunk_bytes
        self.num_slots = max(1, capacity_bytes // self.slot_bytes)
        nbytes = self.num_slots * self.slot_bytes
        # Neither allocation touches the pages: memory is committed as chunks are written.
        self.shared_pool: PoolHandle | None = None
        if shared:
            try:
                self.pool, self.shared_pool = allocate_pool(nbytes)
            except OSError as e:
                logger.warning("no shared-memory pool (%s): same-host peers will read over NIXL", e)
        if self.shared_pool is None:
            self.pool = torch.empty(nbytes, dtype=torch.uint8)
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU order: oldest first
        # Free slots as a min-heap: the lowest is taken first, so chunks reserved one after
        # another land in adjacent slots whenever there are any, and a peer copies them as one
        # big run (see vllm_kvmove.shm) — a LIFO list hands them out reversed after a clear.
        self._free = list(range(self.num_slots))
        self._events: deque[StoreEvent] = deque(maxlen=_EVENT_BUFFER)
        self._block_events: deque[StoreEvent] | None = None  # keep_block_events()
        self._seq = 0
        self._ops = 0  # numbers each use, so _use moves a chunk's ancestors once per use
        self.evictions = 0
        # Counts kept up to date by _account() at every change of an entry, so stats() (run
        # before every sidecar reply and heartbeat) is O(1) under the lock, not a pass over
        # tens of thousands of entries (~15-30 ms at 80k, blocking the engine's saves).
        self._n_writing = self._n_chunks = self._n_tokens = 0
        self._n_held = self._n_pinned = self._n_evictable = 0
        # Chunks committed without a checksum, for fill_checksums() to do off the save path.
        self._unsummed: deque[bytes] = deque()
        self._prefaulted = 0  # bytes of the pool prefault() has committed
        # The engine's loads from this store (record_load): count, bytes, microseconds.
        self._loads = self._loaded_bytes = self._load_us = 0
        # Called (outside the lock, from the committing thread) after events were appended;
        # the sidecar uses it to wake up instead of polling.
        self.on_events: Callable[[], None] | None = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def base_addr(self) -> int:
        return self.pool.data_ptr()

    @property
    def pool_bytes(self) -> int:
        return self.pool.numel()

    def slot_view(self, slot: int) -> torch.Tensor:
        """The slot's bytes as ``uint8[blocks_per_chunk, num_layers, block_slab_bytes]``."""
        lay = self.layout
        start = slot * self.slot_bytes
        return self.pool[start:start + self.slot_bytes].view(
            lay.blocks_per_chunk, lay.num_layers, lay.block_slab_bytes)

    def layer_rows(self, layer: int) -> torch.Tensor:
        """Every slot's block slabs of ``layer``, as ``uint8[num_slots * blocks_per_chunk,
        block_slab_bytes]``: row ``slot * blocks_per_chunk + b`` is block ``b`` of the chunk in
        ``slot`` (a strided view over the whole pool, for copies of many chunks at once)."""
        return pool_layer_rows(self.pool, self.layout, self.num_slots, layer)

    def prefault(self, max_bytes: int = 64 << 20) -> bool:
        """Commit the next ``max_bytes`` of the pool's memory (``madvise(MADV_POPULATE_WRITE)``:
        page tables filled and pages allocated, no byte read or written — safe while chunks
        are written). One caller at a time. Returns whether more of the pool remains; False
        also when the kernel cannot (before Linux 5.14): pages then fault in on first write.
        """
        total = self.pool_bytes
        if self._prefaulted >= total:
            return False
        start = self._prefaulted
        end = min(total, start + max_bytes)
        if not populate_write(self.base_addr + start, end - start):
            self._prefaulted = total
            return False
        self._prefaulted = end
        return end < total

    # -- queries ---------------------------------------------------------------------------
    def match_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` in the store and ready. Touches nothing."""
        with self._lock:
            n = 0
            for k in keys:
                e = self._entries.get(k)
                if e is None or not e.ready or e.doomed:
                    break
                n += 1
            return n

    def contains(self, key: bytes) -> bool:
        with self._lock:
            e = self._entries.get(key)
            return e is not None and e.ready and not e.doomed

    def snapshot(self) -> tuple[int, list[tuple[bytes, int]]]:
        """``(seq, [(key, num_tokens), ...])`` of every ready chunk, consistent with ``seq``."""
        with self._lock:
            return self._seq, [(e.key, e.num_tokens) for e in self._entries.values()
                               if e.ready and not e.doomed]

    def summaries(self) -> list[ChunkSummary]:
        """Every ready chunk with its prompt parent and pin (a drain groups chunks into whole
        prefixes by their parents, and carries pins over), least recently used first."""
        with self._lock:
            return [ChunkSummary(e.key, e.num_tokens, e.parent, e.pinned)
                    for e in self._entries.values() if e.ready and not e.doomed]

    def stats(self) -> dict[str, int]:
        """Counts for heartbeats, metrics and HTTP, in O(1): the sidecar calls this before
        every command's reply. ``num_chunks``/``num_tokens``: visible chunks; ``held``,
        ``pinned`` and ``available_slots`` also count deleted chunks still held;
        ``writing_chunks``: reserved, not yet committed; ``engine_*``: the engine's loads
        from the store (:meth:`record_load`)."""
        with self._lock:
            return {
                "num_chunks": self._n_chunks,
                "num_tokens": self._n_tokens,
                "used_bytes": len(self._entries) * self.slot_bytes,
                "capacity_bytes": self.num_slots * self.slot_bytes,
                "num_slots": self.num_slots,
                "free_slots": len(self._free),
                "available_slots": len(self._free) + self._n_evictable,
                "held_chunks": self._n_held,
                "pinned_chunks": self._n_pinned,
                "writing_chunks": self._n_writing,
                "evictions": self.evictions,
                "seq": self._seq,
                "engine_loads": self._loads,
                "engine_loaded_bytes": self._loaded_bytes,
                "engine_load_us": self._load_us,
            }

    def record_load(self, nbytes: int, seconds: float) -> None:
        """Count one load of the engine's from this store (the connector calls it after a
        step's load): ``stats()`` reports the totals, for the load path's bytes per second."""
        with self._lock:
            self._loads += 1
            self._loaded_bytes += nbytes
            self._load_us += round(seconds * 1e6)

    def drain_events(self, limit: int | None = None) -> list[StoreEvent]:
        """Pop buffered events, oldest first (at most ``limit``)."""
        with self._lock:
            n = len(self._events) if limit is None else min(limit, len(self._events))
            return [self._events.popleft() for _ in range(n)]

    def keep_block_events(self) -> None:
        """From now on, also buffer the events of chunks whose blocks are named (a second
        stream, for the engine's own KV events: :meth:`drain_block_events`)."""
        with self._lock:
            if self._block_events is None:
                self._block_events = deque(maxlen=_EVENT_BUFFER)

    def drain_block_events(self) -> list[StoreEvent]:
        """Pop the buffered events of :meth:`keep_block_events`, oldest first (the oldest are
        dropped past the buffer's bound: KV events are advisory)."""
        with self._lock:
            if not self._block_events:
                return []
            out = list(self._block_events)
            self._block_events.clear()
            return out

    # -- writes ----------------------------------------------------------------------------
    def reserve(self, key: bytes, num_tokens: int, hold: bool = False) -> int | None:
        """Reserve a slot for a new chunk; return the slot, or None if ``key`` is already in the
        store (with ``hold``, then also take a hold on it, atomically: it cannot be evicted
        between this answer and the caller's use of it).

        The chunk stays invisible until :meth:`commit`. Evicts the least recently used chunks
        that are neither held nor pinned if needed.

        Raises:
            ChunkBusy: another writer reserved ``key`` and has not committed it, or it was
                deleted and awaits its last release.
            StoreFull: no slot could be freed.
            ValueError: ``num_tokens`` outside ``1..chunk_size``.
        """
        if not 0 < num_tokens <= self.layout.chunk_size:
            raise ValueError(f"num_tokens {num_tokens} outside 1..{self.layout.chunk_size}")
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                if not e.ready or e.doomed:
                    raise ChunkBusy(f"chunk {key.hex()} is being written or deleted by another "
                                    f"operation")
                self._use([e])
                if hold:
                    self._account(e, -1)
                    e.holds += 1
                    self._account(e, 1)
                return None
            slot = self._take_slot()
            e = self._entries[key] = _Entry(key, slot, num_tokens)
            self._account(e, 1)
            return slot

    def commit(self, key: bytes, checksum: int | None = None, hold: bool = False,
               blocks: ChunkBlocks | None = None, parent: bytes | None = None,
               pinned: bool = False) -> None:
        """Make a reserved chunk visible (emits ``admit``); with ``hold``, held at once (no
        eviction can come between). Without a ``checksum`` the chunk joins the backlog of
        :meth:`fill_checksums`. ``blocks``: the vLLM blocks it holds (carried by its admit
        and evict events, for KV events). ``parent``: the key of the chunk before it in its
        prompt. ``pinned``: the operator's pin, set at once (a drained chunk keeps its pin)."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.ready:
                raise ChunkMissing(f"no reservation for chunk {key.hex()}")
            self._account(e, -1)
            e.ready, e.checksum, e.blocks, e.parent = True, checksum, blocks, parent
            e.pinned = e.pinned or pinned
            e.holds += hold
            self._account(e, 1)
            self._use([e])
            self._emit("admit", e)
            if checksum is None:
                self._unsummed.append(key)
        self._notify()

    def checksums_pending(self) -> bool:
        """Whether chunks committed without a checksum wait for :meth:`fill_checksums`
        (a hint, read without the lock: a caller skips the call when there is nothing)."""
        return bool(self._unsummed)

    def unsummed_bytes(self, keys: Iterable[bytes]) -> int:
        """Bytes a :meth:`hold` of ``keys`` would hash (ready chunks without a checksum yet):
        lets a caller hold inline when there is nothing to hash, on a thread otherwise."""
        with self._lock:
            return sum(self.layout.valid_bytes(e.num_tokens) for e in map(
                self._entries.get, keys) if e is not None and e.ready and e.checksum is None)

    def fill_checksums(self, max_chunks: int = 64) -> int:
        """Compute the checksums of up to ``max_chunks`` chunks committed without one (each
        held meanwhile, hashed outside the lock). Returns how many were computed; meant for
        an idle background thread, so a later transfer finds them ready."""
        done = 0
        while done < max_chunks:
            with self._lock:
                if not self._unsummed:
                    break
                key = self._unsummed.popleft()
                e = self._entries.get(key)
                if e is None or not e.ready or e.doomed or e.checksum is not None:
                    continue
                self._account(e, -1)
                e.holds += 1
                self._account(e, 1)
            try:
                value = self._checksum_of(e)
            finally:
                self.release([key])
            with self._lock:
                if self._entries.get(key) is e:
                    e.checksum = value
            done += 1
        return done

    def _notify(self) -> None:
        callback = self.on_events
        if callback is not None:
            callback()

    def abort(self, key: bytes) -> None:
        """Drop a reservation made by :meth:`reserve` (no event: it was never visible)."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None and not e.ready:
                self._drop(e, emit=False)

    def hold(self, keys: Iterable[bytes], checksums: bool = True,
             executor: Executor | None = None) -> list[ChunkInfo]:
        """Hold ready chunks (all or none) and describe them; a held chunk is never evicted,
        and a delete frees its slot only at its last :meth:`release`.

        Args:
            keys: chunk keys.
            checksums: compute missing checksums (done once per chunk, off the save path);
                False leaves ``checksum`` as 0 where unknown (for local loads).
            executor: threads to compute missing checksums on, one chunk per task (the
                caller waits); None computes them on the calling thread. A transfer that
                leases chunks saved moments ago (the background hashing has not reached
                them) waits for these: 245 MiB took ~27 ms on one thread here.

        Raises:
            ChunkMissing: a key is not in the store or not ready; nothing was held.
        """
        keys = list(keys)
        with self._lock:
            entries = []
            for k in keys:
                e = self._entries.get(k)
                if e is None or not e.ready or e.doomed:
                    raise ChunkMissing(f"chunk {k.hex()} is not in the store")
                entries.append(e)
            for e in entries:
                self._account(e, -1)
                e.holds += 1
                self._account(e, 1)
            self._use(entries)
        if checksums:
            try:
                self._fill(entries, executor)
            except BaseException:
                self.release(keys)
                raise
        return [ChunkInfo(e.key, e.num_tokens, e.slot * self.slot_bytes,
                          self.layout.valid_bytes(e.num_tokens), e.checksum or 0, e.parent)
                for e in entries]

    def _fill(self, entries: list[_Entry], executor: Executor | None) -> None:
        """Compute the checksums ``entries`` (held by the caller: their slots stay theirs)
        lack, on ``executor``'s threads when more than one is missing. Last chunk first: the
        background hashing (:meth:`fill_checksums`) works from the oldest, so the two meet
        once instead of hashing the same chunks side by side; a chunk both reach gets the
        same value twice (harmless)."""
        missing = [e for e in reversed(entries) if e.checksum is None]

        def one(e: _Entry) -> int:
            if e.checksum is not None:  # the background hashing got there first
                return e.checksum
            return self._checksum_of(e)

        values = (executor.map(one, missing) if executor is not None and len(missing) > 1
                  else map(one, missing))
        for e, value in zip(missing, values):
            e.checksum = value

    def release(self, keys: Iterable[bytes]) -> None:
        """Release one hold per key; completes deferred deletes. Unknown keys are ignored."""
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is None or e.holds == 0:
                    continue
                self._account(e, -1)
                e.holds -= 1
                self._account(e, 1)
                if e.holds == 0 and e.doomed:
                    self._drop(e, emit=False)  # its evict event went out at delete()

    def set_pinned(self, keys: Iterable[bytes], pinned: bool = True) -> int:
        """Set or clear the operator's never-evict flag on chunks in the store; returns chunks changed
        or already in that state. Unknown keys are ignored."""
        n = 0
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is not None and e.ready and not e.doomed:
                    self._account(e, -1)
                    e.pinned = pinned
                    self._account(e, 1)
                    n += 1
        return n

    def delete(self, keys: Iterable[bytes]) -> int:
        """Delete chunks; a held one goes at its last release. Returns chunks affected."""
        n = 0
        with self._lock:
            for k in keys:
                e = self._entries.get(k)
                if e is None or not e.ready or e.doomed:
                    continue
                n += 1
                if e.holds:
                    self._account(e, -1)
                    e.doomed = True  # invisible from now on; the slot frees at the last release
                    self._account(e, 1)
                    self._emit("evict", e)
                else:
                    self._drop(e)
        if n:
            self._notify()
        return n

    def clear(self) -> int:
        """Delete every ready chunk (held ones at their last release). Returns chunks affected."""
        with self._lock:
            keys = [e.key for e in self._entries.values() if e.ready]
        return self.delete(keys)

    def _checksum_of(self, e: _Entry) -> int:
        """The checksum of a chunk's valid bytes; the caller holds it (its slot stays its),
        not the lock: hashing reads the bytes once."""
        offset = e.slot * self.slot_bytes
        return checksum(self.pool[offset:offset + self.layout.valid_bytes(e.num_tokens)].numpy())

    # -- internals (lock held) -------------------------------------------------------------
    def _use(self, entries: Sequence[_Entry]) -> None:
        """Mark ``entries`` (a prompt's chunks in prompt order, or any) and the chunks
        before them in their prompts as just used: each moves to the recent end after the
        chunks after it, so a prompt's first chunk is its last evicted. A chunk already moved
        by this use stops the walk up its parents (a prompt's chunks share theirs; parent
        links a peer sent may even loop), so a use costs O(chunks moved)."""
        self._ops += 1
        op = self._ops
        for e in reversed(entries):
            while e is not None and e.touched != op:
                e.touched = op
                self._entries.move_to_end(e.key)
                e = self._entries.get(e.parent) if e.parent is not None else None

    def _take_slot(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        for e in self._entries.values():  # oldest first
            if e.ready and e.holds == 0 and not e.pinned:
                self._drop(e)
                self.evictions += 1
                return heapq.heappop(self._free)
        raise StoreFull(
            f"store full: {self.num_slots} slots, none evictable (held, pinned or being written)")

    def _drop(self, e: _Entry, emit: bool = True) -> None:
        self._account(e, -1)
        del self._entries[e.key]
        heapq.heappush(self._free, e.slot)
        if emit:
            self._emit("evict", e)

    def _account(self, e: _Entry, sign: int) -> None:
        """Add (sign 1) or remove (sign -1) ``e``'s share of the stats() counts: called
        around every change of an entry's ready/holds/pinned/doomed state."""
        if not e.ready:
            self._n_writing += sign
            return
        if not e.doomed:
            self._n_chunks += sign
            self._n_tokens += sign * e.num_tokens
        if e.holds:
            self._n_held += sign
        if e.pinned:
            self._n_pinned += sign
        if not e.holds and not e.pinned:
            self._n_evictable += sign

    def _emit(self, kind: str, e: _Entry) -> None:
        self._seq += 1
        event = StoreEvent(self._seq, kind, e.key, e.num_tokens, e.blocks)
        self._events.append(event)
        if self._block_events is not None and e.blocks is not None:
            self._block_events.append(event)
