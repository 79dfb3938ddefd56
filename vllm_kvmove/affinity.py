"""CPU affinity of the threads vllm-kvmove starts inside an engine's worker process.

vLLM's CPU worker binds each of its threads to the engine's OpenMP core before the connector
runs, and threads inherit that mask: the sidecar's threads and the connector's load helpers
call :func:`widen_cpu_affinity` first, so their work goes to idle cores instead of competing
with the forward pass on its one.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

logger = logging.getLogger(__name__)


def widen_cpu_affinity(avoid: Iterable[int] = ()) -> None:
    """Let the calling thread (and the threads it starts: NIXL's progress thread, UCX's async
    thread, the to_thread workers) run on every CPU the process may use — but those in
    ``avoid``, when any other is left.

    vLLM's CPU worker binds each of its threads to the engine's OpenMP core before the
    connector starts us, and threads inherit that mask. Kept there, a NIXL transfer posted by
    the sidecar waits for UCX's threads to be scheduled on a core busy with the engine
    (measured: 0.15-3.3 ms for a 128 KiB read that takes 0.05 ms unpinned), and the sidecar's
    work competes with the forward pass on its one core instead of using idle ones.

    ``avoid``: the forward thread's CPUs, for threads that copy *while* the forward runs (the
    connector's load helpers): with the forward's core in their mask, the kernel woke them on
    the waker's core (measured: 190 of 256 pieces of a load ran on the forward's core while
    the other core idled, 4.4 GB/s instead of 8).
    """
    try:
        allowed = _allowed_cpus()
        cpus = (allowed - set(avoid)) or allowed
        if cpus and cpus != os.sched_getaffinity(0):
            os.sched_setaffinity(0, cpus)  # pid 0: the calling thread only
    except OSError as e:
        logger.debug("could not widen this thread's CPU affinity: %s", e)


def _allowed_cpus() -> set[int]:
    """CPUs this cgroup may use (cgroup v2 cpuset), else every online CPU."""
    try:
        spec = open("/sys/fs/cgroup/cpuset.cpus.effective").read().strip()
    except OSError:
        spec = ""
    cpus: set[int] = set()
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus or set(range(os.cpu_count() or 1))
