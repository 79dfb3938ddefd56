"""LayerLoader: a step's load pieces run in layer order, on helpers and on the waiting forward
thread; a layer's wait returns only when that layer's (and earlier layers') pieces have run;
failures and a forward that never waited come back as blocks to recompute."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from vllm_kvmove.layout import block_copier
from vllm_kvmove.loader import CopyPiece, LayerLoader


def _recorder(log: list, layer: int, block: int, delay: float = 0.0):
    def run() -> None:
        time.sleep(delay)
        log.append((layer, block, threading.current_thread().name))
    return CopyPiece(layer, run, (block,), 10)


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_a_layer_wait_returns_once_that_layer_and_earlier_ones_are_loaded(threads):
    loader = LayerLoader(4, threads)
    try:
        log: list = []
        # Given out of order: the loader sorts them by layer.
        pieces = [_recorder(log, layer, b, 0.002) for layer in (3, 1, 0, 2) for b in range(3)]
        loader.start(pieces)
        loader.wait_layer(1)
        done = {(layer, b) for layer, b, _ in log}
        assert {(layer, b) for layer in (0, 1) for b in range(3)} <= done
        if threads == 0:  # nothing beyond the waited layer runs before it is asked for
            assert all(layer <= 1 for layer, _, _ in log)
        assert loader.finish() == set()
        assert len(log) == 12
        if threads == 0:  # one thread runs them all: strictly in layer order
            layers = [layer for layer, _, _ in log]
            assert layers == sorted(layers)
        assert loader.last_step[0] == 120
    finally:
        loader.close()


def test_helpers_copy_while_the_forward_thread_is_busy_and_it_helps_when_it_waits():
    loader = LayerLoader(2, threads=1)
    try:
        log: list = []
        loader.start([_recorder(log, layer, b, 0.01) for layer in (0, 1) for b in range(4)])
        time.sleep(0.1)  # the "forward" computes something else; the helper runs meanwhile
        assert len(log) >= 4, log
        loader.wait_layer(1)
        loader.finish()
        names = {name for _, _, name in log}
        assert "kvmove-load-0" in names
    finally:
        loader.close()


def test_the_waiting_forward_thread_runs_pieces_itself(caplog):
    loader = LayerLoader(1, threads=1)
    loader.warn_after_s = 0.1
    gate, taken = threading.Event(), threading.Event()

    def stuck() -> None:
        taken.set()
        gate.wait(10)

    try:
        log: list = []
        # The helper is stuck in the first piece; the waiting forward thread runs the rest.
        loader.start([CopyPiece(0, stuck, (0,), 1)] +
                     [_recorder(log, 0, b) for b in range(1, 4)])
        assert taken.wait(5)
        waiter = threading.Thread(target=loader.wait_layer, args=(0,), name="forward")
        waiter.start()
        deadline = time.monotonic() + 5
        while len(log) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert [name for _, _, name in log] == ["forward"] * 3
        assert waiter.is_alive()  # still waiting for the helper's piece
        time.sleep(0.2)  # past warn_after_s: the wait is logged
        assert any("waited" in r.getMessage() and "1 of 1 helpers alive" in r.getMessage()
                   for r in caplog.records), caplog.text
        gate.set()
        waiter.join(5)
        assert not waiter.is_alive()
        assert loader.finish() == set()
    finally:
        gate.set()
        loader.close()


def test_a_failed_piece_is_reported_and_the_others_still_run():
    loader = LayerLoader(2, threads=1)
    try:
        log: list = []

        def boom() -> None:
            raise RuntimeError("copy failed")

        loader.start([CopyPiece(0, boom, (7, 8), 1), _recorder(log, 0, 1), _recorder(log, 1, 2)])
        loader.wait_layer(0)
        loader.wait_layer(1)
        assert loader.finish() == {7, 8}
        assert len(log) == 2
        assert not loader.never_waited
        assert loader.finish() == set()  # nothing in flight: nothing to report twice
    finally:
        loader.close()


def test_a_forward_that_never_waited_gets_every_block_of_the_step_back():
    loader = LayerLoader(2, threads=1)
    try:
        log: list = []
        loader.start([_recorder(log, 0, 1), _recorder(log, 1, 2)])
        bad = loader.finish()  # no wait_layer: the forward may have read them unloaded
        assert bad == {1, 2} and loader.never_waited
        assert len(log) == 2  # still, every piece ran before finish returned
        loader.start([_recorder(log, 0, 3)])
        loader.wait_layer(0)
        assert loader.finish() == set() and not loader.never_waited
    finally:
        loader.close()


def test_start_refuses_a_second_step_before_the_first_is_finished():
    loader = LayerLoader(1, threads=0)
    try:
        loader.start([_recorder([], 0, 1)])
        with pytest.raises(AssertionError):
            loader.start([_recorder([], 0, 2)])
        loader.finish()
        loader.start([])  # an empty step is nothing in flight
        loader.start([_recorder([], 0, 3)])
        loader.finish()
    finally:
        loader.close()


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_layer_wise_block_copies_land_byte_for_byte(threads):
    """The connector's use: per (chunk, layer) block copies from a store slot into scattered
    paged-cache blocks."""
    torch.manual_seed(0)
    layers, blocks_per_chunk, slab = 4, 2, 4096
    cache = [torch.zeros(16, slab, dtype=torch.uint8) for _ in range(layers)]
    chunks = [torch.randint(0, 255, (blocks_per_chunk, layers, slab), dtype=torch.uint8)
              for _ in range(3)]
    targets = [[5, 2], [9, 10], [0, 14]]
    loader = LayerLoader(layers, threads)
    try:
        pieces = [CopyPiece(li, block_copier(cache[li], t, chunks[c][:, li],
                                             range(blocks_per_chunk)), tuple(t), slab * len(t))
            for c, t in enumerate(targets) for li in range(layers)]
        loader.start(pieces)
        for li in range(layers):
            loader.wait_layer(li)
            for c, t in enumerate(targets):  # this layer is complete when its wait returns
                for w, b in enumerate(t):
                    assert torch.equal(cache[li][b], chunks[c][w, li])
        assert loader.finish() == set()
        assert loader.last_step[0] == layers * 6 * slab
    finally:
        loader.close()


def _rescued_step(loader: LayerLoader, beside: set[int], own: set[int]) -> int:
    """Run a step whose one piece keeps its helper busy until the waiting forward has moved
    the helper onto ``own``; returns the helper's thread id."""
    gate, taken = threading.Event(), threading.Event()

    def stuck() -> None:
        taken.set()
        gate.wait(10)

    try:
        loader.start([CopyPiece(0, stuck, (0,), 1)])
        assert taken.wait(5)
        (tid,) = loader._tids
        assert os.sched_getaffinity(tid) == beside
        waiter = threading.Thread(target=loader.wait_layer, args=(0,))
        waiter.start()
        deadline = time.monotonic() + 5
        while os.sched_getaffinity(tid) != own and time.monotonic() < deadline:
            time.sleep(0.002)
        assert os.sched_getaffinity(tid) == own and loader.rescues == 1
    finally:
        gate.set()
    waiter.join(5)
    assert loader.finish() == set()
    return tid


TWO_CPUS = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")


@TWO_CPUS
def test_a_forward_kept_waiting_by_a_helper_moves_it_onto_its_own_cpus_until_the_next_step():
    """A helper on another engine's busy core can sit runnable for seconds: the waiting
    forward moves it onto its own (idle while it waits) CPUs, and start() moves it back."""
    cpus = sorted(os.sched_getaffinity(0))
    beside, own = {cpus[0]}, {cpus[1]}
    loader = LayerLoader(1, threads=1, cpus=beside, rescue_cpus=own)
    try:
        tid = _rescued_step(loader, beside, own)
        loader.start([_recorder([], 0, 1)])  # the next step: back beside the forward
        assert os.sched_getaffinity(tid) == beside
        loader.wait_layer(0)
        loader.finish()
    finally:
        loader.close()


@TWO_CPUS
def test_after_a_rescue_helpers_sit_out_until_use_helpers_says_their_cpus_are_spare():
    cpus = sorted(os.sched_getaffinity(0))
    beside, own = {cpus[0]}, {cpus[1]}
    answers: list[bool] = [False, True]
    loader = LayerLoader(2, threads=1, cpus=beside, rescue_cpus=own,
                         use_helpers=lambda: answers.pop(0))
    try:
        tid = _rescued_step(loader, beside, own)
        assert answers == [False, True]  # not asked before a rescue
        steps = loader.helper_steps
        log: list = []
        loader.start([_recorder(log, layer, b, 0.002) for layer in (0, 1) for b in range(3)])
        time.sleep(0.05)
        assert log == []  # nobody copies ahead: the forward copies as it reaches each layer
        loader.wait_layer(1)
        loader.finish()
        assert {name for _, _, name in log} == {"MainThread"}
        assert loader.helper_steps == steps and os.sched_getaffinity(tid) == own
        log.clear()
        loader.start([_recorder(log, 0, b, 0.01) for b in range(3)])  # now spare again
        assert os.sched_getaffinity(tid) == beside
        time.sleep(0.05)
        assert len(log) >= 1 and loader.helper_steps == steps + 1  # the helper went ahead
        loader.wait_layer(0)
        loader.finish()
        assert answers == []
    finally:
        loader.close()


def test_the_idle_meter_reads_each_window_since_the_previous_look(monkeypatch):
    from vllm_kvmove import affinity

    real = affinity.IdleMeter(sorted(os.sched_getaffinity(0)), min_window_s=0.0)
    assert real.idle_fraction() is None  # no window yet
    time.sleep(0.05)
    fraction = real.idle_fraction()
    assert fraction is None or 0.0 <= fraction <= 1.0  # None: no tick in 50 ms
    samples = iter([{0: (100, 1000)}, {0: (190, 1100)}, {0: (200, 1200)}])
    monkeypatch.setattr(affinity, "_cpu_ticks", lambda cpus: next(samples))
    meter = affinity.IdleMeter([0], min_window_s=0.0)
    assert meter.idle_fraction() is None
    assert meter.idle_fraction() == pytest.approx(0.9)  # 90 of 100 ticks idle
    assert meter.idle_fraction() == pytest.approx(0.1)
