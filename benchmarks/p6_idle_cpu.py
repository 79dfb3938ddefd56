"""P6 — idle CPU of an engine with the connector (its sidecar, NIXL agent, lookup server)
against the same engine without the connector, both idle for 30 s in the same window.

CPU time is utime + stime of each engine's whole process tree (API server, engine core,
worker and their threads) from /proc, over the same 30 s; reported in percent of one core.
"""

from __future__ import annotations

import time

from common import Result, engine_cluster, process_tree_cpu_seconds

WINDOW_S = 30.0


def run() -> list[Result]:
    env = engine_cluster()
    time.sleep(5)  # let the previous benchmark's work drain
    a0, b0 = process_tree_cpu_seconds(env["a"].pid), process_tree_cpu_seconds(env["b"].pid)
    t0 = time.monotonic()
    time.sleep(WINDOW_S)
    dt = time.monotonic() - t0
    a = (process_tree_cpu_seconds(env["a"].pid) - a0) / dt * 100
    b = (process_tree_cpu_seconds(env["b"].pid) - b0) / dt * 100
    return [Result(id="P6", measure="idle CPU of an engine with the connector, 30 s", value=a,
                   unit="% of a core", baseline={"without_connector_%": b}, ratio=a - b,
                   goal="< 2 percentage points more", met=(a - b) < 2.0,
                   notes="ratio column is the difference in percentage points")]
