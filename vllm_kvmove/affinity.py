"""CPU affinity of the threads vllm-kvmove starts inside an engine's worker process.

vLLM's CPU worker binds each of its threads to the engine's OpenMP core before the connector
runs, and threads inherit that mask. The sidecar's threads call :func:`widen_cpu_affinity`
(every CPU of the cgroup). The connector's load helpers run on :func:`cpus_beside` the
forward's, are moved with :func:`set_thread_cpus` (onto the forward's own CPUs when one was
starved there: a thread queued on a core another engine keeps busy waited, runnable, for
seconds), and go back once an :class:`IdleMeter` says those CPUs are idle again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterable

logger = logging.getLogger(__name__)


def widen_cpu_affinity() -> None:
    """Let the calling thread (and the threads it starts: NIXL's progress thread, UCX's async
    thread, the to_thread workers) run on every CPU the process may use.

    vLLM's CPU worker binds each of its threads to the engine's OpenMP core before the
    connector starts us, and threads inherit that mask. Kept there, a NIXL transfer posted by
    the sidecar waits for UCX's threads to be scheduled on a core busy with the engine
    (measured: 0.15-3.3 ms for a 128 KiB read that takes 0.05 ms unpinned), and the sidecar's
    work competes with the forward pass on its one core instead of using idle ones.
    """
    set_thread_cpus(0, allowed_cpus())


def cpus_beside(busy: Iterable[int]) -> set[int]:
    """The CPUs this process may use but those in ``busy`` (the forward thread's), or all of
    them when none is left."""
    allowed = allowed_cpus()
    return (allowed - set(busy)) or allowed


def set_thread_cpus(tid: int, cpus: set[int]) -> bool:
    """Set the CPU mask of thread ``tid`` of this process (0: the calling thread). Returns
    whether it was set; an error (no such CPU, the thread gone) is logged at debug and
    changes nothing. A runnable thread whose current CPU leaves its mask moves at once."""
    try:
        if cpus and cpus != os.sched_getaffinity(tid):
            os.sched_setaffinity(tid, cpus)
        return True
    except OSError as e:
        logger.debug("could not set thread %d's CPU affinity to %s: %s", tid, sorted(cpus), e)
        return False


def allowed_cpus() -> set[int]:
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


class IdleMeter:
    """How idle some CPUs have been since the last look (``/proc/stat``: idle and iowait
    ticks against all ticks, per CPU). Each call measures the window since the previous call;
    a window shorter than ``min_window_s`` returns the previous answer, since ticks are 10 ms.
    ~50 µs a call. :meth:`sample_every` keeps :attr:`recent` (the last window's answer)
    fresh from a daemon thread: a load helper's choice must reflect the last tenth of a
    second, not the seconds since the previous load (a long window mixed a prefill on that
    core, seconds before, into "now")."""

    def __init__(self, cpus: Iterable[int], min_window_s: float = 0.1):
        self.cpus = sorted(cpus)
        self.min_window_s = min_window_s
        self._last: tuple[float, dict[int, tuple[int, int]]] | None = None
        self._answer: float | None = None
        self.recent: float | None = None  # set by sample_every's thread

    def sample_every(self, interval_s: float = 0.1) -> None:
        """Start a daemon thread that measures every ``interval_s`` into :attr:`recent`
        (one ``/proc/stat`` read a tenth of a second: ~0.05 % of a core)."""
        def loop() -> None:
            while True:
                self.recent = self.idle_fraction()
                time.sleep(interval_s)

        threading.Thread(target=loop, daemon=True, name="kvmove-idle-meter").start()

    def idle_fraction(self) -> float | None:
        """The CPUs' idle share of the window since the previous call, 0..1 (averaged over
        them); None at the first call or when ``/proc/stat`` cannot be read."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.min_window_s:
            return self._answer
        sample = _cpu_ticks(self.cpus)
        if sample is None:
            return None
        if self._last is not None:
            idle = total = 0
            for cpu, (i1, t1) in sample.items():
                i0, t0 = self._last[1].get(cpu, (i1, t1))
                idle, total = idle + i1 - i0, total + t1 - t0
            self._answer = idle / total if total > 0 else self._answer
        self._last = (now, sample)
        return self._answer


def _cpu_ticks(cpus: Iterable[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle + iowait ticks, all ticks)}`` from ``/proc/stat``."""
    wanted = {f"cpu{c}" for c in cpus}
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name in wanted:
                    ticks = [int(x) for x in rest.split()]
                    out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks[:8]))
    except (OSError, ValueError, IndexError):
        return None
    return out
