"""Same-host copies (vllm_kvmove.shm): a real second process owns a shared pool; this one maps
it through /proc and copies from it, with and without hashing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vllm_kvmove.checksum import checksum
from vllm_kvmove.shm import PeerPools, PoolHandle
from vllm_kvmove.transfer import ReadRange, TransferError

POOL = 8 << 20

OWNER = textwrap.dedent(f"""
    import dataclasses, json, sys, torch
    from vllm_kvmove.shm import allocate_pool
    pool, handle = allocate_pool({POOL})
    g = torch.Generator().manual_seed(5)
    pool.copy_(torch.randint(0, 256, ({POOL},), dtype=torch.uint8, generator=g))
    print(json.dumps(dataclasses.asdict(handle)), flush=True)
    sys.stdin.read()  # live until the test closes our stdin
""")


def expected() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (POOL,), dtype=torch.uint8, generator=g)


# A peer whose memfd is not sealed: it could shrink the file under our copy.
UNSEALED_OWNER = textwrap.dedent(f"""
    import dataclasses, json, os, sys
    from vllm_kvmove.shm import PoolHandle, boot_id, pid_namespace
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, {POOL})
    h = PoolHandle(boot_id(), pid_namespace(), os.getpid(), fd, os.fstat(fd).st_ino, {POOL}, 0)
    print(json.dumps(dataclasses.asdict(h)), flush=True)
    sys.stdin.read()
""")


@contextlib.contextmanager
def pool_owner(script: str = OWNER):
    """A second process holding a shared pool (of known bytes, with OWNER): yields
    (process, handle)."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        yield proc, PoolHandle(**json.loads(proc.stdout.readline()))
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def owner():
    with pool_owner() as o:
        yield o


@pytest.fixture
def pools():
    p = PeerPools(threads=2)
    yield p
    p.close()


def ranges_into(dst: torch.Tensor, handle: PoolHandle, spans: list[tuple[int, int, int]]):
    """ReadRanges for (source offset, destination offset, nbytes) spans."""
    return [ReadRange(handle.base_addr + s, dst.data_ptr() + d, n) for s, d, n in spans]


# (source offset, destination offset, bytes): scattered; then runs adjacent on both sides (one
# memmove each), adjacent on one side only (must not be merged), and touching the pool's end.
SCATTERED = [(0, 0, 1 << 20), (3 << 20, 1 << 20, 700_001), (5 << 20, 2 << 20, 3 << 20), (POOL - 5, 5 << 20, 5)]
ADJACENT = [(0, 0, 1 << 20), (1 << 20, 1 << 20, 1 << 20), (2 << 20, 2 << 20, 512 << 10),
            (4 << 20, (5 << 19), 1 << 20), (5 << 20, 4 << 20, 1 << 20), (POOL - 3, 5 << 20, 3)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("spans", [SCATTERED, ADJACENT], ids=["scattered", "adjacent"])
def test_copies_the_peers_bytes_and_hashes_them(owner, threads, verify, spans):
    _, handle = owner
    pools = PeerPools(threads=threads)
    try:
        mapped = pools.get(handle)
        assert mapped is not None
        dst = torch.zeros(6 << 20, dtype=torch.uint8)
        digests = mapped.copy(ranges_into(dst, handle, spans), checksums=verify)
        want = expected()
        for i, (s, d, n) in enumerate(spans):
            assert torch.equal(dst[d:d + n], want[s:s + n]), f"span {i}"
        if verify:
            assert digests == [checksum(want[s:s + n].numpy()) for s, _, n in spans]
        else:
            assert digests is None
        assert pools.get(handle) is mapped  # kept for the next copy
    finally:
        pools.close()


def test_a_range_outside_the_peers_pool_is_refused_and_nothing_is_copied(owner, pools):
    _, handle = owner
    mapped = pools.get(handle)
    dst = torch.zeros(2 << 20, dtype=torch.uint8)
    bad = ranges_into(dst, handle, [(0, 0, 1 << 20), (POOL - 10, 1 << 20, 11)])
    with pytest.raises(TransferError, match="outside the pool"):
        mapped.copy(bad)
    with pytest.raises(TransferError, match="outside the pool"):
        mapped.copy([ReadRange(handle.base_addr - 1, dst.data_ptr(), 1)])
    assert int(dst.count_nonzero()) == 0


@pytest.mark.parametrize("change", ["boot_id", "pid_ns", "nbytes"])
def test_a_pool_on_another_host_or_namespace_is_left_to_nixl(owner, pools, change):
    _, handle = owner
    wrong = {"boot_id": "another-host", "pid_ns": handle.pid_ns + 1, "nbytes": handle.nbytes + 4096}
    assert pools.get(dataclasses.replace(handle, **{change: wrong[change]})) is None


@pytest.mark.parametrize("change", ["pid", "fd", "inode"])
def test_a_pool_that_is_gone_from_this_namespace_fails_at_once(owner, pools, change):
    # No such process, no such descriptor, or another file there (a recycled pid): the
    # source is gone, and NIXL could not reach it either.
    _, handle = owner
    wrong = {"pid": 2**22 + 7, "fd": 999, "inode": handle.inode + 1}
    with pytest.raises(TransferError, match="pid"):
        pools.get(dataclasses.replace(handle, **{change: wrong[change]}))


def test_a_peer_that_exited_is_unmapped_and_not_used_again(pools):
    with pool_owner() as (proc, handle):
        assert pools.get(handle) is not None
        assert pools.sweep() == 0  # alive: kept
        proc.stdin.close()
        proc.wait(timeout=30)
        assert pools.sweep() == 1
        with pytest.raises(TransferError, match="not running"):
            pools.get(handle)


def test_a_mapped_peer_that_exits_fails_the_next_copy_at_once(pools):
    with pool_owner() as (proc, handle):
        assert pools.get(handle) is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        with pytest.raises(TransferError, match="exited"):
            pools.get(handle)  # before any sweep


def test_a_pool_cannot_change_size_and_an_unsealed_one_is_left_to_nixl(pools):
    """Reading a mapped file past its end faults (SIGBUS): our pools are sealed against
    resizing, and a peer pool that is not sealed is never mapped."""
    from vllm_kvmove.shm import allocate_pool

    pool, handle = allocate_pool(1 << 20)
    for size in (0, 4096, 2 << 20):
        with pytest.raises(PermissionError):
            os.ftruncate(handle.fd, size)
    assert os.fstat(handle.fd).st_size == 1 << 20 and pool.numel() == 1 << 20
    with pool_owner(UNSEALED_OWNER) as (_, unsealed):
        assert pools.get(unsealed) is None


def test_copy_threads_run_the_first_share_on_the_caller_and_cap_the_shares_running():
    import threading
    import time
    from vllm_kvmove.shm import CopyThreads
    threads = CopyThreads(2)
    running, peak, where, lock = [0], [0], [], threading.Lock()

    def work(share):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            where.append(threading.current_thread().name)
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return [x * 10 for x in share]

    try:
        shares = [[1], [2], [3], [4]]
        callers = [threading.Thread(target=lambda: out.append(threads.run(work, shares, 2 << 20)))
                   for _ in range(3)]
        out: list = []
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        assert out == [[[10], [20], [30], [40]]] * 3  # every result, in order
        assert peak[0] <= 2  # three callers, two slots
        assert sum(not n.startswith("kvmove-copy") for n in where) == 3  # one share each
        # A failing share: the others are waited for, then the failure is raised.
        done = []

        def fails_first(share):
            if share == [1]:
                raise OSError("bad range")
            time.sleep(0.02)
            done.append(share)
            return share
        with pytest.raises(OSError):
            threads.run(fails_first, [[1], [2]], 2 << 20)
        assert done == [[2]]
    finally:
        threads.shutdown()
