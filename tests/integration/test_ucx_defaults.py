"""The NIXL agent's UCX defaults: tcp segments of 256 KiB (UCX's 8 KiB halved the throughput
between test hosts, benchmark P7) unless the operator set either size — then both are left as
the operator has them (UCX refuses a worker whose tx segment exceeds its rx one: found by this
test) — and UCX accepts them (the agent comes up)."""

from __future__ import annotations

import os

import torch

from tests.harness.processes import free_port
from vllm_kvmove.transfer import TCP_SEGMENT, NixlTransfer


def agent(name: str) -> NixlTransfer:
    pool = torch.empty(1 << 16, dtype=torch.uint8)
    return NixlTransfer(name, pool.data_ptr(), pool.numel(), "127.0.0.1", free_port())


def test_tcp_segments_default_to_256k(monkeypatch):
    monkeypatch.delenv("UCX_TCP_TX_SEG_SIZE", raising=False)
    monkeypatch.delenv("UCX_TCP_RX_SEG_SIZE", raising=False)
    agent("ucx-defaults").close()
    assert TCP_SEGMENT == "256k"
    assert os.environ["UCX_TCP_TX_SEG_SIZE"] == os.environ["UCX_TCP_RX_SEG_SIZE"] == "256k"


def test_an_operators_segment_size_is_kept_and_the_other_left_to_ucx(monkeypatch):
    monkeypatch.delenv("UCX_TCP_TX_SEG_SIZE", raising=False)
    monkeypatch.setenv("UCX_TCP_RX_SEG_SIZE", "64k")
    agent("ucx-operator").close()
    assert os.environ["UCX_TCP_RX_SEG_SIZE"] == "64k"
    assert "UCX_TCP_TX_SEG_SIZE" not in os.environ
