"""Fixtures every test package may use. Helpers live in ``tests/harness``."""

from __future__ import annotations

import pytest

from tests.harness.fleet import Fleet
from tests.harness.stores import tiny_layout
from vllm_kvmove.layout import KVLayout


@pytest.fixture
def layout() -> KVLayout:
    return tiny_layout()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A real controller process and real in-process sidecars, no vLLM
    (:class:`tests.harness.fleet.Fleet`), one per test module."""
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    try:
        yield f
    finally:
        f.close()
