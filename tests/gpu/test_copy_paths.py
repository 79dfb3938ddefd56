"""The connector's save/load copies on LBHNC, LBNHC and buffer-sharing KV caches
(tests/gpu/copy_paths.py): on the CPU always, on CUDA where present (skipped otherwise)."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.copy_paths import ORDERS, check

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ORDERS)
def test_save_and_load_move_each_blocks_physical_bytes(order, device):
    r = check(order, device)
    print(f"\n[gpu] {device} {order}: save {r['save_GBps']:.2f} GB/s (plain {r['plain_to_host_GBps']:.2f}), "
          f"load {r['load_GBps']:.2f} GB/s (plain {r['plain_to_device_GBps']:.2f})")
    assert all(v > 0 for v in r.values())
