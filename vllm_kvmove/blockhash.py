"""vLLM's prefix-cache block hashes, computed without vLLM: what KV events name blocks by.

vLLM names each full block of a prompt by a chained hash (``vllm/v1/core/kv_cache_utils.py``,
``hash_block_tokens``): block i's hash is ``H((hash of block i-1, tuple(its token ids),
extra keys))``, block 0's parent being ``NONE_HASH = H(seed)``. ``H`` is the engine's
``--prefix-caching-hash-algo`` (``sha256``: SHA-256 of the pickled tuple, the default;
``sha256_cbor``: of its canonical CBOR); the seed is ``PYTHONHASHSEED`` when set, else the
fixed ``"vllm-none-hash"``. Two engines configured alike therefore name the same blocks
alike — which is what lets a router match a prompt against any engine's events — and so does
this module, in the scheduler, a sidecar or the controller (checked against vLLM's own
function in ``tests/unit/test_blockhash.py``).

Contract
--------
* Pure functions, no vLLM import (cbor2, a vLLM dependency, only for ``sha256_cbor``).
* Only plain text prompts: blocks carrying LoRA, multimodal or cache-salt extra keys hash
  differently, and are not produced here.
* The ``xxhash`` algorithms seed ``NONE_HASH`` randomly per process unless ``PYTHONHASHSEED`` is
  set: such an engine's hashes cannot be reproduced, and :func:`hasher_for` says so (None).
* Events carry hashes as vLLM does by default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``): the
  low 64 bits of the big-endian digest, as an int (:func:`external`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from typing import Any, Sequence

DEFAULT_SEED = "vllm-none-hash"  # vLLM's DEFAULT_NONE_HASH_SEED
ALGOS = ("sha256", "sha256_cbor")


def _digest(algo: str, value: Any) -> bytes:
    if algo == "sha256":
        return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    if algo == "sha256_cbor":
        import cbor2

        return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()
    raise ValueError(f"block hash algorithm {algo!r} cannot be reproduced (known: {ALGOS})")


@dataclass(frozen=True)
class BlockHasher:
    """An engine's block hashing.

    Attributes:
        algo: ``--prefix-caching-hash-algo`` (one of :data:`ALGOS`).
        seed: what ``NONE_HASH`` is derived from.
        block_size: tokens per block.
    """

    algo: str
    seed: str
    block_size: int

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"block hash algorithm {self.algo!r} (known: {ALGOS})")
        if type(self.block_size) is not int or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")

    @property
    def none_hash(self) -> bytes:
        return _digest(self.algo, self.seed)

    def chain(self, tokens: Sequence[int], parent: bytes | None = None) -> list[bytes]:
        """The hashes of the full blocks of ``tokens``, which follow the block hashed
        ``parent`` (None: they start the prompt)."""
        out: list[bytes] = []
        prev = parent if parent else self.none_hash
        bs = self.block_size
        for i in range(0, len(tokens) - bs + 1, bs):
            prev = _digest(self.algo, (prev, tuple(tokens[i:i + bs]), None))
            out.append(prev)
        return out

    def chunk_blocks(self, tokens: Sequence[int], parent: bytes | None) -> "ChunkBlocks":
        """The full blocks of a chunk whose tokens are ``tokens`` (a whole number of blocks
        from the chunk's start; a partial last block is left out), following the block hashed
        ``parent``."""
        full = len(tokens) - len(tokens) % self.block_size
        return ChunkBlocks(parent, tuple(self.chain(tokens[:full], parent)),
                           tuple(tokens[:full]), self.block_size)

    def prompt_blocks(self, tokens: Sequence[int], chunk_size: int) -> list["ChunkBlocks"]:
        """:meth:`chunk_blocks` of every chunk of a prompt (chunks of ``chunk_size`` tokens, a
        multiple of the block size), chained across chunks."""
        out: list[ChunkBlocks] = []
        parent = None
        for start in range(0, len(tokens), chunk_size):
            blocks = self.chunk_blocks(tokens[start:start + chunk_size], parent)
            out.append(blocks)
            parent = blocks.hashes[-1] if blocks.hashes else parent
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "seed": self.seed, "block_size": self.block_size}


@dataclass(frozen=True, slots=True)
class ChunkBlocks:
    """The vLLM blocks a stored chunk holds, as KV events name them.

    Attributes:
        parent: hash of the block before the chunk's first (None: the chunk starts a prompt).
        hashes: the chunk's full blocks' hashes, in order (a partial last block has none).
        token_ids: those blocks' tokens.
        block_size: tokens per block.
    """

    parent: bytes | None
    hashes: tuple[bytes, ...]
    token_ids: tuple[int, ...]
    block_size: int


def hasher_for(algo: str, block_size: int, env: dict[str, str] | None = None) -> BlockHasher | None:
    """The hasher of an engine with ``--prefix-caching-hash-algo algo`` and this block size,
    in this environment (``PYTHONHASHSEED``) — or None if its hashes cannot be reproduced
    (an ``xxhash`` algorithm with a random seed, or an algorithm not known here)."""
    env = os.environ if env is None else env
    seed = env.get("PYTHONHASHSEED")
    if algo not in ALGOS:
        return None
    return BlockHasher(algo, DEFAULT_SEED if seed is None else seed, block_size)


def external(block_hash: bytes, as_int: bool | None = None) -> int | bytes:
    """A block hash as KV events carry it: vLLM's ``maybe_convert_block_hash`` (the low 64
    bits of the big-endian digest, unless ``as_int`` is False — by default, unless
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``, as for vLLM — then the raw digest)."""
    if as_int is None:
        as_int = os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1") != "0"
    if not as_int:
        return block_hash
    return int.from_bytes(block_hash, byteorder="big") & ((1 << 64) - 1)


MEDIUM_CPU = "CPU"  # vLLM's name for the host tier in KV events


def kv_event(kind: str, blocks: ChunkBlocks) -> tuple[str, dict[str, Any]] | None:
    """vLLM's KV event for a store event of a chunk whose blocks are named: ``("BlockStored",
    fields)`` for an admit, ``("BlockRemoved", fields)`` for an evict — or None for a chunk
    without a full block (vLLM names only full blocks). The fields are those of vLLM's event
    classes (``vllm/distributed/kv_events.py``), so either vLLM's classes or the sidecar's
    wire structs are built from them."""
    if not blocks.hashes:
        return None
    hashes = [external(h) for h in blocks.hashes]
    if kind == "admit":
        return "BlockStored", dict(
            block_hashes=hashes, token_ids=list(blocks.token_ids), block_size=blocks.block_size,
            parent_block_hash=None if blocks.parent is None else external(blocks.parent),
            lora_id=None, medium=MEDIUM_CPU, lora_name=None)
    return "BlockRemoved", dict(block_hashes=hashes, medium=MEDIUM_CPU)
