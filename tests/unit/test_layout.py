import pytest
import torch

from tests.conftest import tiny_layout
from vllm_kvmove.layout import check_kv_caches


def test_sizes(layout):
    assert layout.block_slab_bytes == 1 * 16 * 2 * 8 * 2
    assert layout.block_bytes == 2 * layout.block_slab_bytes
    assert layout.chunk_bytes == 2 * layout.block_bytes
    assert layout.valid_bytes(1) == layout.block_bytes
    assert layout.valid_bytes(17) == 2 * layout.block_bytes


def test_chunk_size_must_be_block_multiple():
    with pytest.raises(ValueError, match="multiple"):
        tiny_layout(chunk_size=24)


def test_fingerprint_covers_every_field(layout):
    fps = {layout.fingerprint()}
    for change in [dict(model="other"), dict(dtype="float16"), dict(num_layers=3), dict(num_kv_heads=2),
                   dict(head_size=16), dict(block_size=32), dict(chunk_size=64), dict(backend="x"),
                   dict(hash_seed="s")]:
        other = tiny_layout(**change)
        assert other.mismatch(layout)
        fps.add(other.fingerprint())
    assert len(fps) == 10


def test_check_kv_caches(layout):
    good = [torch.zeros(10, 1, 16, 16, dtype=torch.bfloat16) for _ in range(2)]
    check_kv_caches(layout, good)
    with pytest.raises(ValueError):
        check_kv_caches(layout, good[:1])
    with pytest.raises(ValueError):
        check_kv_caches(layout, [torch.zeros(10, 2, 16, 16, dtype=torch.bfloat16)] * 2)
