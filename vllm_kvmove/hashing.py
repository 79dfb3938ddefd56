"""Chunk keys: stable, chained hashes of token ids, salted with a KV-compatibility fingerprint.

A prompt of N tokens is cut into chunks of ``chunk_size`` tokens; the last chunk may be
partial. Chunk i's key is ``blake2b(parent_key || token ids of chunk i)``, with chunk 0's
parent derived from the fingerprint of what the KV means (model, dtype, layers, head size,
KV heads in total, chunk size, hash seed: see :mod:`vllm_kvmove.layout`) — not of its
format (block size, packing, tensor parallelism), which a move converts.

Consequences the rest of the system relies on:
  * Keys do not depend on ``PYTHONHASHSEED`` or on any process state: every engine, the
    controller and a test compute the same keys for the same tokens and fingerprint.
  * A key names a whole prefix, not just its own tokens: equal keys imply equal prefixes.
  * Engines whose KV is incompatible (different fingerprint) never share a key.
  * A partial chunk's key differs from the full chunk that later extends it, so a stored
    partial tail only matches a prompt with exactly that tail.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from dataclasses import dataclass
from typing import Sequence

KEY_BYTES = 16
_TOKEN_LIMIT = 1 << 31


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """One chunk of a token sequence.

    Attributes:
        key: 16-byte chained hash naming the prefix up to ``end``.
        start: index of the chunk's first token in the sequence.
        end: one past the index of its last token (``end - start <= chunk_size``).
    """

    key: bytes
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def root_key(fingerprint: str) -> bytes:
    """Parent key of chunk 0 for KV of the given compatibility fingerprint."""
    return hashlib.blake2b(b"vllm-kvmove/v1:" + fingerprint.encode(), digest_size=KEY_BYTES).digest()


def _token_bytes(tokens: Sequence[int]) -> bytes:
    arr = array("q", tokens)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def chunk_spans(tokens: Sequence[int], chunk_size: int, fingerprint: str) -> list[ChunkSpan]:
    """Cut ``tokens`` into chunks and key each one.

    Args:
        tokens: token ids, each in ``[0, 2**31)``.
        chunk_size: tokens per chunk (> 0).
        fingerprint: KV-compatibility fingerprint (:meth:`KVLayout.fingerprint`).
    Returns:
        ``ceil(len(tokens) / chunk_size)`` spans in order; the last may be partial.
    Raises:
        ValueError: if a token id is out of range.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    n = len(tokens)
    # Fast path: every id as 8 little-endian bytes, converted and range-checked at C speed (an
    # id is in [0, 2^31) iff byte 3 of its 8 is below 0x80 and bytes 4-7 are zero), then each
    # chunk hashed straight from that buffer. Anything else takes the per-token loop below,
    # which raises naming the first offending id.
    try:
        raw = struct.pack(f"<{n}q", *tokens)
    except struct.error:
        raw = b""
    if len(raw) == 8 * n and raw[3::8].isascii() and (
            raw[4::8] == raw[5::8] == raw[6::8] == raw[7::8] == bytes(n)):
        parent = root_key(fingerprint)
        spans = []
        view = memoryview(raw)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hashlib.blake2b(parent, digest_size=KEY_BYTES)  # = blake2b(parent || chunk bytes)
            h.update(view[8 * start:8 * end])
            parent = h.digest()
            spans.append(ChunkSpan(parent, start, end))
        return spans
    parent = root_key(fingerprint)
    spans = []
    for start in range(0, n, chunk_size):
        piece = tokens[start:start + chunk_size]
        for t in piece:
            if not 0 <= t < _TOKEN_LIMIT:
                raise ValueError(f"token id {t!r} at position {start} is out of range [0, 2^31)")
        parent = hashlib.blake2b(parent + _token_bytes(piece), digest_size=KEY_BYTES).digest()
        spans.append(ChunkSpan(parent, start, start + len(piece)))
    return spans
