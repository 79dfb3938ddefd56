"""Shared pieces of the benchmarks: results, statistics, the local model, the processes.

Every figure is a ratio measured inside one run: the measure and its baseline are taken in the
same process run, interleaved where possible, as medians over repeated trials (this 2-core
machine is noisy; absolute numbers drift, ratios much less).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORK = REPO / ".work" / "bench"


@dataclass
class Result:
    """One benchmark figure.

    Attributes:
        id: "P1".."P6".
        measure: what is measured.
        value: the figure (unit in ``unit``), a median.
        baseline: the baseline(s) measured in the same run, by name.
        ratio: the figure the goal is about (e.g. value / baseline), or None.
        goal: the goal, in words.
        met: whether ``ratio`` (or ``value``) meets the goal.
        trials: raw per-trial numbers, for the record.
        notes: anything needed to read the figure honestly.
    """

    id: str
    measure: str
    value: float
    unit: str
    baseline: dict[str, float]
    ratio: float | None
    goal: str
    met: bool
    trials: dict[str, list[float]] = field(default_factory=dict)
    notes: str = ""


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], p: float) -> float:
    ys = sorted(xs)
    k = min(len(ys) - 1, max(0, round(p / 100 * (len(ys) - 1))))
    return ys[k]


def make_model(name: str, **shape: Any) -> Path:
    """A local random-init Llama (see examples/make_model.py) under .work/models/NAME."""
    out = REPO / ".work" / "models" / name
    args = [sys.executable, str(REPO / "examples" / "make_model.py"), str(out)]
    for k, v in shape.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def machine() -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "cpu_model": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name")), "unknown")}


def write_results(results: list[Result], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "results": [asdict(r) for r in results]},
                               indent=2))


def table(results: list[Result]) -> str:
    lines = ["| # | measure | value | baseline(s) | ratio | goal | met |", "|---|---|---|---|---|---|---|"]
    for r in results:
        base = ", ".join(f"{k} {v:.4g}" for k, v in r.baseline.items()) or "—"
        ratio = f"{r.ratio:.3g}" if r.ratio is not None else "—"
        met = "—" if r.goal == "—" else "yes" if r.met else "NO"  # "—": a cost, no goal
        lines.append(f"| {r.id} | {r.measure} | {r.value:.4g} {r.unit} | {base} | {ratio} | {r.goal} | "
                     f"{met} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Real engines, shared by the benchmarks of one run (P4, P5, P6): started once, stopped by
# run.py once no later benchmark needs them (else at exit).
# ------------------------------------------------------------------------------------------
_ENGINES: dict[str, Any] = {}
#: The benchmarks that use :func:`engine_cluster`.
USES_ENGINE_CLUSTER = frozenset({"P4", "P5", "P6"})


def stop_engine_cluster() -> None:
    """Stop the shared engines and their controller, if started: three idle engines hold
    ~7 GB and some CPU, which later benchmarks' own engines need (P8 beside them ran this
    24 GiB machine out of memory)."""
    if _ENGINES:
        _ENGINES["cluster"].stop_all()
        _ENGINES.clear()


def bench_connector_config(iid: str, port: int, sc: int, p2p: int, **over: Any) -> dict:
    """``kv_connector_extra_config`` of a benchmark engine on ``port`` (sidecar ``sc``, NIXL
    metadata ``p2p``) attached to :func:`engine_cluster`'s controller; ``over`` adds keys."""
    return {"instance_id": iid, "controller_pull_url": "localhost:24300",
            "controller_reply_url": "localhost:24400", "sidecar_port": sc, "p2p_init_port": p2p,
            "engine_url": f"http://127.0.0.1:{port}", "max_local_cpu_size": 0.5, **over}


def engine_cluster() -> dict[str, Any]:
    """A controller and three engines on the demo model (2 layers, 1 KiB of KV per token):

    * ``a``: with the connector, OpenMP on core 0 (the measured engine of P5/P6, P4's source);
    * ``b``: without the connector, OpenMP on core 1 (P5/P6's baseline);
    * ``c``: with the connector, OpenMP on core 1 (P4's destination, P5-background's baseline).
    """
    if _ENGINES:
        return _ENGINES
    from tests.harness.processes import LocalCluster

    model = make_model("tiny-llama")
    cluster = LocalCluster(model, WORK / "engines")
    ctl = cluster.start_controller(24900, 24300, 24400, extra_args=["--log-level", os.environ.get("KVMOVE_LOG_LEVEL", "info").lower()])

    kv = bench_connector_config
    a = cluster.start_engine("bench-a", 24001, cpu=0, extra_config=kv("bench-a", 24001, 24501, 24201))
    b = cluster.start_engine("bench-b", 24002, cpu=1)
    c = cluster.start_engine("bench-c", 24003, cpu=1, extra_config=kv("bench-c", 24003, 24503, 24203))
    for p in (ctl, a, b, c):
        cluster.wait_ready(p, timeout=400)
    import httpx

    deadline = time.monotonic() + 60
    while sum(i["up"] for i in httpx.get(ctl.url + "/instances").json()["instances"]) < 2:
        assert time.monotonic() < deadline, "engines never registered"
        time.sleep(0.5)
    _ENGINES.update(cluster=cluster, controller=ctl, a=a, b=b, c=c, model=str(model))
    return _ENGINES


def process_tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and every descendant (seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(children.get(p, []))
    return total


def phase_ms(phases: list[dict]) -> dict[str, float]:
    """Median milliseconds of each job phase over ``phases`` (``GET /events``' ``phases`` of
    several jobs), keyed ``job_lease_ms``, ``job_transfer_ms``, ``job_release_ms``."""
    return {f"job_{name[:-2]}_ms": median([p[name] for p in phases]) * 1e3
            for name in ("lease_s", "transfer_s", "release_s")}


_ECHO = """
import sys, zmq
s = zmq.Context().socket(zmq.DEALER)
s.connect(sys.argv[1])
s.send(b"up")
while (m := s.recv()) != b"quit":
    s.send(m)
"""


def zmq_round_trips(trials: int = 200, gap_s: float = 0.02) -> dict[str, float]:
    """Median microseconds of a ZMQ ROUTER→DEALER→ROUTER round trip (200 bytes) to an echo
    process on this host: back to back, and after ``gap_s`` of idleness (as between P4's
    moves). The difference is what waking idle CPUs costs on this host; each of a move's
    control round trips pays it (a Firecracker microVM here: an idle vCPU halts, and waking
    it takes hundreds of microseconds)."""
    import zmq
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, f"tcp://127.0.0.1:{port}"])
    try:
        peer, _ = router.recv_multipart()
        out = {}
        for name, gap in (("busy_us", 0.0), ("after_idle_us", gap_s)):
            times = []
            for _ in range(trials):
                if gap:
                    time.sleep(gap)
                t0 = time.perf_counter()
                router.send_multipart([peer, b"x" * 200])
                router.recv_multipart()
                times.append((time.perf_counter() - t0) * 1e6)
            out[name] = median(times)
        router.send_multipart([peer, b"quit"])
        echo.wait(timeout=10)
        return out
    finally:
        if echo.poll() is None:
            echo.kill()
        router.close(0)
        ctx.term()


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client (pre-built request bytes, Content-Length answers
    only): the latency floor of the server side with almost no client cost."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = port
        self.buf = b""

    def post(self, path: str, body: bytes) -> bytes:
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost:{self.port}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                          .encode() + body)
        return self._answer(path)

    def get(self, path: str) -> bytes:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost:{self.port}\r\n\r\n".encode())
        return self._answer(path)

    def _answer(self, path: str) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buf = rest[length:]
        if status != b"200":
            raise RuntimeError(f"raw POST {path}: {status!r} {rest[:length]!r}")
        return rest[:length]

    def close(self) -> None:
        self.sock.close()
