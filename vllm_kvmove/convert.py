"""Chunk conversion between compatible engines whose formats differ: block size, the attention
backend's packing inside a block, or tensor parallelism (the heads each rank holds).

Contract
--------
* Pure functions on tensors: no I/O, no vLLM import, no state. The sidecar's fetcher calls
  :func:`convert_chunk` on a worker thread, once it has read and verified the source's shards
  of a chunk; the controller calls :func:`conversion_obstacles` and :func:`source_ranks` to
  decide whether and how a move converts. Tests and benchmarks call them directly.
* Two engines need a conversion when their layouts share a fingerprint (the same KV: see
  :mod:`vllm_kvmove.layout`) but not a format, or their tensor-parallel degrees differ.
  Identical formats never come here: their chunks move byte for byte.
* Packings known (vLLM 0.32's CPU attention backend, which writes a block's slab per head as
  ``[K | V]``, each ``block_size * head_size`` elements; t = token in the block, d = dim):

  - ``vec`` (and ``vec16``, the same bytes): ``K[d][t]`` (transposed), ``V[t][d]``;
  - ``amx`` (``P = 4 / element bytes``): ``K[t//16][d//P][t%16][d%P]``,
    ``V[d//16][t//P][d%16][t%P]``.

  Checked against vLLM's own cache-write kernel in ``tests/unit/test_convert.py``. Any other
  backend converts to nothing but itself (a move then is refused, naming the field).
* Canonical form, in between: per chunk, K and V as ``[num_layers, heads, tokens, head_size]``
  elements (token-major, the heads a rank holds) — used only between packings. Within one
  packing a conversion is one strided copy per half: heads select whole head slabs, and a
  block size that divides the other regroups whole runs (for ``amx``, K's 16-token groups
  are whole; V's runs are a block's tokens for 16 dims; for ``vec``, a block's tokens for one
  dim of K, the whole block of V).
* Heads and ranks: rank ``r`` of an engine with tensor parallelism ``W`` over ``T`` KV heads
  holds heads ``[r*T//W, r*T//W + num_kv_heads)`` — a contiguous range, or one replicated head
  when ``W > T`` (vLLM's split).
* Lossless: elements are moved as integers of their width, never reinterpreted as floats.
* The planning functions (:func:`conversion_obstacles`, :func:`source_ranks`, ...) import no
  torch: the controller uses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from vllm_kvmove.layout import FORMAT_FIELDS, KVLayout

if TYPE_CHECKING:
    import torch

# The backends whose block packing this module can read and write.
PACKINGS = {"cpu_attn/vec": "vec", "cpu_attn/vec16": "vec", "cpu_attn/amx": "amx"}


def _int_dtype(nbytes: int) -> "torch.dtype":
    """The integer dtype elements of ``nbytes`` move as."""
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32}[nbytes]


def packing(layout: KVLayout) -> str | None:
    """The block packing of ``layout``'s backend, or None if not known here."""
    return PACKINGS.get(layout.backend)


def head_range(layout: KVLayout, world_size: int, rank: int) -> range:
    """The model's KV heads that ``rank`` of an engine of tensor parallelism ``world_size``
    holds (see the module docstring)."""
    first = rank * layout.total_kv_heads // world_size
    return range(first, first + layout.num_kv_heads)


def _split_problem(layout: KVLayout, world_size: int) -> str | None:
    expected = max(1, layout.total_kv_heads // world_size)
    if layout.num_kv_heads != expected or (
            layout.total_kv_heads >= world_size and layout.total_kv_heads % world_size):
        return (f"num_kv_heads {layout.num_kv_heads} per rank does not split "
                f"{layout.total_kv_heads} heads over {world_size} ranks")
    return None


def _packing_problem(layout: KVLayout) -> str | None:
    kind = packing(layout)
    if kind is None:
        return f"no conversion is known for backend {layout.backend!r}"
    if kind == "amx":
        width = 4 // layout.dtype_bytes
        if layout.block_size % 16 or layout.head_size % 16 or layout.head_size % width:
            return (f"block_size {layout.block_size} and head_size {layout.head_size} must be "
                    f"multiples of 16 for backend {layout.backend!r}")
    return None


def needs_conversion(src: KVLayout, src_world: int, dst: KVLayout, dst_world: int) -> bool:
    """Whether chunks of ``src`` (at tensor parallelism ``src_world``) must be converted to be
    ``dst``'s (at ``dst_world``), rank for rank."""
    return src_world != dst_world or not src.same_format(dst)


def conversion_obstacles(src: KVLayout, src_world: int, dst: KVLayout,
                         dst_world: int) -> list[str]:
    """Why chunks of ``src`` cannot be converted to ``dst`` (empty: they can, or need not be).
    Each entry names a field and its two values, then the reason. The layouts must share a
    fingerprint (the caller checks that first)."""
    if not needs_conversion(src, src_world, dst, dst_world):
        return []
    problems = [p for p in (_split_problem(src, src_world), _split_problem(dst, dst_world),
                            _packing_problem(src), _packing_problem(dst)) if p]
    if not problems:
        return []
    diffs = [f"{k}: {getattr(src, k)!r} != {getattr(dst, k)!r}" for k in FORMAT_FIELDS
             if getattr(src, k) != getattr(dst, k)]
    if src_world != dst_world:
        diffs.append(f"tensor_parallel_size: {src_world} != {dst_world}")
    return [f"{'; '.join(diffs)} ({'; '.join(dict.fromkeys(problems))})"]


def source_ranks(src: KVLayout, src_world: int, dst: KVLayout, dst_world: int,
                 dst_rank: int) -> list[int]:
    """The source ranks whose shards ``dst_rank`` needs (fewest, in rank order): for each head
    it holds, the first source rank holding that head."""
    needed = head_range(dst, dst_world, dst_rank)
    out: list[int] = []
    for head in needed:
        rank = next(r for r in range(src_world) if head in head_range(src, src_world, r))
        if rank not in out:
            out.append(rank)
    return sorted(out)


# -- packing ---------------------------------------------------------------------------------
def _halves(data: "torch.Tensor", layout: KVLayout,
            num_blocks: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A chunk's first ``num_blocks`` blocks as K and V slabs, ``[blocks, layers, heads,
    block_size * head_size]`` elements each (views)."""
    lay = layout
    x = data[:num_blocks * lay.block_bytes].view(_int_dtype(lay.dtype_bytes)).view(
        num_blocks, lay.num_layers, lay.num_kv_heads, 2, lay.block_size * lay.head_size)
    return x[:, :, :, 0], x[:, :, :, 1]


def unpack(data: torch.Tensor, layout: KVLayout, num_blocks: int,
           heads: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical K and V (``[layers, heads, num_blocks * block_size, head_size]``) of the
    ``heads`` (local indices) of a chunk's first ``num_blocks`` blocks, from ``data`` (its
    bytes, uint8) in ``layout``'s packing."""
    k, v = (h[:, :, heads] for h in _halves(data, layout, num_blocks))
    nb, layers, nh = k.shape[:3]
    bs, hs = layout.block_size, layout.head_size
    if packing(layout) == "vec":
        kc = k.reshape(nb, layers, nh, hs, bs).permute(1, 2, 0, 4, 3)
        vc = v.reshape(nb, layers, nh, bs, hs).permute(1, 2, 0, 3, 4)
    else:  # amx
        p = 4 // layout.dtype_bytes
        kc = k.reshape(nb, layers, nh, bs // 16, hs // p, 16, p).permute(1, 2, 0, 3, 5, 4, 6)
        vc = v.reshape(nb, layers, nh, hs // 16, bs // p, 16, p).permute(1, 2, 0, 4, 6, 3, 5)
    return kc.reshape(layers, nh, nb * bs, hs), vc.reshape(layers, nh, nb * bs, hs)


def pack(k: torch.Tensor, v: torch.Tensor, layout: KVLayout, out: torch.Tensor) -> None:
    """Write canonical ``k`` and ``v`` (``[layers, heads, tokens, head_size]``, tokens a
    multiple of the block size) into ``out`` (a chunk's bytes, uint8) in ``layout``'s packing."""
    layers, nh, tokens, hs = k.shape
    bs = layout.block_size
    nb = tokens // bs
    ko, vo = _halves(out, layout, nb)
    if packing(layout) == "vec":
        ko.view(nb, layers, nh, hs, bs).copy_(k.view(layers, nh, nb, bs, hs).permute(2, 0, 1, 4, 3))
        vo.view(nb, layers, nh, bs, hs).copy_(v.view(layers, nh, nb, bs, hs).permute(2, 0, 1, 3, 4))
    else:  # amx
        p = 4 // layout.dtype_bytes
        ko.view(nb, layers, nh, bs // 16, hs // p, 16, p).copy_(
            k.view(layers, nh, nb, bs // 16, 16, hs // p, p).permute(2, 0, 1, 3, 5, 4, 6))
        vo.view(nb, layers, nh, hs // 16, bs // p, 16, p).copy_(
            v.view(layers, nh, nb, bs // p, p, hs // 16, 16).permute(2, 0, 1, 5, 3, 6, 4))


# -- conversion ------------------------------------------------------------------------------
def convert_chunk(shards: Sequence[tuple[int, torch.Tensor]], src: KVLayout, src_world: int,
                  dst: KVLayout, dst_world: int, dst_rank: int, num_tokens: int,
                  out: torch.Tensor) -> None:
    """Write ``dst_rank``'s shard of a chunk of ``num_tokens`` tokens into ``out``, from
    source shards.

    Args:
        shards: ``(source rank, its valid bytes of the chunk as uint8)`` for every rank
            :func:`source_ranks` names (more are ignored).
        src, src_world: the source's layout and tensor parallelism.
        dst, dst_world, dst_rank: this rank's.
        num_tokens: tokens in the chunk.
        out: uint8, ``dst.valid_bytes(num_tokens)`` long: the destination slot's valid bytes.
    Raises:
        ValueError: a shard has the wrong size, or a head ``dst_rank`` holds is in no shard.
    """
    nb_src, nb_dst = src.blocks_for(num_tokens), dst.blocks_for(num_tokens)
    if out.numel() != dst.valid_bytes(num_tokens):
        raise ValueError(f"out has {out.numel()} bytes, the chunk {dst.valid_bytes(num_tokens)}")
    for rank, data in shards:
        if data.numel() != src.valid_bytes(num_tokens):
            raise ValueError(f"shard of rank {rank}: {data.numel()} bytes, expected "
                             f"{src.valid_bytes(num_tokens)}")
    wanted = head_range(dst, dst_world, dst_rank)
    # (source rank, its shard, source-local head slice, destination-local head slice)
    pieces = []
    for rank, data in shards:
        have = head_range(src, src_world, rank)
        lo, hi = max(have.start, wanted.start), min(have.stop, wanted.stop)
        if lo < hi and not any(p[3].start <= lo - wanted.start < p[3].stop for p in pieces):
            pieces.append((rank, data, slice(lo - have.start, hi - have.start),
                           slice(lo - wanted.start, hi - wanted.start)))
    covered = sum(p[3].stop - p[3].start for p in pieces)
    if covered != len(wanted):
        raise ValueError(f"the shards of ranks {[r for r, _ in shards]} do not hold every head "
                         f"of rank {dst_rank} ({wanted.start}..{wanted.stop - 1})")
    if packing(src) == packing(dst) and (dst.block_size % src.block_size == 0
                                         or src.block_size % dst.block_size == 0):
        # One packing: blocks regroup as runs of whole bytes, heads as slabs (one strided copy
        # per half, no canonical form).
        for _, data, s_heads, d_heads in pieces:
            for a, b in zip(_runs(data, src, nb_src, s_heads), _runs(out, dst, nb_dst, d_heads)):
                _regroup(a, b)
        return
    import torch

    tokens = nb_dst * dst.block_size
    shape = (dst.num_layers, dst.num_kv_heads, tokens, dst.head_size)
    k = torch.zeros(shape, dtype=_int_dtype(dst.dtype_bytes))
    v = torch.zeros(shape, dtype=_int_dtype(dst.dtype_bytes))
    for _, data, s_heads, d_heads in pieces:
        ks, vs = unpack(data, src, nb_src, s_heads)
        n = min(tokens, ks.shape[2])
        k[:, d_heads, :n] = ks[:, :, :n]
        v[:, d_heads, :n] = vs[:, :, :n]
    pack(k, v, dst, out)


# Per packing, how many runs each half of a head's block slab is cut into (K, V): a run holds
# the block's tokens for one slice of the dims, and the runs of consecutive blocks, one after
# the other, are the same elements whatever the block size (token groups of 16 for amx are
# whole inside a run, as blocks are multiples of 16).
_OUTER = {"amx": (lambda hs: 1, lambda hs: hs // 16), "vec": (lambda hs: hs, lambda hs: 1)}


def _runs(data: "torch.Tensor", layout: KVLayout, num_blocks: int,
          heads: slice) -> tuple["torch.Tensor", "torch.Tensor"]:
    """K and V of ``heads`` of a chunk's first ``num_blocks`` blocks as ``[blocks, layers,
    heads, runs, run]`` views."""
    k_outer, v_outer = (f(layout.head_size) for f in _OUTER[packing(layout)])
    k, v = _halves(data, layout, num_blocks)
    return (k[:, :, heads].unflatten(-1, (k_outer, -1)),
            v[:, :, heads].unflatten(-1, (v_outer, -1)))


def _regroup(a: "torch.Tensor", b: "torch.Tensor") -> None:
    """Copy the runs of ``a`` (``[blocks, layers, heads, runs, run]``) into ``b`` (the same
    with another block size: runs of another length), in token order; tokens ``b`` has past
    ``a``'s end are zeros."""
    import torch

    (nb_a, *mid, run_a), (nb_b, run_b) = a.shape, (b.shape[0], b.shape[-1])
    if run_b % run_a == 0:  # b's blocks are n of a's
        n = run_b // run_a
        if nb_a < nb_b * n:  # a partial chunk: a's missing blocks are zeros
            a = torch.cat([a, a.new_zeros((nb_b * n - nb_a, *mid, run_a))])
        b.unflatten(-1, (n, run_a)).copy_(
            a[:nb_b * n].unflatten(0, (nb_b, n)).permute(0, 2, 3, 4, 1, 5))
    else:  # a's blocks are n of b's
        n = run_a // run_b
        whole = b if nb_b == nb_a * n else b.new_empty((nb_a * n, *mid, run_b))
        whole.unflatten(0, (nb_a, n)).copy_(a.unflatten(-1, (n, run_b)).permute(0, 4, 1, 2, 3, 5))
        if whole is not b:
            b.copy_(whole[:nb_b])
