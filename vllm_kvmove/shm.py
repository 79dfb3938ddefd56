"""Same-host copies between store pools: a shared-memory path beside NIXL.

Contract
--------
* Why: between two processes on one host, NIXL moves host memory with UCX's cma (a kernel
  copy that pins and copies one 4 KiB page at a time): 3-5 GB/s here, against 9-10 GB/s for
  memcpy. When both engines share a host, the destination can map the source's pool and
  copy it itself, at memcpy speed, on several threads.
* Source side: :func:`allocate_pool` creates a store pool in a memfd (anonymous shared memory:
  pages are committed as they are first written, like ``torch.empty``, and freed with the last
  mapping), sealed against resizing: a mapped file that shrinks makes its readers fault
  (SIGBUS) past the new end, and a peer must not be able to crash an engine that way. Its
  :class:`PoolHandle` — boot id, pid namespace, pid, descriptor, inode, size, base address —
  travels in the sidecar's registration; NIXL still registers the same pool for other hosts.
* Destination side: :class:`PeerPools` (one per engine, owned by the sidecar) maps a peer's
  pool read-only by opening ``/proc/<pid>/fd/<fd>``. The kernel opens that path only for a
  process allowed to ptrace-read the peer — the boundary cma already has — and the boot id,
  pid namespace and inode checks make sure another host, another container or a recycled pid
  cannot pass for the peer. A pool that is not sealed against shrinking is not mapped (NIXL
  then reads it), so no peer can pull pages from under a copy.
  Mappings are kept per peer (the first copy through a mapping pays its page-table set-up,
  ~90 ms per GiB), checked before every copy (open + fstat, ~0.1 ms: a peer that exited is
  dropped), and :meth:`PeerPools.sweep` drops the mappings of peers that are gone, so a dead
  engine's memory is not kept alive by us.
* Copies: :meth:`MappedPool.copy` copies byte ranges on the engine's :class:`CopyThreads`
  (the GIL is released; the caller runs one share itself; concurrent copies share the
  threads' slots, so copies use at most ``threads`` cores together).
  Verified, each range is copied and checksummed in one pass
  (:func:`vllm_kvmove.checksum.copy_checksum`); unverified, adjacent ranges are merged into one
  memmove.
* Failure: a peer in our host and pid namespace whose process (or pool descriptor) is gone is
  a :class:`~vllm_kvmove.transfer.TransferError` at once (so is a recycled pid: another
  inode). Anything else that prevents a mapping (another host or pid namespace, no
  permission) makes :meth:`PeerPools.get` return None — the caller then reads over NIXL. A
  range outside the peer's pool raises :class:`~vllm_kvmove.transfer.TransferError`: a wrong
  address is refused, never followed.
  A peer that exits mid-copy does not disturb it: its pages live until we unmap them.
* Knows nothing of HTTP, the controller or the store's bookkeeping.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from vllm_kvmove.checksum import copy_checksum
from vllm_kvmove.transfer import ReadRange, TransferError

if TYPE_CHECKING:
    import torch

# torch and numpy are imported where a pool is made or mapped, not here: the controller and
# the CLI import PoolHandle (a wire type, through sidecar.protocol) and must start quickly.

logger = logging.getLogger(__name__)

# Copies up to this size run on the calling thread.
_INLINE_BYTES = 1 << 20

# Seals a pool carries: its size can change no more, nor can its seals.
_POOL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def boot_id() -> str:
    """This kernel's boot id: equal for two processes iff they share a host (and a boot)."""
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def pid_namespace() -> int:
    """Inode of this process's pid namespace: equal iff pids mean the same processes."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class PoolHandle:
    """What a peer on the same host needs to map a pool. Also a wire type: the sidecar's
    ``Register`` and the controller's ``PeerInfo`` carry it as is (msgspec encodes dataclasses).

    Attributes:
        boot_id: :func:`boot_id` of the owner's host.
        pid_ns: :func:`pid_namespace` of the owner (containers on one host differ).
        pid: owner's process id.
        fd: the memfd's descriptor number in the owner.
        inode: the memfd's inode (checked after opening: guards against pid reuse).
        nbytes: pool size.
        base_addr: the pool's address in the owner (chunk addresses are relative to it).
    """

    boot_id: str
    pid_ns: int
    pid: int
    fd: int
    inode: int
    nbytes: int
    base_addr: int


_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+
_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def populate_write(addr: int, nbytes: int) -> bool:
    """Commit the pages of ``[addr, addr + nbytes)`` (whole pages inside it) writable, as a
    write to each would, without writing: ``madvise(MADV_POPULATE_WRITE)``. Returns False when
    the kernel cannot (before 5.14, or not that memory), True otherwise."""
    first = addr + (-addr) % _PAGE
    last = (addr + nbytes) // _PAGE * _PAGE
    if last <= first:
        return True
    if _libc.madvise(first, last - first, _MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        logger.info("cannot commit the pool ahead of need (madvise: %s): pages fault in as "
                    "chunks are first written", os.strerror(err))
        return False
    return True


def allocate_pool(nbytes: int, name: str = "kvmove-pool") -> tuple["torch.Tensor", PoolHandle]:
    """Allocate ``nbytes`` of shared host memory as a uint8 tensor.

    Returns:
        (pool, handle): the tensor (kept valid by its reference to the mapping) and the handle
        peers use to map it. The descriptor stays open for the life of the process.
    Raises:
        OSError: memfd_create or mmap failed (e.g. no memfd support).
    """
    import torch

    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _POOL_SEALS)
        mapping = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        raise
    pool = torch.frombuffer(mapping, dtype=torch.uint8)
    st = os.fstat(fd)
    return pool, PoolHandle(boot_id(), pid_namespace(), os.getpid(), fd, st.st_ino, nbytes,
                            pool.data_ptr())


# One range to copy: (source address, destination address, bytes).
_Item = tuple[int, int, int]


class MappedPool:
    """A peer's pool mapped read-only into this process (made by :class:`PeerPools`)."""

    def __init__(self, handle: PoolHandle, mapping: mmap.mmap, fd: int,
                 copy_threads: "CopyThreads"):
        import numpy as np

        self.handle = handle
        self._mapping = mapping
        self._fd = fd  # kept open: fstat on it tells whether the file is still the peer's
        # ctypes cannot take the address of a read-only buffer; numpy can (and keeps the
        # export alive until _unmap drops it).
        self._view = np.frombuffer(mapping, dtype=np.uint8)
        self._addr = self._view.ctypes.data
        self._copy_threads = copy_threads
        self._users = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def view(self):
        """The mapping as a read-only ``numpy`` uint8 array (valid until :meth:`close`)."""
        return self._view

    def _source_addr(self, r: ReadRange) -> int:
        off = r.remote_addr - self.handle.base_addr
        if off < 0 or r.nbytes < 0 or off + r.nbytes > self.handle.nbytes:
            raise TransferError(f"range [{r.remote_addr:#x}, +{r.nbytes}) lies outside the "
                                f"pool of pid {self.handle.pid}")
        return self._addr + off

    def copy(self, ranges: Sequence[ReadRange], checksums: bool = False) -> list[int] | None:
        """Copy ``ranges`` from the peer's pool into ours; with ``checksums``, also return the
        checksum of each range's bytes.

        The ranges are cut into ``threads`` consecutive shares of whole ranges, one per copy
        thread. With ``checksums`` each range is copied and hashed in one pass (the bytes are
        read once; 1 GiB on two threads: 14.3 GB/s fused against 8.4 for a copy then a hash).
        Without, a thread merges the ranges of its share that are adjacent on both sides
        (slots filled in order usually are) into one memmove: glibc copies with non-temporal
        stores only from 48 MiB up (``x86_non_temporal_threshold``), ~1.7x faster here than
        smaller copies.

        Args:
            ranges: ``remote_addr`` in the peer's address space (inside its pool),
                ``local_addr`` in ours (the caller's reserved slots).
            checksums: compute each range's :func:`vllm_kvmove.checksum.checksum`.
        Returns:
            The checksums, in the order of ``ranges``, or None without ``checksums``.
        Raises:
            TransferError: a range lies outside the peer's pool (nothing copied).
        """
        items = [(self._source_addr(r), r.local_addr, r.nbytes)
                 for r in ranges]  # every range checked before any byte moves
        total = sum(r.nbytes for r in ranges)
        with self._lock:
            if self._closed:
                raise TransferError(f"mapping of pid {self.handle.pid} was dropped")
            self._users += 1
        try:
            work = _checksum_share if checksums else _copy_share
            results = self._copy_threads.run(
                work, _shares(items, self._copy_threads.threads, total), total)
        finally:
            with self._lock:
                self._users -= 1
                if self._closed and not self._users:
                    self._unmap()
        return [c for share in results for c in share] if checksums else None

    def still_the_peer(self) -> bool:
        """Whether ``/proc/<pid>/fd/<fd>`` still is the pool we mapped (the peer lives)."""
        h = self.handle
        try:
            st = os.stat(f"/proc/{h.pid}/fd/{h.fd}")
        except OSError:
            return False
        mine = os.fstat(self._fd)
        return st.st_ino == mine.st_ino and st.st_dev == mine.st_dev

    def close(self) -> None:
        """Unmap (now, or when the last copy through it ends)."""
        with self._lock:
            self._closed = True
            if not self._users:
                self._unmap()

    def _unmap(self) -> None:
        if self._mapping is not None:
            self._view = None  # release the buffer export before closing
            self._mapping.close()
            os.close(self._fd)
            self._mapping = None


def _shares(items: list[_Item], threads: int, total: int) -> list[list[_Item]]:
    """Cut ``items`` into at most ``threads`` consecutive groups of about equal bytes."""
    target = -(-total // threads)
    shares: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if size >= target and len(shares) < threads:
            shares.append([])
            size = 0
        shares[-1].append(item)
        size += item[2]
    return [sh for sh in shares if sh]


def _copy_share(items: list[_Item]) -> list[int]:
    """Copy one thread's ranges, adjacent ones as one memmove; returns no checksums."""
    run_src, run_dst, run_n = items[0][0], items[0][1], 0
    for src, dst, n in items:
        if src != run_src + run_n or dst != run_dst + run_n:
            ctypes.memmove(run_dst, run_src, run_n)
            run_src, run_dst, run_n = src, dst, 0
        run_n += n
    ctypes.memmove(run_dst, run_src, run_n)
    return []


def _checksum_share(items: list[_Item]) -> list[int]:
    """Copy one thread's ranges, each with its checksum computed on the way."""
    return [copy_checksum(dst, src, n) for src, dst, n in items]


class CopyThreads:
    """An engine's copy threads: the cores its copies (and a lease's checksums) may use.

    Args:
        threads: how many; a copy is cut into this many shares, and all copies together run
            at most this many shares at once.
        thread_init: run once on each thread (the sidecar widens CPU affinity there).
    """

    def __init__(self, threads: int = 2, thread_init: Callable[[], None] | None = None):
        self.threads = max(1, threads)
        #: The threads themselves (the sidecar also hashes a lease's chunks on them).
        self.executor = concurrent.futures.ThreadPoolExecutor(
            self.threads, thread_name_prefix="kvmove-copy", initializer=thread_init)
        # One slot per share running, on a copy thread or a caller's: the cap on cores used.
        self._slots = threading.BoundedSemaphore(self.threads)

    def run(self, work: Callable[[list[_Item]], list[int]], shares: list[list[_Item]],
            nbytes: int) -> list[list[int]]:
        """``work`` on each share; returns the results in order once every share is done
        (no copy may outlive the caller's reservation), raising the first failure.

        The caller runs the first share itself and the copy threads the others: a hop to a
        copy thread and back is two thread wake-ups, each up to a few hundred microseconds on
        a host whose idle CPUs halt (a VM: benchmarks/README.md, "a small move's time") —
        as much as a 4 MiB copy. Small copies (<= 1 MiB) run inline, uncounted."""
        if nbytes <= _INLINE_BYTES:
            return [work(share) for share in shares]

        def in_slot(share: list[_Item]) -> list[int]:
            with self._slots:
                return work(share)

        # (More than _INLINE_BYTES: at least one share.)
        futures = [self.executor.submit(in_slot, share) for share in shares[1:]]
        try:
            first = in_slot(shares[0])
        finally:
            concurrent.futures.wait(futures)
        return [first] + [f.result() for f in futures]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)


class PeerPools:
    """The peer pools this engine has mapped (see the module docstring).

    Args:
        threads: copy threads of its own to make, when ``copy_threads`` is None.
        copy_threads: the engine's copy threads, shared with their owner (the sidecar), who
            shuts them down.
    """

    def __init__(self, threads: int = 2, copy_threads: CopyThreads | None = None):
        self._own_threads = copy_threads is None
        self.copy_threads = copy_threads or CopyThreads(threads)
        self._boot_id, self._pid_ns = boot_id(), pid_namespace()
        self._pools: dict[tuple[int, int], MappedPool] = {}  # (pid, inode) -> mapping
        self._lock = threading.Lock()

    def get(self, handle: PoolHandle | None) -> MappedPool | None:
        """The peer's pool, mapped (reused if already mapped and the peer still lives).

        Returns:
            The mapping, or None when the pool cannot be mapped from here (another host or
            pid namespace, no permission, not the announced size, not sealed against
            shrinking): then use NIXL.
        Raises:
            TransferError: the peer shares our host and pid namespace, and its process (or
                its pool: another inode behind its pid) is gone — NIXL could not reach it
                either, so say so at once.
        """
        if handle is None or not handle.boot_id or handle.boot_id != self._boot_id:
            return None
        if handle.pid_ns != self._pid_ns or handle.pid == os.getpid():
            return None  # pids not comparable; or our own pool (NIXL handles that, if asked)
        key = (handle.pid, handle.inode)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                if pool.still_the_peer():
                    return pool
                del self._pools[key]
                pool.close()
                raise TransferError(f"the source process (pid {handle.pid}) exited")
            pool = self._map(handle)
            if pool is not None:
                self._pools[key] = pool
            return pool

    def _map(self, h: PoolHandle) -> MappedPool | None:
        try:
            fd = os.open(f"/proc/{h.pid}/fd/{h.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TransferError(f"the source process (pid {h.pid}) is not running") from None
        except OSError as e:
            logger.info("cannot map the pool of pid %d (%s): reading over NIXL", h.pid, e)
            return None
        try:
            st = os.fstat(fd)
            if st.st_ino != h.inode:
                os.close(fd)
                raise TransferError(f"pid {h.pid} no longer holds the announced pool (the "
                                    f"source process exited and its pid was reused)")
            if st.st_size != h.nbytes:
                logger.warning("the pool of pid %d has %d bytes, not %d: reading over NIXL",
                               h.pid, st.st_size, h.nbytes)
                os.close(fd)
                return None
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK == 0:
                logger.warning("the pool of pid %d could shrink under a copy (not sealed): "
                               "reading over NIXL", h.pid)
                os.close(fd)
                return None
            mapping = mmap.mmap(fd, h.nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as e:
            os.close(fd)
            logger.info("cannot map the pool of pid %d (%s): reading over NIXL", h.pid, e)
            return None
        logger.info("mapped the pool of pid %d (%.2f GiB) for same-host copies", h.pid,
                    h.nbytes / 2**30)
        return MappedPool(h, mapping, fd, self.copy_threads)

    def sweep(self) -> int:
        """Unmap the pools of peers that are gone; returns how many were dropped."""
        with self._lock:
            gone = [k for k, p in self._pools.items() if not p.still_the_peer()]
            for k in gone:
                self._pools.pop(k).close()
        if gone:
            logger.info("unmapped %d pool(s) of peers that exited", len(gone))
        return len(gone)

    def close(self) -> None:
        """Unmap everything and stop the copy threads (if its own)."""
        with self._lock:
            for p in self._pools.values():
                p.close()
            self._pools.clear()
        if self._own_threads:
            self.copy_threads.shutdown()
