"""The connector's save/load copies on LBHNC, LBNHC and buffer-sharing KV caches, and its
background saves (tests/gpu/copy_paths.py): on the CPU always, on CUDA where present (skipped
otherwise)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.copy_paths import ORDERS, check, check_background_saves

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ORDERS)
def test_save_and_load_move_each_blocks_physical_bytes(order, device):
    r = check(order, device)
    print(f"\n[gpu] {device} {order}: save {r['save_GBps']:.2f} GB/s (plain {r['plain_to_host_GBps']:.2f}), "
          f"load {r['load_GBps']:.2f} GB/s (plain {r['plain_to_device_GBps']:.2f})")
    assert all(v > 0 for v in r.values())


@pytest.mark.parametrize("device", DEVICES)
def test_background_saves_wait_for_the_forward_and_fences_hold_overwrites_back(device):
    r = check_background_saves(device)
    print(f"\n[gpu] {device} background saves: {r['save_GBps']:.2f} GB/s "
          f"(plain {r['plain_to_host_GBps']:.2f}), pool page-locked: {bool(r['pinned'])}")
    assert r["save_GBps"] > 0 and r["pinned"] == (device == "cuda")
