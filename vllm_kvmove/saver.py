"""Save queues: the connector's copies of completed prompt chunks from the paged cache into the
store, run where the forward pass does not wait for them, each chunk committed once its bytes
are all in the pool.

Contract
--------
* Owner: the connector's worker side, one queue per worker process (rank), built by
  :func:`save_queue` from the cache's device and the ``save_mode`` setting. Calls come from
  the **forward thread** only:
    - ``submit(copies, blocks, done)`` in ``wait_for_save``, after the step's forward: the
      copies of one chunk (zero-argument callables bound to the cache's source blocks and a
      slot the caller reserved, :func:`vllm_kvmove.layout.block_copiers`), the paged-cache
      block ids they read, and ``done(ok)``;
    - ``fence(blocks)`` in ``handle_preemptions``, before a step's forward: the step may write
      into ``blocks`` (the scheduler gave them to a request this step), so every save still
      reading one of them must be complete before the forward writes;
    - ``flush()`` before the store goes away (shutdown), and ``close()``.
  The queue knows nothing of vLLM or the store.
* ``done(ok)`` is called exactly once per submit, after every copy of that submit completed
  (``ok=True``) or one of them failed (``ok=False``) — on the forward thread (inline mode),
  the saver thread, or the completion thread (CUDA); it must be thread-safe (the connector
  commits or aborts the chunk's reservation there: a chunk becomes visible only once its
  bytes are all in the pool). Submits complete in submission order.
* Why a fence and not a delayed free: a block a save reads belongs to a running request (a
  complete prompt block is never rewritten while its request runs; a partial last block's
  slots past the chunk's tokens may be, and those bytes are no KV of the chunk) until vLLM
  frees it — and vLLM writes into a freed block only after its scheduler gave it to a
  request again, which the next step's ``fence`` names. So nothing waits unless a block is
  reused while its save is in flight, and on CUDA even that wait is the device's: the
  forward's stream waits for the save's event, the host does not block.
* Modes (:func:`save_queue`):
    - :class:`InlineSaves` — the copies run inside ``submit`` on the forward thread, after
      the forward (host caches' default: a memcpy on the core the forward has just
      finished with; serving throughput with every prompt saved measured no loss, P5);
    - :class:`ThreadSaves` — host caches, ``save_mode: background``: one saver thread, on
      the CPUs beside the forward's, runs submits in order; a fence waits for the fenced
      submits on the host;
    - :class:`StreamSaves` — CUDA caches (``auto``, ``background``): a side stream waits for
      the forward's work (an event recorded on the forward's stream at ``submit``), then runs
      the gathers and the device-to-host copies into the pool without blocking the host
      (the pool is page-locked with ``cudaHostRegister`` by :func:`pin_host_memory`); a
      completion thread waits for each submit's event and calls ``done``; a fence makes the
      forward's stream wait for the fenced submits' events.
* Failures: a copy that raises ends its submit with ``done(False)`` (the caller aborts the
  reservation: nothing half-written becomes visible) and the queue goes on; ``submit``
  itself re-raises in inline mode, as a failing copy on the forward thread always did.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from vllm_kvmove.affinity import set_thread_cpus

logger = logging.getLogger(__name__)

SAVE_MODES = ("auto", "inline", "background")

Copy = Callable[[], None]
Done = Callable[[bool], None]


@dataclass
class _Submit:
    copies: Sequence[Copy]
    blocks: frozenset[int]
    done: Done
    finished: threading.Event = field(default_factory=threading.Event)
    event: object = None  # CUDA: the side stream's event recorded after the copies


def _run(submit: _Submit) -> bool:
    """Run a submit's copies; False (logged) when one raised."""
    try:
        for copy in submit.copies:
            copy()
        return True
    except Exception:  # noqa: BLE001 - reported through done(False)
        logger.exception("a chunk's save failed; the chunk is not stored")
        return False


def _finish(submit: _Submit, ok: bool) -> None:
    try:
        submit.done(ok)
    except Exception:  # noqa: BLE001 - the caller's commit; the queue must go on
        logger.exception("a chunk's save completion failed")
    finally:
        submit.finished.set()


class InlineSaves:
    """Copies run inside :meth:`submit`, on the forward thread; nothing is ever in flight."""

    mode = "inline"

    def submit(self, copies: Sequence[Copy], blocks: Iterable[int], done: Done) -> None:
        """Run ``copies`` now, then ``done(ok)``.

        Raises:
            Exception: what a copy raised (after ``done(False)``).
        """
        try:
            for copy in copies:
                copy()
        except BaseException:
            done(False)
            raise
        done(True)

    def fence(self, blocks: Iterable[int]) -> int:
        """Nothing is in flight: returns 0 (submits fenced)."""
        return 0

    def flush(self) -> None:
        return None

    def in_flight(self) -> int:
        return 0

    def close(self) -> None:
        return None


class _Queued:
    """Submits in flight, in order, with the blocks they read (shared by the queued modes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[_Submit] = []  # submitted, ``done`` not yet called

    def _track(self, s: _Submit) -> None:
        with self._lock:
            self._pending.append(s)

    def _untrack(self, s: _Submit) -> None:
        with self._lock:
            self._pending.remove(s)

    def _reading(self, blocks: Iterable[int]) -> list[_Submit]:
        wanted = set(blocks)
        with self._lock:
            return [s for s in self._pending if not wanted.isdisjoint(s.blocks)]

    def in_flight(self) -> int:
        """Submits whose ``done`` has not been called yet."""
        with self._lock:
            return len(self._pending)

    def flush(self) -> None:
        """Return once every submit so far has called ``done``."""
        with self._lock:
            pending = list(self._pending)
        for s in pending:
            s.finished.wait()


class ThreadSaves(_Queued):
    """Host caches, ``save_mode: background``: one saver thread runs submits in order.

    Args:
        cpus: the CPUs the saver thread runs on (the connector: those beside the forward's);
            None: the creating thread's.
    """

    mode = "background"

    def __init__(self, cpus: set[int] | None = None) -> None:
        super().__init__()
        self._cpus = cpus
        self._queue: queue.SimpleQueue[_Submit | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, daemon=True, name="kvmove-save")
        self._thread.start()

    def submit(self, copies: Sequence[Copy], blocks: Iterable[int], done: Done) -> None:
        """Queue one chunk's ``copies`` (reading paged-cache ``blocks``); returns at once."""
        s = _Submit(list(copies), frozenset(blocks), done)
        self._track(s)
        self._queue.put(s)

    def fence(self, blocks: Iterable[int]) -> int:
        """Wait (host) for the submits reading any of ``blocks``; returns how many it waited
        for."""
        reading = self._reading(blocks)
        for s in reading:
            s.finished.wait()
        return len(reading)

    def _work(self) -> None:
        if self._cpus:
            set_thread_cpus(0, self._cpus)
        while True:
            s = self._queue.get()
            if s is None:
                return
            _finish(s, _run(s))
            self._untrack(s)  # after done: flush() waits for every done it saw pending

    def close(self) -> None:
        """Finish what was submitted, then stop the thread."""
        self._queue.put(None)
        self._thread.join()


class StreamSaves(_Queued):
    """CUDA caches: copies on a side stream after the forward's work, completions on a thread.

    Args:
        device: the cache's CUDA device.
    """

    mode = "background"

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self._stream = torch.cuda.Stream(device=device)
        self._queue: queue.SimpleQueue[_Submit | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._complete, daemon=True,
                                        name="kvmove-save-done")
        self._thread.start()

    def submit(self, copies: Sequence[Copy], blocks: Iterable[int], done: Done) -> None:
        """Issue one chunk's ``copies`` on the side stream, after everything the forward's
        stream has queued so far (its writes of these blocks); returns without waiting for
        the device. The copies must be non-blocking (device-to-host into page-locked memory:
        :func:`vllm_kvmove.layout.block_copiers` with ``non_blocking=True``)."""
        s = _Submit(list(copies), frozenset(blocks), done)
        forward = torch.cuda.current_stream(self.device)
        self._track(s)
        with torch.cuda.stream(self._stream):
            self._stream.wait_stream(forward)
            if not _run(s):
                # What was issued may still be running: done(False) once the stream is past it.
                s.done = _failed(s.done)
            s.event = torch.cuda.Event()
            s.event.record(self._stream)
        self._queue.put(s)

    def fence(self, blocks: Iterable[int]) -> int:
        """Make the forward's stream wait (on the device) for the submits reading any of
        ``blocks``; the host does not wait. Returns how many were fenced."""
        reading = self._reading(blocks)
        forward = torch.cuda.current_stream(self.device)
        for s in reading:
            forward.wait_event(s.event)
        return len(reading)

    def _complete(self) -> None:
        while True:
            s = self._queue.get()
            if s is None:
                return
            s.event.synchronize()  # releases the GIL while it waits
            _finish(s, True)
            self._untrack(s)

    def close(self) -> None:
        """Finish what was submitted, then stop the completion thread."""
        self._queue.put(None)
        self._thread.join()


def _failed(done: Done) -> Done:
    return lambda ok: done(False)


def pin_host_memory(ptr: int, nbytes: int) -> bool:
    """Page-lock ``nbytes`` of host memory at ``ptr`` for the CUDA devices
    (``cudaHostRegister``), so device-to-host copies into it run asynchronously at the link's
    speed (into pageable memory CUDA stages them, synchronously). Commits the memory. Returns
    False, with a warning, where that fails — the copies still work, only slower."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    except (AttributeError, RuntimeError) as e:
        logger.warning("cannot page-lock the store's pool (%s); saves copy into pageable "
                       "memory, synchronously", e)
        return False
    if int(err) != 0:
        logger.warning("cudaHostRegister of the store's pool (%d bytes) failed with error %s; "
                       "saves copy into pageable memory, synchronously", nbytes, err)
        return False
    return True


def save_queue(mode: str, device: torch.device, cpus: set[int] | None = None
               ) -> InlineSaves | ThreadSaves | StreamSaves:
    """The save queue for a cache on ``device`` in ``save_mode`` ``mode``.

    Args:
        mode: ``"auto"`` (background on CUDA, inline on the host), ``"inline"`` or
            ``"background"``.
        device: the paged cache's device.
        cpus: where a host cache's saver thread runs (``background``).
    Raises:
        ValueError: an unknown mode.
    """
    if mode not in SAVE_MODES:
        raise ValueError(f"save_mode {mode!r}: expected one of {', '.join(SAVE_MODES)}")
    if mode == "inline" or (mode == "auto" and device.type != "cuda"):
        return InlineSaves()
    if device.type == "cuda":
        return StreamSaves(device)
    return ThreadSaves(cpus)
