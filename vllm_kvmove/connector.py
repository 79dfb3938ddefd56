"""KVMoveConnector: vLLM KV connector that writes prompt KV through to a host-memory store
and loads matching prefixes back, and starts the engine's vllm-kvmove sidecar.

Contract (who calls what, from which process)
---------------------------------------------
vLLM builds this class twice per engine:

* **Worker role** (worker process, first, during KV cache set-up). ``register_kv_caches``
  creates the :class:`~vllm_kvmove.store.ChunkStore` (one host pool), the
  :class:`~vllm_kvmove.lookup.LookupServer`, and starts the sidecar — the connector's one tie to
  the control plane. Per step, on the forward thread:
    - ``start_load_kv`` (before the forward, since loads are synchronous): copies the planned
      chunk blocks from the store into the paged cache. A chunk that vanished since the
      scheduler's lookup is reported by ``get_block_ids_with_load_errors`` so vLLM recomputes
      those blocks instead of reading garbage.
    - ``wait_for_save`` (after the forward): copies every prompt chunk completed by this step
      from the paged cache into the store (block slabs, memcpy only; checksums are computed
      later, off this path, when a chunk is first pinned for a transfer).
  ``wait_for_layer_load`` and ``save_kv_layer`` do nothing: whole-step copies are cheaper on
  CPU than per-layer ones.
* **Scheduler role** (EngineCore process). ``get_num_new_matched_tokens`` computes chunk keys
  for the prompt (cached per request) and asks the worker's store over the lookup channel how
  many leading chunks it holds; it answers at most ``prompt_len - 1`` tokens (vLLM always
  computes the last prompt token), counted from the block-aligned local hit. It has no side
  effect other than remembering the answer for ``update_state_after_alloc``, which turns it
  into a block-level load plan. ``build_connector_meta`` hands the step's loads and saves
  to the worker and tracks, per running request, which prompt chunks are complete.

Chunks are ``chunk_size`` tokens (a multiple of the block size); the last chunk of a prompt may
be partial and is stored too, so even a 12-token prompt is saved and can be moved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from vllm_kvmove.config import load_config
from vllm_kvmove.hashing import ChunkSpan, chunk_spans
from vllm_kvmove.layout import block_index, check_kv_caches, copy_blocks, layer_order, layout_from_vllm
from vllm_kvmove.lookup import LookupClient, LookupServer, lookup_path
from vllm_kvmove.store import ChunkMissing, ChunkStore, StoreFull

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("vllm_kvmove.connector")


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
    """

    key: bytes
    blocks: list[tuple[int, int]]


@dataclass
class ChunkSave:
    """Copy one completed prompt chunk from the paged cache into the store.

    Attributes:
        key: chunk key.
        num_tokens: tokens in the chunk (``<= chunk_size``; less for a prompt's tail).
        block_ids: paged-cache block ids holding the chunk, in order.
    """

    key: bytes
    num_tokens: int
    block_ids: list[int]


@dataclass
class KVMoveConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker plan for one step."""

    loads: list[ChunkLoad] = field(default_factory=list)
    saves: list[ChunkSave] = field(default_factory=list)


@dataclass
class _SaveTracker:
    spans: list[ChunkSpan]
    block_ids: list[int]
    next_chunk: int = 0


class KVMoveConnector(KVConnectorBase_V1):
    """See the module docstring for the contract."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_like_vllm()
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = load_config(extra)
        self.layout = layout_from_vllm(vllm_config, kv_cache_config, self.config.chunk_size,
                                       self.config.hash_seed)
        self.fingerprint = self.layout.fingerprint()
        self._block_size = self.layout.block_size
        self._endpoint = lookup_path(self.config.instance_id)
        # scheduler-side state
        self._lookup: LookupClient | None = None
        self._spans: dict[str, list[ChunkSpan]] = {}
        self._query: dict[str, tuple[int, int]] = {}
        self._pending_loads: list[ChunkLoad] = []
        self._trackers: dict[str, _SaveTracker] = {}
        # worker-side state
        self.store: ChunkStore | None = None
        self._layers: list[torch.Tensor] = []
        self._lookup_server: LookupServer | None = None
        self._sidecar: Any = None
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            self._lookup = LookupClient(self._endpoint)
        logger.info("KVMoveConnector %s role=%s layout=%s fingerprint=%s", self.config.instance_id,
                    role.name, self.layout, self.fingerprint)
        if role == KVConnectorRole.WORKER:  # once per engine, not once per process
            for note in self.config.notes:
                logger.info("config: %s", note)

    # ======================================================================================
    # Worker side
    # ======================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = [kv_caches[name] for name in layer_order(self._kv_cache_config)]
        check_kv_caches(self.layout, layers)
        # Byte views [num_blocks, block_slab_bytes]: chunk copies are dtype-agnostic memcpys.
        self._layers = [t.view(torch.uint8).view(t.shape[0], -1) for t in layers]
        self.store = ChunkStore(self.layout, self.config.capacity_bytes,
                                shared=self.config.same_host_copy)
        self._lookup_server = LookupServer(self.store, self._endpoint)
        logger.info("kvmove store: %d slots of %d bytes (%d tokens each)", self.store.num_slots,
                    self.store.slot_bytes, self.layout.chunk_size)
        from sidecar.runtime import start_sidecar  # the one tie to the control plane

        self._sidecar = start_sidecar(self.config, self.store, self.layout)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVMoveConnectorMetadata)
        store = self.store
        assert store is not None
        for load in meta.loads:
            try:
                store.pin([load.key], checksums=False)
            except ChunkMissing:
                logger.warning("chunk %s vanished before its load; vLLM will recompute it",
                               load.key.hex())
                self._load_errors.update(dst for _, dst in load.blocks)
                continue
            try:
                found = store.entry_slot(load.key)
                assert found is not None  # pinned chunks cannot go away
                view = store.slot_view(found[0])
                src = block_index([w for w, _ in load.blocks])
                dst = block_index([d for _, d in load.blocks])
                for li, kv in enumerate(self._layers):
                    copy_blocks(kv, dst, view[:, li], src)
            finally:
                store.unpin([load.key])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVMoveConnectorMetadata)
        store = self.store
        assert store is not None
        for save in meta.saves:
            try:
                slot = store.reserve(save.key, save.num_tokens)
            except StoreFull as e:
                logger.warning("not saving chunk %s: %s", save.key.hex(), e)
                continue
            if slot is None:  # already held (loaded, moved in, or saved by another request)
                continue
            try:
                view = store.slot_view(slot)
                ids = block_index(save.block_ids)
                n = len(save.block_ids)
                for li, kv in enumerate(self._layers):
                    copy_blocks(view[:, li], slice(0, n), kv, ids)
            except BaseException:
                store.abort(save.key)
                raise
            store.commit(save.key)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if self._sidecar is not None:
            self._sidecar.stop()
            self._sidecar = None
        if self._lookup_server is not None:
            self._lookup_server.close()
            self._lookup_server = None
        if self._lookup is not None:
            self._lookup.close()

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
        tokens = request.prompt_token_ids
        if not tokens or len(tokens) < 2 or self._lookup is None:
            return 0, False
        spans = self._spans_for(request.request_id, list(tokens))
        held = self._lookup.match_prefix([s.key for s in spans])
        matched = spans[held - 1].end if held else 0
        external = min(matched, len(tokens) - 1) - num_computed_tokens
        if external <= 0:
            return 0, False
        self._query[request.request_id] = (num_computed_tokens, external)
        return external, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
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
        self._pending_loads.extend(by_chunk.values())

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KVMoveConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            if not new.prompt_token_ids:
                continue
            tracker = _SaveTracker(self._spans_for(new.req_id, list(new.prompt_token_ids)),
                                   list(new.block_ids[0]))
            self._trackers[new.req_id] = tracker
            self._plan_saves(new.req_id, tracker, new.num_computed_tokens + scheduled[new.req_id],
                             meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracker = self._trackers.get(req_id)
            if tracker is None:
                continue
            new_ids = cached.new_block_ids[i]
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
            meta.saves.append(ChunkSave(span.key, span.num_tokens, blocks))
            tracker.next_chunk += 1
        # Whole prompt planned: nothing more to track for this request.
        del self._trackers[req_id]
        self._spans.pop(req_id, None)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self._trackers.pop(rid, None)
        self._spans.pop(rid, None)
        self._query.pop(rid, None)
        return False, None
