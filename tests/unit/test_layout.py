import pytest
import torch

from tests.harness.stores import tiny_layout
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


def test_fingerprint_covers_what_the_kv_means_and_not_its_format(layout):
    """The fingerprint (the keys' salt) changes with every compatibility field — the same
    model's KV per rank from a differently parallel engine has another ``num_kv_heads`` but
    the same ``total_kv_heads`` — and not with a format field (those are converted)."""
    fps = {layout.fingerprint()}
    for change in [dict(model="other"), dict(dtype="float16"), dict(num_layers=3),
                   dict(num_kv_heads=2), dict(head_size=16), dict(chunk_size=64),
                   dict(hash_seed="s"), dict(kind="mla")]:
        other = tiny_layout(**change)
        assert other.mismatch(layout)
        fps.add(other.fingerprint())
    assert len(fps) == 9
    for change in [dict(block_size=32), dict(backend="x"),
                   dict(num_kv_heads=2, total_kv_heads=1)]:  # a rank of a TP=2 engine's twin
        other = tiny_layout(**change)
        assert other.fingerprint() == layout.fingerprint() and not other.same_format(layout)
    assert tiny_layout(total_kv_heads=1) == layout  # total defaults to the rank's heads


def test_a_kv_layouts_fingerprint_is_what_it_was_before_the_kind_field(layout):
    """Engines upgraded one by one keep their chunk keys: a ``kind="kv"`` layout's
    fingerprint is the digest of the fields it had before ``kind`` existed."""
    import hashlib
    import json

    old = {k: getattr(layout, k) for k in ("model", "dtype", "num_layers", "head_size",
                                           "total_kv_heads", "chunk_size", "hash_seed")}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:32]
    assert layout.fingerprint() == digest


def test_an_mla_layouts_block_holds_one_latent_vector_per_token(layout):
    """MLA caches one ``head_size`` vector per token and layer (no separate key and value):
    a block slab is half a KV layout's of the same head size, and its cache checks so."""
    mla = tiny_layout(kind="mla", backend="cpu_mla")
    assert mla.block_slab_bytes * 2 == layout.block_slab_bytes == 16 * 2 * 8 * 2
    check_kv_caches(mla, [torch.zeros(10, 1, 16, 8, dtype=torch.bfloat16) for _ in range(2)])
    with pytest.raises(ValueError):
        check_kv_caches(mla, [torch.zeros(10, 1, 16, 16, dtype=torch.bfloat16)] * 2)


@pytest.mark.parametrize("field, value", [("num_layers", "2"), ("block_size", 0),
                                          ("dtype", "int4"), ("total_kv_heads", -1),
                                          ("model", 3), ("kind", "latent")])
def test_a_layout_off_the_wire_is_checked_field_by_field(field, value):
    with pytest.raises(ValueError, match=field if field != "dtype" else "dtype"):
        tiny_layout(**{field: value})


def test_check_kv_caches(layout):
    good = [torch.zeros(10, 1, 16, 16, dtype=torch.bfloat16) for _ in range(2)]
    check_kv_caches(layout, good)
    with pytest.raises(ValueError):
        check_kv_caches(layout, good[:1])
    with pytest.raises(ValueError):
        check_kv_caches(layout, [torch.zeros(10, 2, 16, 16, dtype=torch.bfloat16)] * 2)


def test_block_copies_match_plain_indexing_for_consecutive_and_scattered_ids():
    import torch

    from vllm_kvmove.layout import block_index, copy_blocks

    assert block_index([4, 5, 6]) == slice(4, 7)
    assert torch.equal(block_index([4, 6, 5]), torch.tensor([4, 6, 5]))
    # Rows of 5 bytes (copied as bytes) and of 40 (copied as 8-byte words), strided like a
    # chunk's layer; into a plain tensor and into a strided slice, in place.
    for width in (5, 40):
        src = (torch.arange(8 * 3 * width) % 251).to(torch.uint8).view(8, 3, width)[:, 1]
        for dst_ids in ([2, 3, 4], [7, 1, 4]):
            for src_ids in ([0, 1, 2], [5, 0, 3]):
                dst = torch.zeros(9, 2, width, dtype=torch.uint8)
                copy_blocks(dst[:, 1], block_index(dst_ids), src, block_index(src_ids))
                want = torch.zeros(9, 2, width, dtype=torch.uint8)
                want[torch.tensor(dst_ids), 1] = src[torch.tensor(src_ids)]
                assert torch.equal(dst, want), (width, dst_ids, src_ids)


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "memmove"])
def test_block_copier_matches_plain_indexing_and_checks_its_rows(kernel, monkeypatch):
    import torch

    from vllm_kvmove import layout
    from vllm_kvmove.layout import block_copier

    if kernel and layout._copy_runs is None:
        pytest.skip("the C kernel is not built here")
    if not kernel:
        monkeypatch.setattr(layout, "_copy_runs", None)
    # The connector's two uses: a chunk's strided layer rows into scattered cache rows (load),
    # and back into the slot's first rows (save); adjacent rows on both sides make one run.
    # 5 and 40 bytes: plain copies; 96 KiB + 8: streamed (non-temporal) copies, unaligned tail.
    for width in (5, 40, 96 * 1024 + 8):
        src = (torch.arange(8 * 3 * width) % 251).to(torch.uint8).view(8, 3, width)[:, 1]
        for dst_ids in ([2, 3, 4], [7, 1, 4], [0]):
            src_ids = [5, 0, 3][:len(dst_ids)]
            dst = torch.zeros(9, 2, width, dtype=torch.uint8)
            copy = block_copier(dst[:, 1], dst_ids, src, src_ids)
            assert torch.equal(dst, torch.zeros_like(dst))  # bound, not yet run
            copy()
            want = torch.zeros(9, 2, width, dtype=torch.uint8)
            want[torch.tensor(dst_ids), 1] = src[torch.tensor(src_ids)]
            assert torch.equal(dst, want), (width, dst_ids)
    cache = (torch.arange(6 * 16) % 199).to(torch.uint8).view(6, 16)
    slot = torch.zeros(4, 16, dtype=torch.uint8)
    block_copier(slot, range(3), cache, [3, 4, 5])()  # one 48-byte run
    assert torch.equal(slot[:3], cache[3:6]) and not slot[3].any()
    with pytest.raises(IndexError):
        block_copier(slot, [4], cache, [0])  # past the destination's rows: refused, not run
    with pytest.raises(IndexError):
        block_copier(slot, [0], cache, [-1])
    with pytest.raises(ValueError):
        block_copier(slot, [0, 1], cache, [0])


def test_block_bytes_are_each_blocks_physical_bytes_and_refuse_what_is_not_one_range():
    from vllm_kvmove.layout import block_bytes

    # LBNHC memory under an LBHNC-shaped view: rows are the blocks' bytes in memory order.
    mem = torch.arange(4 * 16 * 2 * 8, dtype=torch.int16).view(4, 16, 2, 8)
    rows = block_bytes(mem.permute(0, 2, 1, 3))
    assert rows.shape == (4, 16 * 2 * 8 * 2)
    assert rows[2].numpy().tobytes() == mem[2].numpy().tobytes()
    rows[1].zero_()  # writes land in the cache itself
    assert mem[1].abs().sum() == 0 and mem[0].abs().sum() > 0
    # Two layers interleaved in one buffer: stride(0) is two slabs.
    buf = torch.arange(3 * 2 * 32, dtype=torch.int16).view(3, 2, 32)
    assert block_bytes(buf[:, 1])[2].numpy().tobytes() == buf[2, 1].numpy().tobytes()
    with pytest.raises(ValueError, match="not one contiguous range"):
        block_bytes(torch.zeros(4, 16, 8)[:, :, :4])  # a block with gaps
    with pytest.raises(ValueError, match="overlap"):
        block_bytes(torch.zeros(200).as_strided((4, 16, 8), (4, 8, 1)))


def test_block_copiers_cut_the_copy_into_pieces_that_together_do_all_of_it():
    from vllm_kvmove.layout import block_copiers

    src = (torch.arange(12 * 2 * 64) % 251).to(torch.uint8).view(12, 2, 64)[:, 1]
    dst_ids, src_ids = [3, 4, 5, 9, 0, 1, 7, 8], [0, 1, 2, 6, 10, 11, 4, 3]
    for piece_bytes, count in ((0, 1), (128, 4), (1, 8), (10_000, 1)):
        dst = torch.zeros(10, 64, dtype=torch.uint8)
        copiers = block_copiers(dst, dst_ids, src, src_ids, piece_bytes)
        assert len(copiers) == count, piece_bytes
        for copy in reversed(copiers):  # any order
            copy()
        want = torch.zeros(10, 64, dtype=torch.uint8)
        want[torch.tensor(dst_ids)] = src[torch.tensor(src_ids)]
        assert torch.equal(dst, want), piece_bytes
    assert block_copiers(dst, [], src, []) == []


def test_mla_chunks_move_between_twins_only():
    """No conversion of MLA chunks is known: engines of another block size are refused,
    naming the backend; twins need none."""
    from vllm_kvmove.convert import conversion_obstacles

    a = tiny_layout(kind="mla", backend="cpu_mla")
    b = tiny_layout(kind="mla", backend="cpu_mla", block_size=32)
    assert conversion_obstacles(a, 1, a, 1) == []
    (why,) = conversion_obstacles(a, 1, b, 1)
    assert "block_size: 16 != 32" in why and "'cpu_mla'" in why
