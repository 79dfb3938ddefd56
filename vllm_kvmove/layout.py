"""KV layout: how one engine's paged KV cache maps onto store chunks, and its fingerprint.

vLLM's CPU backend keeps, per attention layer, a tensor ``[num_blocks, kv_heads, block_size,
2*head_size]`` (K transposed inside a block slab, then V; the exact packing depends on the CPU
ISA). Instead of converting to a token-major layout, a chunk stores whole block slabs,
byte for byte, **block-major**::

    chunk = [blocks_per_chunk][num_layers][block slab bytes]

Block-major keeps the valid part of a partial chunk (its first ``ceil(n / block_size)``
blocks) one contiguous byte range, so a transfer of a partial chunk moves only valid bytes in
one descriptor. Byte-for-byte slabs make save and load plain memcpys.

Two engines' chunks are *compatible* when what the KV means is the same — model, dtype,
layers, head size, KV heads in total, chunk size, hash seed: the fingerprint covers exactly
these (:data:`COMPAT_FIELDS`) and chunk keys are salted with it (:mod:`vllm_kvmove.hashing`),
so compatible engines name a prefix's chunks alike. Their *format* — block size, the backend's
packing inside a block, the heads each tensor-parallel rank holds (:data:`FORMAT_FIELDS`) —
may differ: identical formats share bytes as they are, different ones are converted on the
way (:mod:`vllm_kvmove.convert`), or refused where no conversion is known.

:func:`block_bytes` views each layer's blocks as byte rows over their physical memory (any
order of the dims inside a block, any step between blocks), and :func:`block_copier` (host
memory: memmoves; other devices: :func:`block_index` and :func:`copy_blocks`) moves those rows
between the paged cache and a chunk with one copy of the bytes (the connector's save and
load) — on whatever device the cache lives. Nothing here
touches vLLM at import time; :func:`layout_from_vllm` imports it lazily.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

try:  # the optional C kernel (pyproject.toml: built where a C compiler is)
    from vllm_kvmove._copyhash import copy_runs as _copy_runs
except ImportError:
    _copy_runs = None

if TYPE_CHECKING:
    import torch

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
                "uint8": 1}


# What must match for two engines' chunks to mean the same KV (the fingerprint's fields).
COMPAT_FIELDS = ("model", "dtype", "num_layers", "head_size", "total_kv_heads", "chunk_size",
                 "hash_seed", "kind")
# What a token's cache entry in one layer is (KVLayout.kind).
KINDS = ("kv", "mla")
# How the bytes are laid out: may differ between compatible engines (then converted).
FORMAT_FIELDS = ("block_size", "backend", "num_kv_heads")


@dataclass(frozen=True)
class KVLayout:
    """An engine's KV chunks: what they mean (:data:`COMPAT_FIELDS`) and how their bytes are
    laid out (:data:`FORMAT_FIELDS`), per tensor-parallel rank.

    Attributes:
        model: model identity (vLLM's ``model_config.model``).
        dtype: KV cache element type name, e.g. ``"bfloat16"``.
        num_layers: attention layers holding KV.
        num_kv_heads: KV heads per layer in one rank's store (per worker).
        head_size: elements per head.
        block_size: tokens per paged-cache block.
        chunk_size: tokens per store chunk (a multiple of ``block_size``).
        backend: attention backend and its slab packing, e.g. ``"cpu_attn/vec"``.
        hash_seed: user salt; engines with different seeds never share keys.
        total_kv_heads: KV heads per layer of the model (all ranks together); 0 (default):
            ``num_kv_heads`` (no tensor parallelism). A rank of an engine whose degree exceeds
            the model's KV heads holds a replica of one head.
        kind: what a token's entry in one layer's cache is: ``"kv"`` (default) a key and a
            value of ``head_size`` elements per KV head; ``"mla"`` one latent vector of
            ``head_size`` elements (multi-head latent attention, e.g. DeepSeek-V2/V3: the
            compressed KV and its rotary part, one "head", the same on every
            tensor-parallel rank).
    """

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    chunk_size: int
    backend: str
    hash_seed: str = ""
    total_kv_heads: int = 0
    kind: str = "kv"

    def __post_init__(self) -> None:
        # A layout may come off the wire (a registration, a fetch): every field is checked.
        for name in ("num_layers", "num_kv_heads", "head_size", "block_size", "chunk_size"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if type(self.total_kv_heads) is not int or self.total_kv_heads < 0:
            raise ValueError(f"total_kv_heads must be a non-negative integer, got "
                             f"{self.total_kv_heads!r}")
        for name in ("model", "dtype", "backend", "hash_seed"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        if self.kind not in KINDS:
            raise ValueError(f"unknown KV cache kind {self.kind!r} (known: {', '.join(KINDS)})")
        if self.dtype not in _DTYPE_BYTES:
            raise ValueError(f"unknown KV dtype {self.dtype!r} (known: {sorted(_DTYPE_BYTES)})")
        if self.chunk_size % self.block_size:
            raise ValueError(
                f"chunk_size {self.chunk_size} must be a multiple of the engine's KV block size "
                f"{self.block_size}")
        if not self.total_kv_heads:
            object.__setattr__(self, "total_kv_heads", self.num_kv_heads)

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // self.block_size

    @property
    def block_slab_bytes(self) -> int:
        """Bytes of one layer's slab of one block: ``kv_heads * block_size * 2 * head_size``
        elements (a key and a value per head), ``block_size * head_size`` for MLA."""
        per_token = (2 if self.kind == "kv" else 1) * self.head_size
        return self.num_kv_heads * self.block_size * per_token * _DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers (one row of the block-major chunk)."""
        return self.num_layers * self.block_slab_bytes

    @property
    def chunk_bytes(self) -> int:
        return self.blocks_per_chunk * self.block_bytes

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens of one chunk."""
        return -(-num_tokens // self.block_size)

    def valid_bytes(self, num_tokens: int) -> int:
        """Bytes of a chunk of ``num_tokens`` tokens that carry data (a contiguous prefix)."""
        return self.blocks_for(num_tokens) * self.block_bytes

    def fingerprint(self) -> str:
        """Stable hex digest of :data:`COMPAT_FIELDS`: equal fingerprints mean chunks of the
        same KV under the same keys (their bytes may still need converting between formats)."""
        fields = {k: getattr(self, k) for k in COMPAT_FIELDS}
        if self.kind == "kv":  # as before the field existed: a fleet upgraded engine by
            del fields["kind"]  # engine keeps its fingerprints, and so its chunk keys
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def same_format(self, other: "KVLayout") -> bool:
        """Whether chunks of ``other`` are byte for byte this layout's (no conversion)."""
        return all(getattr(self, k) == getattr(other, k) for k in FORMAT_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, other: "KVLayout") -> list[str]:
        """Names and values of the fields that differ from ``other`` (empty if compatible)."""
        return layout_mismatch(self.to_dict(), other.to_dict())


def layout_mismatch(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """``"field: mine != theirs"`` for every field of two layouts (as :meth:`KVLayout.to_dict`
    gives them, e.g. from two registrations) that differs, in field-name order."""
    return [f"{k}: {mine.get(k)!r} != {theirs.get(k)!r}" for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)]


def _cpu_backend_name(dtype: "torch.dtype", block_size: int, head_size: int) -> str:
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        return "cpu_attn/" + _get_attn_isa(dtype, block_size, head_size)
    except Exception:  # noqa: BLE001 - any other platform: name it by device only
        return "unknown"


def _mla_backend_name() -> str:
    """An MLA cache's backend: ``"cpu_mla"`` on the CPU (vLLM's CPU MLA: each block's latent
    vectors token after token), ``"mla"`` elsewhere."""
    try:
        from vllm.platforms import current_platform

        return "cpu_mla" if current_platform.is_cpu() else "mla"
    except Exception:  # noqa: BLE001 - no vLLM platform: name it by kind only
        return "mla"


def layout_from_vllm(vllm_config: Any, kv_cache_config: Any, chunk_size: int,
                     hash_seed: str = "") -> KVLayout:
    """Describe the KV layout of the engine configured by ``vllm_config``.

    Works in the scheduler and in the worker process alike (it reads configs only), so both
    compute the same fingerprint and the same chunk keys. The worker later checks the real
    tensors against it with :func:`check_kv_caches`.
    """
    import torch

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"vllm-kvmove supports one KV cache group, this model has {len(groups)}")
    spec = groups[0].kv_cache_spec
    dtype = spec.dtype if isinstance(spec.dtype, torch.dtype) else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    mla = bool(getattr(vllm_config.model_config, "use_mla", False))
    return KVLayout(
        model=str(vllm_config.model_config.model),
        dtype=dtype_name,
        num_layers=len(groups[0].layer_names),
        num_kv_heads=int(spec.num_kv_heads),
        # MLA: one latent "head" whatever the model's attention heads, replicated per rank.
        total_kv_heads=1 if mla else int(vllm_config.model_config.get_total_num_kv_heads()),
        head_size=int(spec.head_size),
        block_size=int(spec.block_size),
        chunk_size=int(chunk_size),
        backend=(_mla_backend_name() if mla else
                 _cpu_backend_name(dtype, int(spec.block_size), int(spec.head_size))),
        hash_seed=hash_seed,
        kind="mla" if mla else "kv",
    )


def layer_order(kv_cache_config: Any) -> list[str]:
    """Layer names in the order their slabs appear inside a chunk row."""
    return list(kv_cache_config.kv_cache_groups[0].layer_names)


def check_kv_caches(layout: KVLayout, kv_caches: Sequence["torch.Tensor"]) -> None:
    """Raise ValueError unless every per-layer tensor has the block slab size the layout
    assumes, with each block's bytes one contiguous range (:func:`block_bytes`)."""
    if len(kv_caches) != layout.num_layers:
        raise ValueError(f"expected {layout.num_layers} KV layers, got {len(kv_caches)}")
    for t in kv_caches:
        slab = t[0].numel() * t.element_size()
        if slab != layout.block_slab_bytes:
            raise ValueError(
                f"KV cache tensor {tuple(t.shape)} {t.dtype} does not match the layout "
                f"({layout.block_slab_bytes} bytes per block slab)")
        block_bytes(t)  # raises if a block's bytes are not one range


def _dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether elements of this shape and these strides fill one gap-free range (in some
    order of the dims)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(strides, shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def block_bytes(t: "torch.Tensor") -> "torch.Tensor":
    """A per-layer KV tensor (dim 0: blocks) as ``uint8[num_blocks, slab_bytes]`` over the
    same memory, on the same device — whatever the order of the dims inside a block (vLLM's
    LBHNC or LBNHC: the view's dims may be permuted) and whatever the step between blocks
    (``stride(0)``: layers may share one buffer and step over each other's slabs). A chunk
    copy of these rows moves each block's physical bytes as they are.

    Raises:
        ValueError: a block's bytes are not one contiguous range, a stride is negative, or
            blocks overlap.
    """
    import torch

    es = t.element_size()
    inner_shape, inner_strides = t.shape[1:], t.stride()[1:]
    slab = t[0].numel() * es
    if any(st < 0 for st in t.stride()) or not _dense(inner_shape, inner_strides):
        raise ValueError(f"KV cache tensor {tuple(t.shape)} strides {t.stride()}: a block's "
                         f"bytes are not one contiguous range")
    if t.shape[0] > 1 and t.stride(0) * es < slab:
        raise ValueError(f"KV cache tensor {tuple(t.shape)} strides {t.stride()}: blocks overlap")
    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
    return raw.as_strided((t.shape[0], slab), (t.stride(0) * es, 1), t.storage_offset() * es)


def block_index(ids: list[int]) -> slice | torch.Tensor:
    """Block ids as a slice when they are consecutive (the common case: a view, no gather),
    else as an index tensor."""
    if ids and ids[-1] - ids[0] == len(ids) - 1 and all(b - a == 1 for a, b in zip(ids, ids[1:])):
        return slice(ids[0], ids[-1] + 1)
    import torch

    return torch.tensor(ids, dtype=torch.long)


def block_copier(dst: "torch.Tensor", dst_ids: Sequence[int], src: "torch.Tensor",
                 src_ids: Sequence[int], non_blocking: bool = False) -> Callable[[], None]:
    """A zero-argument callable that does ``dst[dst_ids[i]] = src[src_ids[i]]`` for every i,
    over byte rows (:func:`block_bytes` rows, store slot views), bound now and run later (a
    :class:`~vllm_kvmove.loader.CopyPiece`, or at once): :func:`block_copiers` in one piece."""
    copiers = block_copiers(dst, dst_ids, src, src_ids, non_blocking=non_blocking)
    return copiers[0] if copiers else _nothing


def block_copiers(dst: "torch.Tensor", dst_ids: Sequence[int], src: "torch.Tensor",
                  src_ids: Sequence[int], piece_bytes: int = 0,
                  non_blocking: bool = False) -> list[Callable[[], None]]:
    """Zero-argument callables that together do ``dst[dst_ids[i]] = src[src_ids[i]]`` for
    every i, over byte rows (:func:`block_bytes` rows, store pool rows), bound now and run
    later, in any order or on any threads (the rows they write are distinct).

    Host tensors: one copy per run of rows adjacent on both sides, a callable's runs in one
    call of the C kernel (``vllm_kvmove._copyhash.copy_runs``: the GIL released once, runs of
    64 KiB and more stored non-temporally), else one ``ctypes.memmove`` per run; the runs are
    cut into callables of about ``piece_bytes`` each (0: one callable), so that several
    threads can share them. Measured here for 512 KiB rows, one thread: 4.8 GB/s for
    :func:`copy_blocks`' gather-then-scatter (a temporary, then a second copy), 7.4-7.8 with
    memmove, 11.7 with non-temporal stores; with a second thread copying alongside (the
    connector's layer-wise loads) 14 and 22. Row indices are checked against both tensors'
    row counts here, since raw copies have no bounds of their own. Other devices: one
    callable of :func:`copy_blocks` (``non_blocking``: queued on the current stream without
    waiting for it, for a side stream's saves; see :func:`copy_blocks`).

    The tensors must outlive the callables (the paged cache and the store pool live as long
    as the engine; the caller holds the chunks while a copy may run).

    Raises:
        IndexError: a row index out of range; ValueError: rows of different sizes, or a
            row that is not one contiguous range.
    """
    if len(dst_ids) != len(src_ids):
        raise ValueError(f"{len(dst_ids)} destination rows for {len(src_ids)} source rows")
    if not dst_ids:
        return []
    if dst.device.type != "cpu" or src.device.type != "cpu":
        dst_idx, src_idx = block_index(list(dst_ids)), block_index(list(src_ids))
        return [partial(copy_blocks, dst, dst_idx, src, src_idx, non_blocking)]
    row = dst.shape[1] * dst.element_size()
    if src.shape[1] * src.element_size() != row or dst.stride(1) != 1 or src.stride(1) != 1:
        raise ValueError("block copies move whole contiguous byte rows of one size")
    for ids, t in ((dst_ids, dst), (src_ids, src)):
        bad = [i for i in ids if not 0 <= i < t.shape[0]]
        if bad:
            raise IndexError(f"row {bad[0]} out of range for {t.shape[0]} rows")
    d0, ds = dst.data_ptr(), dst.stride(0) * dst.element_size()
    s0, ss = src.data_ptr(), src.stride(0) * src.element_size()
    pieces: list[list[int]] = [[]]  # flat (dst, src, n) triples per callable
    size = 0
    for d, s in zip(dst_ids, src_ids):
        da, sa = d0 + d * ds, s0 + s * ss
        run = pieces[-1]
        if run and run[-3] + run[-1] == da and run[-2] + run[-1] == sa:
            run[-1] += row
        else:
            if piece_bytes and size >= piece_bytes:
                pieces.append([])
                size = 0
            pieces[-1] += (da, sa, row)
        size += row
    if _copy_runs is not None:
        return [partial(_copy_runs, array.array("Q", p).tobytes()) for p in pieces]
    return [partial(_memmove_runs, p) for p in pieces]


def _memmove_runs(runs: list[int]) -> None:
    for i in range(0, len(runs), 3):
        ctypes.memmove(runs[i], runs[i + 1], runs[i + 2])


def _nothing() -> None:
    return None


def copy_blocks(dst: torch.Tensor, dst_idx: slice | torch.Tensor,
                src: torch.Tensor, src_idx: slice | torch.Tensor,
                non_blocking: bool = False) -> None:
    """``dst[dst_idx] = src[src_idx]`` along dim 0 (byte rows, as :func:`block_bytes` and the
    store's slot views give them), copying the bytes once where both sides are on one device.

    Rows are copied as 8-byte words when their size and alignment allow: PyTorch gathers and
    scatters one-byte elements one at a time (measured here: a gather of 64 KiB rows at 0.4 GB/s
    as uint8, 57 GB/s as int64), and vLLM's block ids are often not consecutive. A gather into
    a slice writes in place (``index_select(out=)``); across devices the gather runs on the
    source's device and the result is copied once more.

    ``non_blocking``: device copies are queued on the current stream and not waited for (a
    side stream's device-to-host saves into page-locked memory); the caller learns of their
    end from an event. A scatter into host rows from a device waits all the same: the host
    scatter must read the copied rows.
    """
    import torch

    dst, src = _words(dst, src)
    nb = non_blocking
    if isinstance(dst_idx, slice):
        out = dst[dst_idx]
        if isinstance(src_idx, slice):
            out.copy_(src[src_idx], non_blocking=nb)
        elif out.device == src.device:
            torch.index_select(src, 0, src_idx.to(src.device, non_blocking=nb), out=out)
        else:
            out.copy_(src.index_select(0, src_idx.to(src.device, non_blocking=nb)),
                      non_blocking=nb)
    else:
        nb = nb and dst.device.type != "cpu"
        rows = (src[src_idx] if src.device == dst.device
                else src[src_idx].to(dst.device, non_blocking=nb))
        dst.index_copy_(0, dst_idx.to(dst.device, non_blocking=nb), rows)


def _words(*rows: "torch.Tensor") -> tuple["torch.Tensor", ...]:
    """The byte-row tensors as int64 rows when every one's row size, strides and address are
    multiples of 8 (else unchanged)."""
    import torch

    if all(t.dtype == torch.uint8 and t.dim() == 2 and t.shape[1] % 8 == 0
           and t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 8 == 0
           for t in rows):
        return tuple(t.view(torch.int64) for t in rows)
    return rows
