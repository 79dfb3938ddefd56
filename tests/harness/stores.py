"""Stores as tests fill them: tiny layouts, chunks of seeded random bytes, synthetic KV."""

from __future__ import annotations

import torch

from vllm_kvmove.blockhash import ChunkBlocks
from vllm_kvmove.hashing import chunk_spans
from vllm_kvmove.layout import KVLayout
from vllm_kvmove.store import ChunkStore


def tiny_layout(**over) -> KVLayout:
    """A KV layout small enough for unit tests: 32-token chunks of 2 blocks, 2 layers."""
    fields = dict(model="tiny", dtype="bfloat16", num_layers=2, num_kv_heads=1, head_size=8,
                  block_size=16, chunk_size=32, backend="test")
    fields.update(over)
    return KVLayout(**fields)


# An engine-sized layout (64 KiB of KV per token, 16 MiB chunks) and 1 GiB of its tokens (64
# chunks): the synthetic KV standalone sidecars hold in the fault-injection tests.
BIG_LAYOUT = tiny_layout(model="big-kv", num_layers=16, num_kv_heads=8, head_size=128,
                         block_size=128, chunk_size=256)
GIB_TOKENS = list(range(1, 1 + 64 * 256))


def put_bytes(store: ChunkStore, key: bytes, num_tokens: int, data: torch.Tensor,
              parent: bytes | None = None) -> bytes:
    """Store a chunk whose valid bytes are ``data`` (uint8), after ``parent`` in its prompt;
    return them."""
    slot = store.reserve(key, num_tokens)
    assert slot is not None and data.numel() == store.layout.valid_bytes(num_tokens)
    start = slot * store.slot_bytes
    store.pool[start:start + data.numel()].copy_(data)
    store.commit(key, parent=parent)
    return data.numpy().tobytes()


def fill_named(sidecar, tokens: list[int], hasher, seed: int = 0) -> list[ChunkBlocks]:
    """:func:`fill`, each chunk committed with its vLLM blocks named by ``hasher`` (as the
    connector saves with KV events on); returns them, chunk by chunk."""
    spans = chunk_spans(tokens, sidecar.layout.chunk_size, sidecar.fingerprint)
    named = hasher.prompt_blocks(tokens, sidecar.layout.chunk_size)
    g = torch.Generator().manual_seed(seed)
    for i, (span, blocks) in enumerate(zip(spans, named)):
        slot = sidecar.store.reserve(span.key, span.num_tokens)
        n = sidecar.layout.valid_bytes(span.num_tokens)
        start = slot * sidecar.store.slot_bytes
        sidecar.store.pool[start:start + n].copy_(
            torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g))
        sidecar.store.commit(span.key, blocks=blocks, parent=_parent(spans, i))
    return named


def _parent(spans, i: int) -> bytes | None:
    """The key of the chunk before ``spans[i]`` in its prompt (as the connector commits it)."""
    return spans[i - 1].key if i else None


def put_chunk(store: ChunkStore, key: bytes, num_tokens: int, seed: int,
              parent: bytes | None = None) -> bytes:
    """Write a chunk of seeded random bytes into ``store``; return its valid bytes."""
    g = torch.Generator().manual_seed(seed)
    n = store.layout.valid_bytes(num_tokens)
    return put_bytes(store, key, num_tokens, torch.randint(0, 256, (n,), dtype=torch.uint8,
                                                            generator=g), parent)


def packed_chunk(layout: KVLayout, world_size: int, rank: int, k: torch.Tensor,
                 v: torch.Tensor, first: int, num_tokens: int) -> torch.Tensor:
    """The valid bytes of a chunk as rank ``rank`` of an engine of ``layout`` (tensor
    parallelism ``world_size``) holds it, in its backend's packing
    (:func:`vllm_kvmove.convert.pack`, checked against vLLM's kernel in
    ``tests/unit/test_convert.py``): tokens ``first .. first + num_tokens`` of canonical ``k``,
    ``v`` (``[layers, all heads, tokens, head_size]``, integers of the element's width); the
    rest of its last block is zeros, as in a fresh cache."""
    from vllm_kvmove.convert import head_range, pack

    heads = head_range(layout, world_size, rank)
    tokens = layout.blocks_for(num_tokens) * layout.block_size
    kc = torch.zeros(k.shape[0], len(heads), tokens, k.shape[3], dtype=k.dtype)
    vc = torch.zeros_like(kc)
    kc[:, :, :num_tokens] = k[:, heads.start:heads.stop, first:first + num_tokens]
    vc[:, :, :num_tokens] = v[:, heads.start:heads.stop, first:first + num_tokens]
    out = torch.empty(layout.valid_bytes(num_tokens), dtype=torch.uint8)
    pack(kc, vc, layout, out)
    return out


def keys_of(sidecar, tokens: list[int]) -> list[bytes]:
    """The chunk keys ``tokens`` make at ``sidecar`` (its chunk size and fingerprint)."""
    return [s.key for s in chunk_spans(tokens, sidecar.layout.chunk_size, sidecar.fingerprint)]


def fill(sidecar, tokens: list[int], seed: int = 0) -> dict[bytes, bytes]:
    """Store every chunk of ``tokens`` in the sidecar's store, as the connector would (a chunk
    it holds already, from a prompt with the same prefix, is kept); returns each chunk's bytes
    by key."""
    spans = chunk_spans(tokens, sidecar.layout.chunk_size, sidecar.fingerprint)
    return {s.key: chunk_bytes(sidecar, s.key) if sidecar.store.contains(s.key) else
            put_chunk(sidecar.store, s.key, s.num_tokens, seed + i, _parent(spans, i))
            for i, s in enumerate(spans)}


def chunk_bytes(sidecar, key: bytes) -> bytes:
    """A chunk's valid bytes in the sidecar's store (held while read)."""
    (info,) = sidecar.store.hold([key], checksums=False)
    try:
        return sidecar.store.pool[info.offset:info.offset + info.nbytes].numpy().tobytes()
    finally:
        sidecar.store.release([key])


_TILE = 1 << 16


def synthetic_chunk(layout: KVLayout, num_tokens: int, seed: int) -> torch.Tensor:
    """The valid bytes of a synthetic chunk (uint8), a pure function of its arguments: a seeded
    random 64 KiB tile, repeated (cheap enough to fill GiBs; distinct per seed)."""
    n = layout.valid_bytes(num_tokens)
    g = torch.Generator().manual_seed(seed)
    tile = torch.randint(0, 256, (min(n, _TILE),), dtype=torch.uint8, generator=g)
    return tile.repeat(-(-n // tile.numel()))[:n]


def fill_synthetic(store: ChunkStore, fingerprint: str, seed: int, tokens: list[int]) -> list[bytes]:
    """Store every chunk of ``tokens`` (chunk i gets ``synthetic_chunk(..., seed + i)``)."""
    keys = []
    spans = chunk_spans(tokens, store.layout.chunk_size, fingerprint)
    for i, span in enumerate(spans):
        slot = store.reserve(span.key, span.num_tokens)
        if slot is not None:
            data = synthetic_chunk(store.layout, span.num_tokens, seed + i)
            start = slot * store.slot_bytes
            store.pool[start:start + data.numel()].copy_(data)
            store.commit(span.key, parent=_parent(spans, i))
        keys.append(span.key)
    return keys
