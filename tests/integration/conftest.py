"""Fixtures of the integration tests (a real controller process and real sidecars, no vLLM;
the ``fleet`` fixture is in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def pair(fleet):
    """Two in-process sidecars, ``a`` and ``b``, of the tiny layout."""
    return fleet.add_sidecar("a"), fleet.add_sidecar("b")
