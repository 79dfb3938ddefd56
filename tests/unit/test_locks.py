"""ChunkLocks: operations on the same chunks of one instance never overlap."""

from __future__ import annotations

import pytest

from sidecar.controller.locks import ChunkLocks, Claim
from sidecar.httpkit import ApiError

K1, K2, K3 = b"1" * 16, b"2" * 16, b"3" * 16


def conflict(locks: ChunkLocks, holder: str, claims: list[Claim]) -> str:
    with pytest.raises(ApiError) as e:
        locks.acquire(holder, claims)
    assert e.value.kind == "conflict"
    return e.value.message


def test_opposite_moves_and_two_fetches_into_one_destination_conflict():
    locks = ChunkLocks()
    locks.acquire("move 1", [Claim("a", (K1, K2), True), Claim("b", (K1, K2), True)])
    assert "move 1" in conflict(locks, "move 2", [Claim("b", (K2,), True), Claim("a", (K2,), True)])
    assert "move 1" in conflict(locks, "copy 3", [Claim("c", (K1,), False), Claim("b", (K1,), True)])
    assert "move 1" in conflict(locks, "copy 4", [Claim("a", (K1,), False), Claim("c", (K1,), True)])
    locks.acquire("move 5", [Claim("a", (K3,), True), Claim("b", (K3,), True)])  # other chunks
    locks.release("move 1")
    locks.acquire("move 2", [Claim("b", (K2,), True), Claim("a", (K2,), True)])
    assert len(locks) == 2


def test_copies_from_one_source_share_it_but_a_move_from_it_waits():
    locks = ChunkLocks()
    locks.acquire("copy 1", [Claim("a", (K1,), False), Claim("b", (K1,), True)])
    locks.acquire("copy 2", [Claim("a", (K1,), False), Claim("c", (K1,), True)])
    assert "copy" in conflict(locks, "move 3", [Claim("a", (K1,), True), Claim("d", (K1,), True)])
    locks.release("copy 1")
    locks.release("copy 2")
    locks.acquire("move 3", [Claim("a", (K1,), True), Claim("d", (K1,), True)])


def test_a_whole_instance_clear_conflicts_with_any_claim_there_and_all_or_nothing():
    locks = ChunkLocks()
    locks.acquire("copy 1", [Claim("a", (K1,), False), Claim("b", (K1,), True)])
    assert "copy 1" in conflict(locks, "clear 2", [Claim("b", None, True)])
    locks.acquire("clear 3", [Claim("c", None, True)])
    assert "clear 3" in conflict(locks, "move 4", [Claim("a", (K2,), True), Claim("c", (K2,), True)])
    # The refused move took nothing: a move of K2 from a elsewhere goes through.
    locks.acquire("move 5", [Claim("a", (K2,), True), Claim("b", (K2,), True)])
    for h in ("copy 1", "clear 3", "move 5"):
        locks.release(h)
    assert len(locks) == 0
    locks.acquire("clear 6", [Claim("b", None, True)])
    locks.release("clear 6")
    locks.release("never-held")  # a no-op
