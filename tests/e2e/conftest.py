"""One real cluster per test package: the seed's controller and two vLLM engines with the
connector (:class:`tests.harness.engines.SeedCluster`), started once and shared by every e2e
test; teardown (when the e2e package is done) stops every process by PID."""

from __future__ import annotations

import pytest

from tests.harness.engines import SeedCluster


@pytest.fixture(scope="package")  # stopped before other packages start their engines
def cluster(tmp_path_factory):
    c = SeedCluster(tmp_path_factory.mktemp("e2e"))
    print(f"\n[e2e] controller + 2 engines ready in {c.startup_s:.1f} s")
    try:
        yield c
    finally:
        c.close()
