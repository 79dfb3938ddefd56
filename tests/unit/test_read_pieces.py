"""The sidecar's cutting of a fetch into read-and-hash pieces (vllm_kvmove.transfer.split_ranges)."""

from __future__ import annotations

from vllm_kvmove.transfer import ReadRange, split_ranges


def test_pieces_cover_every_byte_once_in_order_and_respect_the_size():
    ranges = [ReadRange(1000, 5000, 10), ReadRange(2000, 6000, 25), ReadRange(9000, 9900, 3)]
    pieces = split_ranges(ranges, 8)
    assert all(sum(r.nbytes for _, r in p) <= 8 for p in pieces)
    assert all(sum(r.nbytes for _, r in p) == 8 for p in pieces[:-1])  # only the last is short
    covered: dict[int, list[tuple[int, int]]] = {}
    for p in pieces:
        for i, r in p:
            assert r.remote_addr - ranges[i].remote_addr == r.local_addr - ranges[i].local_addr
            covered.setdefault(i, []).append((r.local_addr - ranges[i].local_addr, r.nbytes))
    for i, r in enumerate(ranges):
        offset = 0
        for start, n in covered[i]:  # consecutive, no gap, no overlap
            assert start == offset
            offset += n
        assert offset == r.nbytes


def test_one_piece_when_everything_fits():
    ranges = [ReadRange(0, 100, 4), ReadRange(50, 200, 4)]
    assert split_ranges(ranges, 1 << 20) == [[(0, ranges[0]), (1, ranges[1])]]
