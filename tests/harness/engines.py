"""Real vLLM engines with the connector: the local model, one engine's HTTP API as tests use
it, and the seed's cluster (a controller and two engines on the seed's ports)."""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from tests.harness.api import lookup, post_move, wait_instances_up, wait_job, wait_lookup
from tests.harness.processes import REPO, LocalCluster, free_port, port_is_free
from vllm_kvmove.hashing import chunk_spans

SEED_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
S1, S2 = "lmcache_instance_1", "lmcache_instance_2"
HITS = "vllm:external_prefix_cache_hits_total"
BY_SOURCE = "vllm:prompt_tokens_cached_by_source_total"


def model_dir(name: str = "tiny-llama", **shape: int | str) -> Path:
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
    """One engine's OpenAI server, /metrics and sidecar, as tests call them."""

    def __init__(self, instance_id: str, proc, sidecar_url: str, model: str, token: str = "",
                 ca: ssl.SSLContext | bool = True):
        self.instance_id = instance_id
        self.token = token  # the fleet secret, sent to the sidecar as a bearer token
        self.ca = ca  # what an https sidecar is verified with
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
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.get(self.sidecar_url + path, headers=headers, timeout=10, verify=self.ca)

    def complete_from_store(self, prompt, max_tokens: int = 6) -> tuple[dict, float]:
        """Reset the engine's own prefix cache (so only the connector's store can help), send
        ``prompt``; the response and the rise of its external prefix-cache hits."""
        self.http.post("/reset_prefix_cache").raise_for_status()
        before = self.metric(HITS)
        out = self.complete(prompt, max_tokens=max_tokens)
        return out, self.metric(HITS) - before

    def chunk_bytes(self, key: str) -> bytes | None:
        """A chunk's bytes from the engine's sidecar (``key`` in hex), or None if not held."""
        r = self.sidecar(f"/chunks/{key}")
        return r.content if r.status_code == 200 else None

    def serve_and_check(self, prompt, tokens: list[int], source_text: str) -> float:
        """Send ``prompt`` here and assert the engine's own word that it was served from the
        moved KV: ``vllm:external_prefix_cache_hits_total`` rose by at least N-1 for the N
        ``tokens``, all attributed to the host tier, ``cached_tokens`` agrees, and the greedy
        output equals ``source_text``. Returns the hits."""
        n = len(tokens)
        hits0, host0 = self.metric(HITS), self.metric(BY_SOURCE, source="host")
        out = self.complete(prompt)
        hits, host = self.metric(HITS) - hits0, self.metric(BY_SOURCE, source="host") - host0
        assert hits >= n - 1, f"{self.instance_id} external hits rose by {hits}, expected >= {n - 1}"
        assert host == hits, "hits must be attributed to the host tier"
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= n - 1
        assert out["choices"][0]["text"] == source_text
        return hits


def connector_config(instance_id: str, http_port: int, pull: int, reply: int,
                     **over) -> dict:
    """``kv_connector_extra_config`` of a test engine on ``http_port`` attached to the
    controller's ZMQ ports ``pull``/``reply`` (a small store; sidecar and NIXL ports free);
    ``over`` sets more keys or overrides these."""
    return {"instance_id": instance_id, "controller_pull_url": f"localhost:{pull}",
            "controller_reply_url": f"localhost:{reply}", "sidecar_port": free_port(),
            "p2p_init_port": free_port(), "engine_url": f"http://127.0.0.1:{http_port}",
            "max_local_cpu_size": 0.25} | over


def consecutive_ports() -> int:
    """A free port whose successor is free too (a tensor-parallel engine's rank 1 takes it)."""
    while True:
        p, q = free_port(), free_port()
        if q == p + 1:
            return p


class ConnectorFleet:
    """A controller and engines with the connector on this host, started together.

    Args:
        model: the model directory every engine serves.
        workdir: where their logs go.
        engines: ``{instance_id: (cpus, vLLM arguments, connector config keys)}`` — cpus as
            ``VLLM_CPU_OMP_THREADS_BIND`` takes them ("0|1": rank r on core r). Each engine's
            sidecar and NIXL metadata ports are followed by a free one (rank 1's), and it
            serves ``/reset_prefix_cache`` (``VLLM_SERVER_DEV_MODE``).
    """

    def __init__(self, model: Path, workdir: Path,
                 engines: dict[str, tuple[str, list[str], dict[str, Any]]]):
        self.local = LocalCluster(model, workdir)
        try:
            self._start(engines)
        except BaseException:  # a failed start stops what it started
            self.local.stop_all()
            raise

    def _start(self, engines: dict[str, tuple[str, list[str], dict[str, Any]]]) -> None:
        port, pull, reply = free_port(), free_port(), free_port()
        self.controller = self.local.start_controller(port, pull, reply)
        self.engines: dict[str, Engine] = {}
        self.sidecar_ports: dict[str, int] = {}
        for iid, (cpu, args, keys) in engines.items():
            http, sidecar = free_port(), consecutive_ports()
            extra = connector_config(iid, http, pull, reply, sidecar_port=sidecar,
                                     p2p_init_port=consecutive_ports(), **keys)
            proc = self.local.start_engine(iid, http, cpu=cpu, extra_config=extra,
                                           extra_args=args,
                                           env={"VLLM_SERVER_DEV_MODE": "1"})
            self.engines[iid] = Engine(iid, proc, f"http://127.0.0.1:{sidecar}",
                                       str(self.local.model_dir))
            self.sidecar_ports[iid] = sidecar
        self.local.wait_ready(self.controller, timeout=60)
        for e in self.engines.values():
            self.local.wait_ready(e.proc, timeout=400)
        self.http = httpx.Client(base_url=self.controller.url, timeout=60)

    def rank_get(self, iid: str, rank: int, path: str) -> httpx.Response:
        """GET ``path`` from rank ``rank``'s sidecar of engine ``iid``."""
        return httpx.get(f"http://127.0.0.1:{self.sidecar_ports[iid] + rank}{path}", timeout=10)

    def instances(self) -> dict[str, dict]:
        return {i["instance_id"]: i for i in self.http.get("/instances").json()["instances"]}

    @classmethod
    @contextlib.contextmanager
    def running(cls, *args: Any) -> Iterator["ConnectorFleet"]:
        """A fleet whose engines are all up at the controller, stopped (every process, by
        PID) when the block ends — a module fixture's body."""
        fleet = cls(*args)
        try:
            wait_instances_up(fleet.http, set(fleet.engines))
            yield fleet
        finally:
            fleet.local.stop_all()


def chunk_keys(http, tokens: list[int], instance_id: str) -> list[str]:
    """Hex keys of the chunks ``tokens`` make at ``instance_id``, from its fingerprint and chunk
    size as the controller at ``http`` lists them."""
    for i in http.get("/instances").json()["instances"]:
        if i["instance_id"] == instance_id:
            return [s.key.hex() for s in chunk_spans(tokens, i["chunk_size"], i["fingerprint"])]
    raise AssertionError(f"{instance_id} is not registered")


class SeedCluster:
    """The seed's cluster, as an LMCache user would bring it: engines on :8000/:8001 configured
    by LMCache-format files (``examples/move/lmcache/instance{1,2}.yaml`` via
    ``LMCACHE_CONFIG_FILE``), served under the seed's model name, and the controller on :9000
    with ZMQ :8300/:8400. ``kv_connector_extra_config`` overrides two keys the files lack or
    that are too big for a test (``engine_url``, ``max_local_cpu_size``). Engines run the
    local model, eager, one core each. A failed start stops what it started."""

    PORTS = (8000, 8001, 8200, 8202, 8300, 8400, 8500, 8501, 9000)

    def __init__(self, workdir: Path):
        self.local = LocalCluster(model_dir(), workdir)
        try:
            self._start()
        except BaseException:
            self.local.stop_all()
            raise

    def _start(self) -> None:
        for port in self.PORTS:
            assert port_is_free(port), f"port {port} is taken: the e2e tests use the seed's ports"
        self.controller_proc = self.local.start_controller(9000, 8300, 8400)
        self.engines: dict[str, Engine] = {}
        t0 = time.monotonic()
        for i, iid in ((1, S1), (2, S2)):
            port = 7999 + i
            lmcache_file = REPO / "examples" / "move" / "lmcache" / f"instance{i}.yaml"
            proc = self.local.start_engine(
                iid, port, cpu=i - 1, env={"LMCACHE_CONFIG_FILE": str(lmcache_file)},
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
        wait_instances_up(self.http, ids, timeout)

    def move(self, src: str, dst: str, **body) -> httpx.Response:
        return post_move(self.http, src, dst, **body)

    def wait_job(self, event_id: str, timeout: float = 60) -> dict:
        return wait_job(self.http, event_id, timeout)

    def lookup(self, tokens: list[int]) -> dict[str, int]:
        return lookup(self.http, tokens)

    def wait_lookup(self, tokens: list[int], expect: dict[str, int], timeout: float = 5) -> dict:
        return wait_lookup(self.http, tokens, expect, timeout)

    def close(self) -> None:
        self.local.stop_all()
