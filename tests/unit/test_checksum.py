"""The chunk checksum (vllm_kvmove.checksum): the fused copy-and-hash kernel must give exactly
XXH3-64 (the xxhash package's value), copy exactly the bytes asked, and be built here."""

from __future__ import annotations

import platform
import random
import shutil

import numpy as np
import pytest

from vllm_kvmove import checksum as cs

# Every length around the kernel's edges (240 is the last short input; 1024-byte blocks, 64-byte
# stripes), then random ones up to 4 MiB (non-temporal stores from 64 KiB).
LENGTHS = list(range(0, 3000)) + [65535, 65536, 65537, 1 << 20, (1 << 22) - 1, 1 << 22]
LENGTHS += random.Random(7).sample(range(3000, 1 << 22), 60)


def _buffers(n_max: int):
    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, n_max + 128, dtype=np.uint8)
    dst = np.zeros(n_max + 256, dtype=np.uint8)
    return src, dst


def _check_copies(fused: bool, monkeypatch) -> int:
    monkeypatch.setattr(cs, "FUSED", fused)
    src, dst = _buffers(max(LENGTHS))
    rnd = random.Random(11)
    checked = 0
    for n in LENGTHS:
        s_off, d_off = rnd.randrange(64), rnd.choice([0, 32, 64, rnd.randrange(1, 64)])
        dst[:d_off + n + 64] = 0
        got = cs.copy_checksum(dst.ctypes.data + d_off, src.ctypes.data + s_off, n)
        want = cs.checksum(src[s_off:s_off + n])
        assert got == want, f"n={n}: {got:#x} != {want:#x}"
        assert np.array_equal(dst[d_off:d_off + n], src[s_off:s_off + n]), f"n={n}"
        assert not dst[:d_off].any() and not dst[d_off + n:d_off + n + 64].any(), f"n={n}"
        checked += 1
    return checked


def test_the_kernel_is_built_and_used_where_it_can_be():
    """A silent fallback would halve verified same-host moves: on x86-64 with AVX2 and a C
    compiler (this project's machines), the install must have built the kernel."""
    avx2 = "avx2" in open("/proc/cpuinfo").read().split()
    if platform.machine() != "x86_64" or not avx2 or shutil.which("cc") is None:
        pytest.skip("no x86-64 AVX2 CPU or no C compiler here: the two-pass fallback is used")
    assert cs.FUSED


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-pass"])
def test_copy_checksum_copies_exactly_and_equals_xxh3(fused, monkeypatch):
    if fused and not cs.FUSED:
        pytest.skip("the kernel is not built here (see the test above)")
    assert _check_copies(fused, monkeypatch) == len(LENGTHS)


@pytest.mark.skipif(not cs.FUSED, reason="the kernel is not built here")
def test_the_kernel_hashes_without_copying_and_refuses_short_inputs():
    from vllm_kvmove import _copyhash

    src, _ = _buffers(1 << 16)
    for n in (241, 1024, 1025, 1 << 16):
        assert _copyhash.copy_xxh3(0, src.ctypes.data, n) == cs.checksum(src[:n])
    with pytest.raises(ValueError, match="240"):
        _copyhash.copy_xxh3(0, src.ctypes.data, 240)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-pass"])
def test_any_single_bit_flip_changes_the_checksum(fused, monkeypatch):
    if fused and not cs.FUSED:
        pytest.skip("the kernel is not built here")
    monkeypatch.setattr(cs, "FUSED", fused)
    n = 1 << 18
    src, dst = _buffers(n)
    good = cs.checksum(src[:n])
    rnd = random.Random(5)
    for pos in [0, 63, 64, 1023, 1024, n - 65, n - 64, n - 1] + rnd.sample(range(n), 40):
        bit = 1 << rnd.randrange(8)
        src[pos] ^= bit
        try:
            assert cs.copy_checksum(dst.ctypes.data, src.ctypes.data, n) != good, pos
        finally:
            src[pos] ^= bit
    assert cs.copy_checksum(dst.ctypes.data, src.ctypes.data, n) == good
