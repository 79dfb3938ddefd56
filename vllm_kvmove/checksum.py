"""The chunk checksum: XXH3-64 of a chunk's valid bytes, and the ways to compute it.

Contract
--------
* Definition: a chunk's checksum is XXH3-64 (seed 0) of its valid bytes. The store records it
  for every committed chunk (off the save path), it travels with the chunk's descriptor, and a
  destination publishes a fetched chunk only if its bytes hash to it. Every function here
  computes that one value, whatever the route.
* :func:`checksum` hashes a buffer (the ``xxhash`` package; ~12.5 GB/s on one core here).
  :func:`checksum_stream` hashes a chunk that arrives in pieces (NIXL reads, in order).
  :func:`copy_checksum` copies a chunk between two addresses and returns the checksum of what
  it copied, in one pass over the bytes when the C kernel (:mod:`vllm_kvmove._copyhash`) is
  built and the CPU has AVX2 (:data:`FUSED`), else as a copy and then a hash. One pass matters:
  copy and hash are each limited by memory bandwidth here, and fused the hash rides on the
  copy's loads — 1 GiB in 16 MiB chunks on two threads took 128 ms as copy-then-hash and 75
  ms fused, as long as a plain memcpy on two threads (78 ms).
* Callers: the store (:func:`checksum`), the sidecar's NIXL path (:func:`checksum_stream`) and
  same-host copy threads (:func:`copy_checksum`, through :mod:`vllm_kvmove.shm`). All release
  the GIL for the bytes and are safe on any thread.
* Imports neither torch nor numpy: the controller imports this package's wire types.
"""

from __future__ import annotations

import ctypes
from typing import Any

import xxhash

try:
    from vllm_kvmove import _copyhash
except ImportError:  # built without a C compiler (the extension is optional)
    _copyhash = None

#: Whether :func:`copy_checksum` copies and hashes in one pass (the C kernel is here and usable).
FUSED: bool = bool(_copyhash is not None and _copyhash.available)

# XXH3 hashes inputs of up to 240 bytes with other code paths, which the kernel does not have.
_KERNEL_MIN_BYTES = 241


def checksum(data: Any) -> int:
    """XXH3-64 of a contiguous buffer (numpy array, memoryview, bytes; pass a CPU torch
    tensor as ``t.numpy()``, a view). Releases the GIL."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_stream() -> "xxhash.xxh3_64":
    """A streaming hasher: ``update()`` it with a chunk's bytes in order (numpy arrays or
    buffers); its ``intdigest()`` then equals :func:`checksum` of the whole. Releases the GIL."""
    return xxhash.xxh3_64()


def copy_checksum(dst: int, src: int, nbytes: int) -> int:
    """Copy ``nbytes`` from address ``src`` to address ``dst`` and return their checksum.

    Args:
        dst: destination address (writable, ``nbytes`` long, not overlapping ``src``).
        src: source address (readable, ``nbytes`` long).
        nbytes: bytes to copy; 0 is allowed.
    Returns:
        :func:`checksum` of the copied bytes — of the bytes as read from ``src``, which are
        the bytes stored at ``dst``.
    The caller guarantees both ranges are mapped; nothing here can check that.
    """
    if FUSED and nbytes >= _KERNEL_MIN_BYTES:
        return _copyhash.copy_xxh3(dst, src, nbytes)
    ctypes.memmove(dst, src, nbytes)
    return xxhash.xxh3_64_intdigest((ctypes.c_char * nbytes).from_address(dst))
