"""LayerLoader: copy one step's loads from the store into the paged cache layer by layer, so
that the copy of later layers overlaps the forward pass of earlier ones.

Contract
--------
* Owner: the connector's worker side, one per worker process; every call comes from the
  **forward thread**: ``start`` (in ``start_load_kv``, before the step's forward),
  ``wait_layer`` (in ``wait_for_layer_load``, when the forward reaches a layer's attention),
  ``finish`` (in ``wait_for_save``, after the forward, and before the next ``start``). The
  loader knows nothing of vLLM or the store: it runs copy *pieces* it is given — a few MiB of
  one layer's block copies each (:func:`vllm_kvmove.layout.block_copiers`) — and the caller
  holds the chunks until ``finish`` returns.
* Order and overlap: pieces run in layer order. ``threads`` helper threads (on ``cpus``:
  the connector gives them the CPUs beside the forward's) take pieces from the front of the
  queue; a forward thread waiting for layer *i* runs queued pieces of layers <= *i* itself
  rather than idle, so a wait uses the forward's core too. ``wait_layer(i)`` returns once every piece of layers
  <= *i* has run: the attention of layer *i* then reads loaded blocks, while the helpers go on
  with layer *i+1*. With ``threads=0`` nothing runs before ``wait_layer``/``finish``: the
  copies run on the forward thread, layer by layer, just before each layer needs them — the
  mode for CUDA caches, where the forward thread's copies are ordered on its stream before
  the layer's attention kernels.
* A starved helper: a helper on another core can wait there, runnable, for seconds while that
  core's owner runs (measured: another engine's busy worker kept a helper off its core for
  2-90 s, and the forward waited on the helper's piece all that time). A forward that has
  waited ``rescue_after_s`` for a helper's piece therefore moves the helpers onto
  ``rescue_cpus`` (its own, where it is only waiting). A piece in progress is never taken
  over: its copy may still be writing, so ``finish`` must wait for it before the chunks are
  released and vLLM may reuse the blocks.
* After a rescue the helpers sit out the following steps (the forward thread runs every piece
  itself, as with ``threads=0``) until ``use_helpers``, asked at each ``start``, says their
  CPUs are spare again (the connector: idle enough in the last tenth of a second); ``start``
  then moves them back. Asking before every step instead kept them out of 3-5 steps in 7
  beside an idle core (the engine's own API server and scheduler had just run there).
* What must not be deferred: a block the step itself writes (the block where the loaded
  prefix ends mid-block receives the step's first computed tokens, written into the cache
  before the layer's attention and so before ``wait_layer``) must be copied before the
  forward starts: the caller copies such pieces itself, before ``start``.
* Failures: a piece that raises is recorded with its destination blocks and the rest go on;
  ``finish`` returns the failed blocks (the connector reports them to vLLM, which recomputes
  them and discards the step's output of those requests). If the forward never called
  ``wait_layer`` in a step that loaded (an attention path without vLLM's
  ``maybe_transfer_kv_layer`` hook), it may have read blocks before they were loaded:
  ``finish`` then reports every block of the step, and the connector falls back to loading
  before the forward.
* Threads: helpers are daemon threads, started once; ``close`` stops them. ``last_step``
  gives the last load's bytes and its wall time from ``start`` to the end of its last piece
  (the load path's bytes per second, copies running alongside the forward).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from vllm_kvmove.affinity import set_thread_cpus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CopyPiece:
    """One copy of the load plan.

    Attributes:
        layer: index of the layer (in the connector's layer order) whose blocks it writes.
        run: performs the copy (raises on failure).
        blocks: destination paged-cache block ids it writes (reported if it fails).
        nbytes: bytes it copies (for ``last_step``).
    """

    layer: int
    run: Callable[[], None]
    blocks: tuple[int, ...]
    nbytes: int


class LayerLoader:
    """Runs one step's load pieces in layer order on helper threads and the forward thread.

    Args:
        num_layers: layers of the paged cache (``wait_layer`` takes 0..num_layers-1).
        threads: helper threads (0: the forward thread runs every piece, layer by layer,
            as the forward reaches it).
        cpus: CPUs the helpers run on (None: the creating thread's).
        rescue_cpus: CPUs a helper moves to when the forward has waited ``rescue_after_s``
            for it (the forward's own; None: never moved).
        use_helpers: asked at each ``start`` after a rescue: whether the helpers' CPUs are
            spare again (the connector: whether they have been idle); None: always.
    """

    def __init__(self, num_layers: int, threads: int = 1, cpus: set[int] | None = None,
                 rescue_cpus: set[int] | None = None,
                 use_helpers: Callable[[], bool] | None = None):
        self.num_layers = num_layers
        self.threads = max(0, threads)
        self._cond = threading.Condition()
        self._queue: deque[CopyPiece] = deque()
        self._remaining = [0] * num_layers  # pieces of each layer not yet run
        self._waited = False  # whether the forward has called wait_layer this step
        self._failed: set[int] = set()
        self._step_blocks: set[int] = set()
        self.never_waited = False  # the last finished step's forward never waited
        self._active = False
        self._t0 = self._t_last = 0.0
        self._in_flight = 0  # pieces of the step not yet run (queued or running)
        self._closed = False
        self._step_bytes = 0
        self.last_step: tuple[int, float] = (0, 0.0)  # (bytes, seconds) of the last load
        self.warn_after_s = 5.0  # a layer's wait this long is logged (it should take ms)
        self.rescue_after_s = 0.005  # normal waits for a helper's last piece: ~0.5 ms
        self._cpus, self._rescue_cpus = cpus, rescue_cpus
        self._tids: list[int] = []  # the helpers' native thread ids
        self.rescues = 0  # times the helpers were moved onto the forward's CPUs
        self._rescued = False
        self._use_helpers = use_helpers
        self._helpers_on = False  # whether the helpers take this step's pieces
        self.helper_steps = 0  # steps the helpers took part in
        self._workers = [threading.Thread(target=self._work, daemon=True,
                                          name=f"kvmove-load-{i}") for i in range(self.threads)]
        for t in self._workers:
            t.start()

    # -- forward thread -----------------------------------------------------------------
    def start(self, pieces: Iterable[CopyPiece]) -> None:
        """Queue a step's pieces (any order: they are sorted by layer) and return at once.
        Call ``finish`` before the next ``start``."""
        todo = sorted(pieces, key=lambda p: p.layer)
        helpers = bool(self.threads) and bool(todo)
        if helpers and self._rescued:
            # Starved beside the forward before: back there only once its CPUs look idle.
            if self._use_helpers is None or self._use_helpers():
                self._rescued = False
                self._place(self._cpus)
            else:
                helpers = False
        with self._cond:
            assert not self._active, "finish() the previous step's load first"
            if not todo:
                return
            self._helpers_on = helpers
            self.helper_steps += helpers
            self._active = True
            self._waited = False
            self._t0 = time.perf_counter()
            for p in todo:
                self._remaining[p.layer] += 1
                self._in_flight += 1
                self._step_blocks.update(p.blocks)
                self._step_bytes += p.nbytes
            self._queue.extend(todo)
            self._cond.notify_all()

    @property
    def active(self) -> bool:
        """Whether a step's load is in flight (started, not finished)."""
        return self._active

    def wait_layer(self, layer: int) -> None:
        """Return once every piece of layers <= ``layer`` has run, running queued ones on
        this thread meanwhile. Cheap when nothing is loading."""
        if not self._active:
            return
        idle, warned = 0.0, False  # seconds this call has waited on helpers' pieces
        while True:
            with self._cond:
                self._waited = True
                if not any(self._remaining[: layer + 1]):
                    return
                piece = (self._queue.popleft()
                         if self._queue and self._queue[0].layer <= layer else None)
                if piece is None:  # a helper runs the last of them: wait for it
                    w0 = time.monotonic()
                    self._cond.wait(0.001 if not self._rescued and self._rescue_cpus else 0.05)
                    idle += time.monotonic() - w0
                    if not self._rescued and self._rescue_cpus and idle > self.rescue_after_s:
                        self._rescued = True
                        self.rescues += 1
                        self._place(self._rescue_cpus)
                    if not warned and idle > self.warn_after_s:
                        warned = True  # a helper stuck in a copy: say so, once per wait
                        logger.warning(
                            "the forward has waited %.1f s for layer %d's load: %d pieces of "
                            "layers <= %d not done, %d queued, %d of %d helpers alive",
                            idle, layer, sum(self._remaining[: layer + 1]),
                            layer, len(self._queue),
                            sum(t.is_alive() for t in self._workers), self.threads)
                    continue
            self._run(piece)

    def finish(self) -> set[int]:
        """Run or wait for every remaining piece; end the step's load.

        Returns:
            Destination block ids that must be recomputed: those of pieces that failed; and
            every block of the step when the forward never called ``wait_layer`` (it may
            have read them before they were loaded; ``never_waited`` then says so).
        """
        if not self._active:
            return set()
        waited = self._waited
        self.wait_layer(self.num_layers - 1)
        with self._cond:
            self._active = False
            self.never_waited = not waited
            self.last_step = (self._step_bytes, self._t_last - self._t0)
            self._step_bytes = 0
            bad = self._failed if waited else self._failed | self._step_blocks
            self._failed, self._step_blocks = set(), set()
            return bad

    def close(self) -> None:
        """Stop the helpers (after finishing any step in flight)."""
        self.finish()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._workers:
            t.join(timeout=5)

    # -- helpers ------------------------------------------------------------------------
    def _place(self, cpus: set[int] | None) -> None:
        """Move every helper onto ``cpus`` (a runnable one moves at once)."""
        if cpus:
            for tid in list(self._tids):
                set_thread_cpus(tid, cpus)

    def _work(self) -> None:
        self._tids.append(threading.get_native_id())
        if self._cpus:
            set_thread_cpus(0, self._cpus)
        while True:
            with self._cond:
                while not (self._queue and self._helpers_on) and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                piece = self._queue.popleft()
            self._run(piece)

    def _run(self, piece: CopyPiece) -> None:
        ok = True
        try:
            piece.run()
        except Exception:  # one failed copy must not stop the others: vLLM recomputes it
            logger.exception("loading layer %d into blocks %s failed", piece.layer,
                             list(piece.blocks))
            ok = False
        with self._cond:
            if not ok:
                self._failed.update(piece.blocks)
            self._remaining[piece.layer] -= 1
            self._in_flight -= 1
            if not self._in_flight:
                self._t_last = time.perf_counter()
            self._cond.notify_all()
