"""One real cluster per test session: a controller and two vLLM engines with the connector.

The cluster is the seed's, as an LMCache user would bring it: engines on :8000/:8001 configured
by LMCache-format files (``examples/move/lmcache/instance{1,2}.yaml`` via
``LMCACHE_CONFIG_FILE``), served under the seed's model name, and the controller on :9000 with
ZMQ :8300/:8400. ``kv_connector_extra_config`` overrides two keys the files lack or that are too
big for a test (``engine_url``, ``max_local_cpu_size``).

Engines run the small local model made by ``examples/make_model.py`` (random-init Llama and a
locally trained tokenizer), eager mode, one core each. Start-up is shared by every e2e test;
teardown (when the e2e package is done) stops every process by PID.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sidecar.localcluster import LocalCluster
from tests.conftest import post_move, wait_job, wait_lookup

REPO = Path(__file__).resolve().parents[2]
LOC = "LocalCPUBackend"
SEED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
S1, S2 = "lmcache_instance_1", "lmcache_instance_2"


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def model_dir(name: str = "tiny-llama", **shape: int) -> Path:
    """Make (once) the local model ``.work/models/<name>`` with ``examples/make_model.py``
    (``shape``: its options, e.g. ``layers=16``); ``KVMOVE_TEST_MODEL`` overrides the default
    model's path."""
    path = REPO / ".work" / "models" / name
    if name == "tiny-llama" and not shape:
        path = Path(os.environ.get("KVMOVE_TEST_MODEL", path))
    options = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]
    subprocess.run([sys.executable, str(REPO / "examples" / "make_model.py"), str(path), *options],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return path


class Engine:
    def __init__(self, instance_id: str, proc, sidecar_url: str, model: str):
        self.instance_id = instance_id
        self.model = model
        self.proc = proc
        self.url = proc.url
        self.sidecar_url = sidecar_url
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def complete(self, prompt, max_tokens: int = 8) -> dict:
        r = self.http.post("/v1/completions", json={"model": self.model, "prompt": prompt,
                                                    "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()

    def tokenize(self, prompt: str) -> list[int]:
        return self.http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a counter on the engine's /metrics over series matching ``labels``."""
        total = 0.0
        for line in self.http.get("/metrics").text.splitlines():
            m = re.match(rf"^{re.escape(name)}(\{{.*\}})? ([0-9.e+-]+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def sidecar(self, path: str) -> httpx.Response:
        return httpx.get(self.sidecar_url + path, timeout=10)


class Cluster:
    def __init__(self, workdir: Path):
        self.local = LocalCluster(model_dir(), workdir)
        try:
            self._start()
        except BaseException:
            self.local.stop_all()  # a failed start must not leave engines behind
            raise

    def _start(self) -> None:
        for port in (8000, 8001, 8200, 8202, 8300, 8400, 8500, 8501, 9000):
            assert port_is_free(port), f"port {port} is taken: the e2e tests use the seed's ports"
        self.controller_proc = self.local.start_controller(9000, 8300, 8400)
        self.engines: dict[str, Engine] = {}
        t0 = time.monotonic()
        for i, iid in ((1, S1), (2, S2)):
            port = 7999 + i
            proc = self.local.start_engine(
                iid, port, cpu=i - 1,
                config_file=None, env={"LMCACHE_CONFIG_FILE": str(REPO / "examples" / "move" / "lmcache" / f"instance{i}.yaml")},
                extra_config={"engine_url": f"http://127.0.0.1:{port}", "max_local_cpu_size": 0.25},
                extra_args=["--served-model-name", SEED_MODEL])
            self.engines[iid] = Engine(iid, proc, f"http://127.0.0.1:{8499 + i}", SEED_MODEL)
        self.local.wait_ready(self.controller_proc, timeout=60)
        for e in self.engines.values():
            self.local.wait_ready(e.proc, timeout=300)
        self.startup_s = time.monotonic() - t0
        self.http = httpx.Client(base_url=self.controller_proc.url, timeout=60)
        self.wait_instances(set(self.engines))

    def wait_instances(self, ids: set[str], timeout: float = 30) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            up = {i["instance_id"] for i in self.http.get("/instances").json()["instances"] if i["up"]}
            if ids <= up:
                return
            time.sleep(0.2)
        raise AssertionError(f"instances not registered: {ids}")

    def move(self, src: str, dst: str, **body) -> httpx.Response:
        return post_move(self.http, src, dst, **body)

    def wait_job(self, event_id: str, timeout: float = 60) -> dict:
        return wait_job(self.http, event_id, timeout)

    def lookup(self, tokens: list[int]) -> dict[str, int]:
        return wait_lookup(self.http, tokens, {}, timeout=0)

    def wait_lookup(self, tokens: list[int], expect: dict[str, int], timeout: float = 5) -> dict:
        return wait_lookup(self.http, tokens, expect, timeout)

    def close(self) -> None:
        self.local.stop_all()


@pytest.fixture(scope="package")  # stopped before other packages start their engines
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("e2e"))
    print(f"\n[e2e] controller + 2 engines ready in {c.startup_s:.1f} s")
    try:
        yield c
    finally:
        c.close()
