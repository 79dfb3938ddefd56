"""KVMoveConnector: vLLM KV connector that writes prompt KV through to a host-memory store
and loads matching prefixes back, and starts the engine's vllm-kvmove sidecar.

Contract (who calls what, from which process)
---------------------------------------------
vLLM builds this class twice per engine (each hook's docstring says more):

* **Worker role** (worker process, first, during KV cache set-up). ``register_kv_caches``
  creates the :class:`~vllm_kvmove.store.ChunkStore` (one host pool), the
  :class:`~vllm_kvmove.lookup.LookupServer`, and starts the sidecar — the connector's one tie to
  the control plane. Per step, on the forward thread:
    - ``start_load_kv`` (before the forward): holds the planned chunks and hands their
      per-layer copies to the :class:`~vllm_kvmove.loader.LayerLoader`, which copies them
      into the paged cache in layer order on ``load_threads`` helper threads; a block the
      step itself writes into (where the loaded prefix ends mid-block) is copied here,
      before the forward. A chunk that vanished since the scheduler's lookup is reported by
      ``get_block_ids_with_load_errors`` so vLLM recomputes those blocks instead of reading
      garbage.
    - ``wait_for_layer_load`` (vLLM's attention hook, before each layer's attention): waits
      for that layer's blocks, copying alongside the helpers meanwhile — the copies of later
      layers overlap the forward of earlier ones.
    - ``wait_for_save`` (after the forward): ends the step's load (releases the chunks), then
      hands the copies of every prompt chunk completed by this step, from the paged cache
      into a reserved slot of the store, to the :mod:`~vllm_kvmove.saver` queue, which commits
      each chunk once its copy completed (block slabs, copies only; checksums are computed
      later, off this path, by the sidecar). ``save_mode``: inline, the forward thread copies
      right there (host caches' default); background, a side stream (CUDA: after the
      forward's kernels, into the page-locked pool) or a saver thread (host) copies while the
      engine goes on.
    - ``handle_preemptions`` (before each step's forward, before ``start_load_kv``): the
      paged-cache blocks the scheduler gave to requests this step (the plan's
      ``new_block_ids``) may be ones a background save still reads (freed by a request that
      ended meanwhile): the save queue fences them — the forward's stream waits for those
      saves (CUDA), or the forward thread does (host); a request's blocks are therefore
      freed at its end as usual, never held back for its saves.
  ``save_kv_layer`` does nothing: whole-step saves after the forward keep the forward's
  layers free of copies.
* **Scheduler role** (EngineCore process). ``get_num_new_matched_tokens`` computes chunk keys
  for the prompt (cached per request) and asks the worker's store over the lookup channel how
  many leading chunks it holds; it answers at most ``prompt_len - 1`` tokens (vLLM always
  computes the last prompt token), counted from the block-aligned local hit. It has no side
  effect other than remembering the answer for ``update_state_after_alloc``, which turns it
  into a block-level load plan. ``build_connector_meta`` hands the step's loads and saves
  to the worker and tracks, per running request, which prompt chunks are complete.

Chunks are ``chunk_size`` tokens (a multiple of the block size); the last chunk of a prompt may
be partial and is stored too, so even a 12-token prompt is saved and can be moved.

Tensor parallelism: each rank's worker has a store of its own (its shard of every chunk: the
same keys, its own heads), a lookup server and a sidecar on the configured ports + rank
(:meth:`~vllm_kvmove.config.KVMoveConfig.for_rank`), which registers with the controller as
that rank of the instance; the scheduler's lookup asks every rank and counts a prefix only
where every rank holds it. MLA models are the exception: every rank caches the same latent
vectors, so rank 0's store is the engine's one store — rank 0 alone saves, answers the
scheduler's lookups and registers a sidecar (as an engine of one rank: moves and copies send
one copy), and the other ranks map its pool read-only and load from it, holding the chunks
over the lookup channel meanwhile (:class:`~vllm_kvmove.lookup.RankZeroStore`; the ranks
share a host). Refused at construction: pipeline and data parallelism above 1, and
models with more than one KV cache group (hybrid attention:
:func:`~vllm_kvmove.layout.layout_from_vllm`).

KV events (:mod:`vllm_kvmove.blockhash`): when the engine publishes its own
(``--kv-events-config``) or the sidecar has a socket for them (``kv_events_port``), the
scheduler names each saved chunk's blocks as vLLM does (the engine's hash chain) in the save
plan, and the worker commits them with the chunk; the worker reports the store's events
after every step (:meth:`KVMoveConnector.get_kv_connector_kv_cache_events`), and the
scheduler hands them to vLLM's publisher (:meth:`KVMoveConnector.update_connector_output`,
:meth:`KVMoveConnector.take_events`).

Process-wide changes, all in the worker process unless noted:

* logging: the ``vllm_kvmove`` logger gets a handler of its own at INFO, and stops propagating
  (every process that builds a connector);
* ``sys.setswitchinterval`` is lowered to 0.2 ms (:func:`sidecar.agent.start_sidecar`), so the
  sidecar's thread gets the GIL within that long of the engine's threads;
* the sidecar's threads widen their CPU affinity to every CPU of the cgroup (vLLM binds the
  worker's threads to one core); the loader's ``load_threads`` helper threads (started in
  ``register_kv_caches``) run on every CPU but the forward thread's, when there are others,
  and move onto the forward's while it waits for them (:mod:`vllm_kvmove.loader`); with
  background saves, a saver thread (host cache) runs on those same CPUs, or a side stream and
  a completion thread (CUDA cache) are made, and the store's pool is page-locked with
  ``cudaHostRegister`` (:mod:`vllm_kvmove.saver`);
* NIXL: ``UCX_TLS`` is set to ``cma,tcp`` and UCX's tcp segment sizes to 256 KiB unless
  already set, ``UCX_NET_DEVICES`` to ``p2p_host``'s interface, and NIXL's agent constructor is
  wrapped for the duration of the agent's creation to set its progress thread's poll delay
  (:mod:`vllm_kvmove.transfer`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Iterable

import torch
from vllm.distributed.kv_events import (BlockRemoved, BlockStored, KVCacheEvent,
                                       KVConnectorKVEvents, KVEventAggregator)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from sidecar.agent import Sidecar, start_sidecar
from vllm_kvmove.affinity import IdleMeter, cpus_beside
from vllm_kvmove.blockhash import BlockHasher, ChunkBlocks, hasher_for, kv_event
from vllm_kvmove.config import load_config
from vllm_kvmove.hashing import ChunkSpan, chunk_spans
from vllm_kvmove.layout import (block_bytes, block_copier, block_copiers, check_kv_caches,
                                layer_order, layout_from_vllm)
from vllm_kvmove.loader import CopyPiece, LayerLoader
from vllm_kvmove.lookup import (LookupClient, LookupServer, RankZeroStore, lookup_path,
                                match_prefix_everywhere)
from vllm_kvmove.saver import InlineSaves, StreamSaves, ThreadSaves, pin_host_memory, save_queue
from vllm_kvmove.store import ChunkBusy, ChunkMissing, ChunkStore, StoreFull

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("vllm_kvmove.connector")

# Load pieces of about this much (8 blocks of 512 KiB): small enough that the forward thread,
# waiting for a layer, finds pieces of it to copy itself, large enough that their set-up (one
# call into the C kernel each) is noise.
_LOAD_PIECE_BYTES = 4 << 20
# Load helpers moved onto the forward's CPUs (starved beside it) go back once the CPUs beside
# were at least this idle in the last tenth of a second (vllm_kvmove.affinity.IdleMeter).
_SPARE_IDLE = 0.5


def _refuse_parallelism(vllm_config: "VllmConfig") -> None:
    """Raise ValueError for an engine with pipeline or data parallelism above 1 (tensor
    parallelism is supported: each rank has a store and a sidecar of its own, holding its
    shard of every chunk)."""
    pc = vllm_config.parallel_config
    sizes = {"pipeline_parallel_size": pc.pipeline_parallel_size,
             "data_parallel_size": pc.data_parallel_size}
    over = {k: v for k, v in sizes.items() if v > 1}
    if over:
        raise ValueError(f"KVMoveConnector does not support "
                         f"{', '.join(f'{k}={v}' for k, v in over.items())}")


def _tensor_parallel_rank() -> int:
    """This worker's tensor-parallel rank (vLLM's model-parallel groups exist by the time the
    KV caches are registered)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def _subscriber_endpoint(endpoint: str, engine_url: str) -> str:
    """Where a subscriber reaches the engine's own KV events: its ``--kv-events-config``
    endpoint with a wildcard host replaced by the engine's (``tcp://*:5557`` served at
    ``http://10.0.0.5:8000`` → ``tcp://10.0.0.5:5557``); "" if vLLM connects out rather than
    binds (then subscribers bind, and know where)."""
    from urllib.parse import urlsplit

    scheme, _, rest = endpoint.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or host not in ("*", "0.0.0.0", "::", "[::]"):
        return ""
    return f"tcp://{urlsplit(engine_url).hostname or '127.0.0.1'}:{port}"


def _log_like_vllm() -> None:
    """Show vllm-kvmove's own INFO logs in the engine's output (vLLM configures only "vllm")."""
    root = logging.getLogger("vllm_kvmove")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(
            "(kvmove pid=%(process)d) %(levelname)s %(asctime)s [%(name)s] %(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


@dataclass
class ChunkLoad:
    """Copy blocks of one stored chunk into the paged cache.

    Attributes:
        key: chunk key.
        blocks: ``(block index within the chunk, destination paged-cache block id)`` pairs.
        before_forward: its last block also receives tokens the step computes (the loaded
            prefix ends inside it), which the forward writes into the cache before the
            layer's attention waits: copy it before the forward starts.
    """

    key: bytes
    blocks: list[tuple[int, int]]
    before_forward: bool = False


@dataclass
class ChunkSave:
    """Copy one completed prompt chunk from the paged cache into the store.

    Attributes:
        key: chunk key.
        num_tokens: tokens in the chunk (``<= chunk_size``; less for a prompt's tail).
        block_ids: paged-cache block ids holding the chunk, in order.
        blocks: its vLLM blocks, named as the engine names them, when KV events are on.
        parent: the key of the prompt's chunk before it (None for the first).
    """

    key: bytes
    num_tokens: int
    block_ids: list[int]
    blocks: ChunkBlocks | None = None
    parent: bytes | None = None


@dataclass
class KVMoveConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker plan for one step."""

    loads: list[ChunkLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)
    # Paged-cache blocks given to requests this step (new requests', added and resumed ones'):
    # the step may write them, so background saves still reading them are fenced first.
    new_block_ids: list[int] = field(default_factory=list)


@dataclass
class _SaveTracker:
    spans: list[ChunkSpan]
    block_ids: list[int]
    tokens: list[int]
    next_chunk: int = 0
    parent: bytes | None = None  # hash of the block before the next chunk (KV events)


class KVMoveKVEvents(KVConnectorKVEvents):
    """The store's KV events one worker reports after a step (vLLM's container: the engine
    merges every tensor-parallel worker's into one, and :meth:`aggregate` keeps those every
    worker reported — a chunk counts where every rank holds its shard)."""

    def __init__(self, num_workers: int = 1) -> None:
        self._events = KVEventAggregator(num_workers)

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.add_events(events)

    def aggregate(self) -> "KVMoveKVEvents":
        common = self._events.get_common_events()
        self._events.clear_events()
        self._events.add_events(common)
        self._events.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._events.increment_workers(count)

    def get_all_events(self) -> list[KVCacheEvent]:
        return self._events.get_all_events()

    def get_number_of_workers(self) -> int:
        return self._events.get_number_of_workers()

    def clear_events(self) -> None:
        self._events.clear_events()
        self._events.reset_workers()


def _saved(store: ChunkStore, save: ChunkSave, ok: bool) -> None:
    """A save's end (on whichever thread the save queue ends it): commit the chunk — visible
    from here on, with its store event — or drop its reservation."""
    if ok:
        store.commit(save.key, blocks=save.blocks, parent=save.parent)
    else:
        store.abort(save.key)


class KVMoveConnector(KVConnectorBase_V1):
    """See the module docstring for the contract."""

    _cache_hit_source = CacheHitSource.HOST

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> str | None:
        """The physical order of the paged cache this connector asks vLLM for: ``"LBHNC"``
        (per layer: blocks, then heads, then tokens) — the CPU backend's only one, and what
        vLLM's own offloading and NIXL connectors ask GPU backends for, so that a block's
        heads are contiguous (a head range is one byte range, for splitting heads across
        ranks). The copies themselves work on any order (:func:`~vllm_kvmove.layout.block_bytes`)."""
        return "LBHNC"

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        """Built by vLLM once per role: in the worker process (WORKER), then in EngineCore
        (SCHEDULER). Loads the config and computes the KV layout and fingerprint, both the same
        in every process of the engine; the scheduler side connects its lookup client (no
        I/O until the first lookup). Does not block.

        Raises:
            ConfigError: a bad config key or value; ValueError: an unsupported engine
                (parallelism above 1, several KV cache groups). Either stops start-up.
        """
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_like_vllm()
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = load_config(extra)
        _refuse_parallelism(vllm_config)
        if self.config.drain_on_shutdown and role == KVConnectorRole.WORKER:
            grace = getattr(vllm_config, "shutdown_timeout", 0) or 0
            if grace <= self.config.drain_timeout_s:
                logger.warning("kvmove: drain_on_shutdown waits up to %.0f s, but vLLM kills "
                               "this engine %s s after SIGTERM (--shutdown-timeout): give it "
                               "--shutdown-timeout above drain_timeout_s",
                               self.config.drain_timeout_s, grace)
        self._world_size = vllm_config.parallel_config.tensor_parallel_size
        self.layout = layout_from_vllm(vllm_config, kv_cache_config, self.config.chunk_size,
                                       self.config.hash_seed)
        # MLA at TP > 1: every rank caches the same latent vectors, so rank 0's store is the
        # engine's one store (saved, looked up and moved once); the other ranks load from it.
        self._one_store = self.layout.kind == "mla" and self._world_size > 1
        self.fingerprint = self.layout.fingerprint()
        self._block_size = self.layout.block_size
        # KV events: the engine's own stream (--kv-events-config) and/or the sidecar's PUB
        # socket. Both name blocks as the engine does (one hasher, in every process).
        kv_events_config = getattr(vllm_config, "kv_events_config", None)
        self._engine_events = bool(kv_events_config and kv_events_config.enable_kv_cache_events)
        self._block_hasher: BlockHasher | None = None
        if self._engine_events or self.config.kv_events_port:
            algo = vllm_config.cache_config.prefix_caching_hash_algo
            self._block_hasher = hasher_for(algo, self._block_size)
            if self._block_hasher is None:
                logger.warning("KV events of the host store are off: this engine's block "
                               "hashes (%s without PYTHONHASHSEED) cannot be reproduced", algo)
        self._engine_kv_events: KVMoveKVEvents | None = None  # scheduler: from the workers
        self._engine_events_endpoint = (
            _subscriber_endpoint(kv_events_config.endpoint, self.config.engine_url)
            if self._engine_events else "")
        # scheduler-side state
        self._lookups: list[LookupClient] = []  # one per tensor-parallel rank
        self._spans: dict[str, list[ChunkSpan]] = {}
        self._query: dict[str, tuple[int, int]] = {}
        self._pending_loads: list[ChunkLoad] = []
        self._trackers: dict[str, _SaveTracker] = {}
        # worker-side state
        self.store: ChunkStore | None = None
        self._layers: list[torch.Tensor] = []
        self._lookup_server: LookupServer | None = None
        self._sidecar: Sidecar | None = None
        self._load_errors: set[int] = set()
        self._layer_index: dict[str, int] = {}
        self._pool_rows: list[torch.Tensor] = []  # the store pool's rows, per layer
        self._loader: LayerLoader | None = None
        self._loading: list[bytes] = []  # chunks held by the step's load until wait_for_save
        self._loads_before_forward = False  # set if the engine's attention never waits
        self._saver: InlineSaves | ThreadSaves | StreamSaves | None = None
        self._rank0: RankZeroStore | None = None  # ranks > 0 of an MLA engine: rank 0's store
        if role == KVConnectorRole.SCHEDULER:
            self._lookups = [LookupClient(lookup_path(self.config.instance_id, rank))
                             for rank in range(1 if self._one_store else self._world_size)]
        logger.info("KVMoveConnector %s role=%s layout=%s fingerprint=%s", self.config.instance_id,
                    role.name, self.layout, self.fingerprint)
        if role == KVConnectorRole.WORKER:  # once per engine, not once per process
            for note in self.config.notes:
                logger.info("config: %s", note)

    # ======================================================================================
    # Worker side
    # ======================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Worker, once, during KV cache set-up: check the paged cache against the layout,
        create the store (allocates the pool's address space; pages are committed as chunks
        are written), start the lookup server and the sidecar. Blocks until the sidecar
        serves (its NIXL agent takes ~0.5 s, on the sidecar's thread).

        Raises:
            ValueError: the KV tensors do not match the layout; RuntimeError: the sidecar did
                not start (e.g. a port is taken). Either stops the engine.
        """
        names = layer_order(self._kv_cache_config)
        layers = [kv_caches[name] for name in names]
        check_kv_caches(self.layout, layers)
        self._layer_index = {name: i for i, name in enumerate(names)}
        # CUDA caches: the forward thread copies each layer before its attention (ordered on
        # its stream); host caches: helpers copy alongside the forward.
        threads = self.config.load_threads if layers[0].device.type == "cpu" else 0
        forward_cpus = os.sched_getaffinity(0)  # vLLM bound this (the forward) thread already
        beside = cpus_beside(forward_cpus)
        if beside == forward_cpus:
            threads = 0  # no CPU beside the forward's: a helper would only take turns with it
        meter = IdleMeter(beside)
        if threads:
            meter.sample_every(0.1)
        self._loader = LayerLoader(
            len(layers), threads, cpus=beside, rescue_cpus=forward_cpus,
            # After a rescue (on a core another engine keeps busy a helper waits runnable for
            # seconds) the helpers return beside the forward once those CPUs look idle.
            use_helpers=lambda: (meter.recent or 0.0) >= _SPARE_IDLE)
        # Byte views [num_blocks, block_slab_bytes] over each layer's physical blocks: chunk
        # copies are dtype-agnostic memcpys.
        self._layers = [block_bytes(t) for t in layers]
        rank = _tensor_parallel_rank() if self._world_size > 1 else 0
        if self._one_store and rank > 0:
            # No store, lookup server or sidecar of its own: loads come from rank 0's pool,
            # mapped read-only (its ranks share a host), and rank 0 saves.
            self._rank0 = RankZeroStore(lookup_path(self.config.instance_id, 0), rank,
                                        self.layout)
            self._pool_rows = [self._rank0.layer_rows(li) for li in range(len(layers))]
            logger.info("kvmove (rank %d of %d, MLA): loads from rank 0's store", rank,
                        self._world_size)
            return
        self.store = ChunkStore(self.layout, self.config.capacity_bytes,
                                shared=self.config.same_host_copy or self._one_store)
        device = layers[0].device
        self._saver = save_queue(self.config.save_mode, device, cpus=beside)
        if device.type == "cuda" and isinstance(self._saver, StreamSaves):
            # Device-to-host copies into pageable memory are staged and synchronous.
            pin_host_memory(self.store.base_addr, self.store.pool_bytes)
        logger.info("kvmove saves: %s (cache on %s)", self._saver.mode, device)
        self._pool_rows = [self.store.layer_rows(li) for li in range(len(layers))]
        if self._engine_events and self._block_hasher is not None:
            self.store.keep_block_events()  # drained by get_kv_connector_kv_cache_events
        self._lookup_server = LookupServer(self.store, lookup_path(self.config.instance_id, rank))
        logger.info("kvmove store (rank %d of %d): %d slots of %d bytes (%d tokens each)", rank,
                    self._world_size, self.store.num_slots, self.store.slot_bytes,
                    self.layout.chunk_size)
        # The one tie to the control plane: from here on, calls flow from the sidecar into the
        # store. Rank r's sidecar listens on the configured ports + r; an MLA engine's one
        # store registers as an engine of one rank.
        self._sidecar = start_sidecar(self.config.for_rank(rank), self.store, self.layout,
                                      rank=rank,
                                      world_size=1 if self._one_store else self._world_size,
                                      block_hasher=self._block_hasher,
                                      engine_events=self._engine_events_endpoint)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Worker, forward thread, before the step's forward: hold this step's planned chunks
        (so no delete or eviction frees them until ``wait_for_save``), copy the blocks the
        step writes into, and queue the rest, layer by layer in pieces of about
        ``_LOAD_PIECE_BYTES``, on the loader. A chunk gone since the lookup is recorded for
        :meth:`get_block_ids_with_load_errors`. Blocks for the bookkeeping (~0.2 ms for 64
        blocks) and the boundary blocks' copies only."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVMoveConnectorMetadata)
        loader = self._loader
        assert loader is not None
        self._end_load()  # a step whose wait_for_save never came (it raised)
        bpc = self.layout.blocks_per_chunk
        # (pool row, paged-cache block) pairs: copied now, and copied beside the forward.
        now: tuple[list[int], list[int]] = ([], [])
        later: tuple[list[int], list[int]] = ([], [])
        slots = self._hold([load.key for load in meta.loads])
        for load, slot in zip(meta.loads, slots):
            if slot is None:
                logger.warning("chunk %s vanished before its load; vLLM will recompute it",
                               load.key.hex())
                self._load_errors.update(dst for _, dst in load.blocks)
                continue
            self._loading.append(load.key)
            first_row = slot * bpc
            rows, blocks = now if load.before_forward else later
            for within, block in load.blocks:
                rows.append(first_row + within)
                blocks.append(block)
        pieces: list[CopyPiece] = []
        slab = self.layout.block_slab_bytes
        for li, kv in enumerate(self._layers):
            pool_rows = self._pool_rows[li]
            for copy in block_copiers(kv, now[1], pool_rows, now[0]):
                copy()
            blocks = tuple(later[1])
            for copy in block_copiers(kv, later[1], pool_rows, later[0], _LOAD_PIECE_BYTES):
                # A piece's own blocks are not kept: a failed copy (never seen: memcpy) sends
                # the layer's blocks back to be recomputed.
                pieces.append(CopyPiece(li, copy, blocks, 0))
        for piece in pieces:  # bytes for the load path's rate, shared out evenly
            piece.nbytes = slab * len(later[1]) * len(self._layers) // len(pieces)
        loader.start(pieces)
        if self._loads_before_forward:  # this engine's attention does not wait: copy now
            loader.wait_layer(loader.num_layers - 1)

    def _hold(self, keys: list[bytes]) -> list[int | None]:
        """Hold each chunk of ``keys`` for a load (the store's, or rank 0's for the other
        ranks of an MLA engine); each one's slot, None where it is gone."""
        if self._rank0 is not None:
            return self._rank0.hold(keys) if keys else []
        store = self.store
        assert store is not None
        slots: list[int | None] = []
        for key in keys:
            try:
                (info,) = store.hold([key], checksums=False)
            except ChunkMissing:
                slots.append(None)
                continue
            slots.append(info.offset // store.slot_bytes)
        return slots

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Worker, forward thread, before each layer's attention (vLLM's
        ``maybe_transfer_kv_layer``): return once the step's loads of this layer (and the
        ones before it) are in the paged cache, copying queued ones meanwhile. Returns at once
        when nothing is loading."""
        loader = self._loader
        if loader is not None:
            loader.wait_layer(self._layer_index.get(layer_name, loader.num_layers - 1))

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Worker, forward thread, at the start of each step (before ``start_load_kv`` and the
        forward): fence the blocks this step's requests were given (``new_block_ids``)
        against background saves still reading them. Returns at once with inline saves;
        on CUDA it queues a wait on the forward's stream; on a host cache it waits for those
        saves only."""
        if self._saver is None or not isinstance(kv_connector_metadata, KVMoveConnectorMetadata):
            return
        if kv_connector_metadata.new_block_ids and self._saver.in_flight():
            self._saver.fence(kv_connector_metadata.new_block_ids)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        """Worker, forward thread, per layer: nothing (saves are whole-step copies in
        :meth:`wait_for_save`)."""
        return

    def _end_load(self) -> None:
        """Finish the step's load (every copy done), record blocks to recompute, and release
        its chunks. If the forward never waited for a layer (an attention path without
        vLLM's hook), every block of the step is recomputed and later loads run before the
        forward."""
        loader, store = self._loader, self.store
        if loader is None or (store is None and self._rank0 is None):
            return
        active = loader.active
        self._load_errors.update(loader.finish())
        if active and store is not None:
            store.record_load(*loader.last_step)
        if active and loader.never_waited:
            logger.warning("this engine's attention did not wait for layer-wise loads; the "
                           "step's loaded blocks are recomputed, and loads now run before "
                           "the forward")
            self._loads_before_forward = True
        if self._loading:
            if self._rank0 is not None:
                self._rank0.release(self._loading)
            elif store is not None:
                store.release(self._loading)
            self._loading = []

    def wait_for_save(self) -> None:
        """Worker, forward thread, after the step's forward: save every prompt chunk this step
        completed into the store — reserve a slot, hand its copies to the save queue, which
        commits it (visible, with its store event) once they completed, or aborts the
        reservation if one failed. A full store skips the chunk with a warning, and a chunk
        another writer is writing (a fetch) is skipped; the request is unaffected. Blocks
        for the copies only with inline saves (no I/O, no checksums), not at all with
        background ones."""
        self._end_load()
        if not self.has_connector_metadata() or self._rank0 is not None:
            return  # (an MLA engine's rank 0 saves for every rank)
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVMoveConnectorMetadata)
        store, saver = self.store, self._saver
        assert store is not None and saver is not None
        non_blocking = isinstance(saver, StreamSaves)
        for save in meta.saves:
            try:
                slot = store.reserve(save.key, save.num_tokens)
            except StoreFull as e:
                logger.warning("not saving chunk %s: %s", save.key.hex(), e)
                continue
            except ChunkBusy:  # another writer (a fetch moving it in) is writing it right now
                continue
            if slot is None:  # already in the store (loaded, moved in, or saved by another request)
                continue
            try:
                view = store.slot_view(slot)
                rows = range(len(save.block_ids))
                copies = [block_copier(view[:, li], rows, kv, save.block_ids, non_blocking)
                          for li, kv in enumerate(self._layers)]
            except BaseException:
                store.abort(save.key)
                raise
            saver.submit(copies, save.block_ids, partial(_saved, store, save))

    def get_kv_connector_kv_cache_events(self) -> KVMoveKVEvents | None:
        """Worker, after each step (also steps without a forward): the store's KV events
        since the last call — chunks saved, moved in, evicted, deleted or moved away, with
        their vLLM blocks — for the engine's own event stream (``--kv-events-config``). None
        when it is off or nothing happened. Does not block."""
        if not self._engine_events or self.store is None:
            return None
        events = []
        for ev in self.store.drain_block_events():
            made = kv_event(ev.kind, ev.blocks) if ev.blocks is not None else None
            if made is not None:
                events.append((BlockStored if made[0] == "BlockStored" else BlockRemoved)(
                    **made[1]))
        if not events:
            return None
        out = KVMoveKVEvents()
        out.add_events(events)
        return out

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Worker, after the step: paged-cache blocks whose planned load failed (their chunk
        was deleted or evicted since the lookup); vLLM recomputes them. Clears the set."""
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Both roles, at engine shutdown (the worker's, when the engine process exits — on
        SIGTERM only if vLLM's ``--shutdown-timeout`` gives it time: with the default 0 it is
        killed at once): with ``drain_on_shutdown``, first have the controller drain the store
        and wait for it (up to ``drain_timeout_s``, logging what did not move) — after every
        background save has ended; then stop the
        sidecar (it says goodbye to the controller), the lookup server and client. Blocks up
        to ~5 s more for the sidecar's thread."""
        if self._saver is not None:
            self._saver.close()  # every save submitted committed (or aborted) before a drain
            self._saver = None
        if self._sidecar is not None:
            if self.config.drain_on_shutdown:
                self._drain_before_exit(self._sidecar)
            self._sidecar.stop()
            self._sidecar = None
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self._rank0 is not None:
            self._pool_rows = []  # views of rank 0's mapped pool
            self._rank0.close()
            self._rank0 = None
        for client in self._lookups:
            client.close()

    def _drain_before_exit(self, sidecar: Any) -> None:
        t0 = time.monotonic()
        timeout = self.config.drain_timeout_s
        logger.info("kvmove: shutting down; draining %s (up to %.0f s)",
                    self.config.instance_id, timeout)
        ended = sidecar.leave(timeout)
        took = time.monotonic() - t0
        if ended is None:
            logger.warning("kvmove: the drain of %s did not end in %.0f s; what it had not "
                           "moved is lost with this engine", self.config.instance_id, took)
        elif ended.status == "done":
            logger.info("kvmove: drained %s in %.1f s: %d prefixes (%d chunks, %d bytes) to %s",
                        self.config.instance_id, took, ended.units_done, ended.chunks_done,
                        ended.bytes, ", ".join(ended.destinations) or "nowhere (it was empty)")
        else:
            logger.warning("kvmove: the drain of %s %s after %.1f s: %d of %d prefixes moved "
                           "(to %s); the rest is lost with this engine: %s (job %s)",
                           self.config.instance_id, ended.status, took, ended.units_done,
                           ended.units_total, ", ".join(ended.destinations) or "nowhere",
                           ended.error, ended.event_id or "none")

    # ======================================================================================
    # Scheduler side
    # ======================================================================================
    def _spans_for(self, req_id: str, tokens: list[int]) -> list[ChunkSpan]:
        spans = self._spans.get(req_id)
        if spans is None:
            spans = chunk_spans(tokens, self.layout.chunk_size, self.fingerprint)
            self._spans[req_id] = spans
        return spans

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Scheduler (EngineCore), on every scheduling attempt of a waiting request: how many
        prompt tokens beyond ``num_computed_tokens`` the store can supply (at most
        ``prompt_len - 1``), and ``False`` (loads are synchronous, in the next step).

        Blocks the scheduler on one IPC round trip to the workers' lookup servers (every
        tensor-parallel rank at once; the shortest answer counts: tens of microseconds when
        the workers are idle; up to the client's 1 s timeout if one does not answer, which
        then counts as a miss). Side-effect free in the store; it only
        remembers its answer for :meth:`update_state_after_alloc`.
        """
        tokens = request.prompt_token_ids
        if not tokens or len(tokens) < 2 or not self._lookups:
            return 0, False
        spans = self._spans_for(request.request_id, list(tokens))
        held = match_prefix_everywhere(self._lookups, [s.key for s in spans])
        matched = spans[held - 1].end if held else 0
        external = min(matched, len(tokens) - 1) - num_computed_tokens
        if external <= 0:
            return 0, False
        self._query[request.request_id] = (num_computed_tokens, external)
        return external, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        """Scheduler, after vLLM allocated the request's blocks: turn the remembered hit into
        a block-level load plan for the next :meth:`build_connector_meta`. Does not block."""
        query = self._query.pop(request.request_id, None)
        if num_external_tokens == 0 or query is None:
            return
        local, external = query
        assert external == num_external_tokens, (external, num_external_tokens)
        spans = self._spans[request.request_id]
        block_ids = blocks.get_block_ids()[0]
        bs, bpc = self._block_size, self.layout.blocks_per_chunk
        first, end = local // bs, -(-(local + external) // bs)
        by_chunk: dict[int, ChunkLoad] = {}
        for b in range(first, end):
            c = b // bpc
            load = by_chunk.setdefault(c, ChunkLoad(spans[c].key, []))
            load.blocks.append((b % bpc, block_ids[b]))
        if (local + external) % bs:  # the step's first computed token lands in the last block
            by_chunk[(end - 1) // bpc].before_forward = True
        self._pending_loads.extend(by_chunk.values())

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        """Scheduler, once per step: the step's loads (planned since the last step) and the
        saves of every prompt chunk the step completes; tracks each running request's blocks
        (new, added, or replaced on resumption). Does not block."""
        meta = KVMoveConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            meta.new_block_ids.extend(new.block_ids[0] if new.block_ids else ())
            if not new.prompt_token_ids:
                continue
            tokens = list(new.prompt_token_ids)
            tracker = _SaveTracker(self._spans_for(new.req_id, tokens), list(new.block_ids[0]),
                                   tokens)
            self._trackers[new.req_id] = tracker
            self._plan_saves(new.req_id, tracker, new.num_computed_tokens + scheduled[new.req_id],
                             meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            if new_ids:
                meta.new_block_ids.extend(new_ids[0])
            tracker = self._trackers.get(req_id)
            if tracker is None:
                continue
            if req_id in cached.resumed_req_ids:
                tracker.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                tracker.block_ids.extend(new_ids[0])
            self._plan_saves(req_id, tracker, cached.num_computed_tokens[i] + scheduled[req_id],
                             meta)
        return meta

    def _plan_saves(self, req_id: str, tracker: _SaveTracker, computed: int,
                    meta: KVMoveConnectorMetadata) -> None:
        """Queue every prompt chunk fully computed once this step has run."""
        bs = self._block_size
        while tracker.next_chunk < len(tracker.spans):
            span = tracker.spans[tracker.next_chunk]
            if span.end > computed:
                return
            blocks = tracker.block_ids[span.start // bs: -(-span.end // bs)]
            named = None
            if self._block_hasher is not None:  # KV events: name its blocks as vLLM does
                named = self._block_hasher.chunk_blocks(tracker.tokens[span.start:span.end],
                                                        tracker.parent)
                tracker.parent = named.hashes[-1] if named.hashes else tracker.parent
            parent = tracker.spans[tracker.next_chunk - 1].key if tracker.next_chunk else None
            meta.saves.append(ChunkSave(span.key, span.num_tokens, blocks, named, parent))
            tracker.next_chunk += 1
        # Whole prompt planned: nothing more to track for this request.
        del self._trackers[req_id]
        self._spans.pop(req_id, None)

    def update_connector_output(self, connector_output: Any) -> None:
        """Scheduler, after each step: keep the workers' KV events (merged across
        tensor-parallel workers by vLLM) for :meth:`take_events`. Does not block."""
        events = getattr(connector_output, "kv_cache_events", None)
        if not isinstance(events, KVMoveKVEvents):
            return
        if self._engine_kv_events is None:
            self._engine_kv_events = events
        else:
            self._engine_kv_events.add_events(events.get_all_events())
            self._engine_kv_events.increment_workers(events.get_number_of_workers())

    def take_events(self) -> Iterable[KVCacheEvent]:
        """Scheduler, after each step: the host store's KV events for the engine's stream
        (``medium="CPU"``), those every tensor-parallel worker reported. An idle engine does
        not step: the sidecar's own socket (``kv_events_port``) publishes at once."""
        held, self._engine_kv_events = self._engine_kv_events, None
        if held is not None:
            yield from held.aggregate().get_all_events()

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Scheduler, when a request ends: forget its state. Returns ``(False, None)``: its
        blocks may be freed at once (saves were synchronous)."""
        rid = request.request_id
        self._trackers.pop(rid, None)
        self._spans.pop(rid, None)
        self._query.pop(rid, None)
        return False, None
