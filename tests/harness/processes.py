"""LocalCluster: start and stop real processes on this machine — vLLM engines with the
connector, the controller, standalone sidecars — for the tests and the benchmarks, so both
launch them the same way; and free ports for them.

Every process is started in its own session and stopped by PID: SIGINT first (vLLM shuts its
engine-core and worker children down and calls the connector's ``shutdown``), then SIGKILL of
the whole process group if it has not exited in time.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.harness.hosts import Host

REPO = Path(__file__).resolve().parents[2]

# Environment of every engine on this CPU-only machine (see README: running it by hand).
ENGINE_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class Proc:
    """A started process and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    url: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LocalCluster:
    """Engines and a controller on localhost.

    Args:
        model_dir: model directory every engine serves.
        workdir: where logs and generated config files go.
        python: interpreter of the environment with vllm and vllm-kvmove installed.
    """

    def __init__(self, model_dir: str | Path, workdir: str | Path, python: str = sys.executable):
        self.model_dir = str(model_dir)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.procs: list[Proc] = []
        atexit.register(self.stop_all)  # safety net: nothing outlives the process that started it

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], url: str) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, cwd=self.workdir)
        log.close()
        proc = Proc(name, popen, log_path, url)
        self.procs.append(proc)
        return proc

    def start_controller(self, port: int = 9000, pull_port: int = 8300, reply_port: int = 8400,
                         extra_args: list[str] | None = None, host: Host | None = None) -> Proc:
        """Start ``kvmove-controller`` (on a test ``host``: bound to its address); returns at
        once (see :meth:`wait_ready`)."""
        address = host.address if host else "localhost"
        argv = [self.python, "-m", "sidecar.controller", "--host", address, "--port", str(port),
                "--monitor-ports", json.dumps({"pull": pull_port, "reply": reply_port}),
                *(extra_args or [])]
        scheme = "https" if "--tls-cert" in argv else "http"
        return self._spawn(f"controller-{port}", host.wrap(argv) if host else argv,
                           {**os.environ}, f"{scheme}://{address}:{port}")

    def start_router(self, port: int, args: list[str]) -> Proc:
        """Start ``kvmove-router`` on ``port`` with ``args`` (``--controller URL`` or
        ``--engine ID=URL``...); returns at once (see :meth:`wait_ready`)."""
        argv = [self.python, "-m", "sidecar.router", "--port", str(port), *args]
        return self._spawn(f"router-{port}", argv, {**os.environ},
                           f"http://127.0.0.1:{port}")

    def start_engine(self, instance_id: str, port: int, *, config_file: str | Path | None = None,
                     extra_config: dict[str, Any] | None = None, cpu: int | None = None,
                     kv_cache_gib: float = 1, max_model_len: int = 4096,
                     extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                     host: Host | None = None) -> Proc:
        """Start one vLLM engine with the KVMoveConnector; returns at once.

        Args:
            instance_id: used for the log name only (the config names the instance).
            port: the engine's HTTP port.
            config_file: ``KVMOVE_CONFIG_FILE`` for the engine.
            extra_config: ``kv_connector_extra_config`` (overrides the file). None with no
                config file: run without the connector.
            cpu: core to bind the engine's OpenMP threads to.
            kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE``.
            host: a test host to run on (the engine binds to its address), else this one.
        """
        address = host.address if host else "127.0.0.1"
        full_env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                    "VLLM_HOST_IP": address, **(env or {})}
        if cpu is not None:
            full_env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
        if config_file is not None:
            full_env["KVMOVE_CONFIG_FILE"] = str(config_file)
        argv = [self.python, "-m", "vllm_kvmove.launch", self.model_dir, "--host", address,
                "--port", str(port), "--enforce-eager", "--max-model-len", str(max_model_len),
                "--enable-prompt-tokens-details"]
        if config_file is not None or extra_config is not None:
            kv = {"kv_connector": "KVMoveConnector", "kv_role": "kv_both"}
            if extra_config:
                kv["kv_connector_extra_config"] = extra_config
            argv += ["--kv-transfer-config", json.dumps(kv)]
        argv += extra_args or []
        return self._spawn(f"engine-{instance_id}", host.wrap(argv) if host else argv, full_env,
                           f"http://{address}:{port}")

    def start_sidecar_process(self, config: dict[str, Any], layout: dict[str, Any],
                              fill: list[str] | None = None, host: Host | None = None,
                              rank: int = 0, world_size: int = 1) -> Proc:
        """Start ``python -m tests.harness.standalone`` (a sidecar without an engine; as
        tensor-parallel ``rank`` of ``world_size``); returns at once. Its ``url`` is the
        sidecar's HTTP address (``/health`` answers once it serves)."""
        argv = [self.python, "-m", "tests.harness.standalone",
                "--log-level", os.environ.get("KVMOVE_LOG_LEVEL", "WARNING"),
                "--config", json.dumps(config), "--layout", json.dumps(layout),
                "--rank", str(rank), "--world-size", str(world_size)]
        for spec in fill or []:
            argv += ["--fill", spec]
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        address = config.get("sidecar_host", "127.0.0.1")
        scheme = "https" if config.get("tls_cert") else "http"
        return self._spawn(f"sidecar-{config['instance_id']}", host.wrap(argv) if host else argv,
                           env, f"{scheme}://{address}:{config['sidecar_port']}")

    @staticmethod
    def wait_ready(proc: Proc, path: str = "/health", timeout: float = 240.0,
                   verify: ssl.SSLContext | bool = True) -> float:
        """Poll ``proc.url + path`` until 200 (an https one verified with ``verify``); return
        seconds waited. Raises RuntimeError."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
            try:
                if httpx.get(proc.url + path, timeout=2, verify=verify).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{proc.name} not ready after {timeout} s:\n{proc.log_tail()}")

    def stop(self, proc: Proc, timeout: float = 30.0) -> None:
        """SIGINT by PID; SIGKILL the process group if it has not exited within ``timeout``."""
        if proc.alive():
            try:
                os.kill(_signal_target(proc.pid), signal.SIGINT)
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"[harness] {proc.name} did not exit within {timeout:.0f} s of SIGINT: killed",
                      file=sys.stderr)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children (engine core, worker) included
        except (ProcessLookupError, PermissionError):
            pass
        proc.popen.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def kill(self, proc: Proc) -> None:
        """SIGKILL the process and its children at once (fault injection)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.popen.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _signal_target(pid: int) -> int:
    """The process that should get a stop signal for ``pid``: itself, or for a test host's
    wrapper (``unshare --fork``, which ignores SIGINT and SIGTERM) the program it runs."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "unshare":
                return pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return pid
    return int(children[0]) if children else pid


_next_port = [20000 + (os.getpid() * 37) % 8000]


def free_port() -> int:
    """A free TCP port below the ephemeral range (32768+), so no outgoing connection of vLLM,
    ZMQ or UCX can take it between this check and its use."""
    while True:
        port = _next_port[0]
        _next_port[0] = 20000 + (port - 20000 + 1) % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on loopback now (TIME_WAIT is fine, as for servers)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # as /proc/net/tcp{,6} spell it


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address as /proc/net/tcp spells it, port) of every TCP socket process ``pid`` (any of
    its threads) listens on."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    addr, port = cols[1].rsplit(":", 1)
                    found.add((addr, int(port, 16)))
    return found
