"""Run the benchmarks and write their JSON results.

    python benchmarks/run.py                 # all of P1..P10 (and P1c, P3b)
    python benchmarks/run.py --only P1,P4    # some
    python benchmarks/run.py --out FILE      # default benchmarks/results/latest.json

Each benchmark module ``pN_*.py`` has ``run() -> list[Result]`` and starts and stops its own
processes. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (REPO, USES_ENGINE_CLUSTER, Result, stop_engine_cluster, table,  # noqa: E402
                    write_results)

MODULES = {"P1": "p1_throughput", "P1C": "p1c_convert", "P2": "p2_ttft", "P3": "p3_lookup",
           "P3B": "p3b_fleet_index", "P4": "p4_small_move", "P5": "p5_serving",
           "P6": "p6_idle_cpu", "P7": "p7_hosts", "P8": "p8_drain", "P9": "p9_routing",
           "P10": "p10_cold_sizes"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(MODULES), help="comma-separated ids, e.g. P1,P4")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latest.json"))
    args = ap.parse_args()
    results = []
    order = [p.strip().upper() for p in args.only.split(",") if p.strip()]
    for i, pid in enumerate(order):
        t0 = time.monotonic()
        print(f"[bench] {pid} ({MODULES[pid]}) ...", flush=True)
        try:
            module = importlib.import_module(MODULES[pid])
            produced = module.run()
        except Exception as e:  # one benchmark's failure must not lose the others' figures
            traceback.print_exc()
            produced = [Result(id=pid, measure=f"{MODULES[pid]} failed", value=float("nan"),
                               unit="", baseline={}, ratio=None, goal="runs", met=False,
                               notes=f"{type(e).__name__}: {e}")]
        for r in produced:
            results.append(r)
            print(f"[bench] {r.id}: {r.value:.4g} {r.unit}, ratio {r.ratio}, goal {r.goal}: "
                  f"{'met' if r.met else 'NOT met'} ({time.monotonic() - t0:.0f} s)", flush=True)
        write_results(results, Path(args.out))  # after each, so a crash keeps what ran
        if not USES_ENGINE_CLUSTER & set(order[i + 1:]):
            stop_engine_cluster()
    print()
    print(table(results))
    print(f"\n[bench] results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
