"""Fleet: a real controller process and real sidecars (real stores, real NIXL agents), no vLLM.

In-process sidecars (:meth:`Fleet.add_sidecar`) run in the test process exactly as they run
inside an engine's worker: each on its own thread with its own NIXL agent, around a ChunkStore
the test fills. Standalone sidecars (:meth:`Fleet.spawn_sidecar`) run in processes of their
own, for tests that kill or freeze one.
"""

from __future__ import annotations

import sys
import time

import httpx

from sidecar.agent import Sidecar
from sidecar.cli import main as cli_main
from tests.harness.api import post_move, wait_job, wait_lookup
from tests.harness.processes import LocalCluster, free_port
from tests.harness.stores import tiny_layout
from vllm_kvmove.config import build_config
from vllm_kvmove.store import ChunkStore


class Fleet:
    """A controller on free ports (``--heartbeat-timeout 3``) and the sidecars a test adds.

    Args:
        tmp_path: where logs go.
        start_controller: start the controller now (else :meth:`start_controller` later).
        api_token: the fleet's secret, given to the controller and to every sidecar.
        controller_args: more ``kvmove-controller`` flags.
    """

    def __init__(self, tmp_path, start_controller: bool = True, api_token: str = "",
                 controller_args: tuple[str, ...] = ()):
        self.api_token = api_token
        self.controller_args = list(controller_args)
        self.cluster = LocalCluster("unused", tmp_path, python=sys.executable)
        self.pull, self.reply, self.port = free_port(), free_port(), free_port()
        # The fleet's own client: with the secret as its bearer token, when there is one.
        self.http = httpx.Client(base_url=f"http://localhost:{self.port}", timeout=10,
                                 headers={"Authorization": f"Bearer {api_token}"} if api_token else {})
        self.sidecars: dict[str, Sidecar] = {}
        self.controller = None
        if start_controller:
            self.start_controller()

    def start_controller(self) -> None:
        """Start the controller process (again, after :meth:`kill_controller`) on the same ports."""
        args = ["--heartbeat-timeout", "3", *self.controller_args] + (
            ["--api-token", self.api_token] if self.api_token else [])
        self.controller = self.cluster.start_controller(self.port, self.pull, self.reply,
                                                        extra_args=args)
        self.cluster.wait_ready(self.controller, timeout=30)

    def kill_controller(self) -> None:
        self.cluster.kill(self.controller)
        self.controller = None

    def sidecar_config(self, instance_id: str, layout, slots: int, api_token: str | None = None,
                       engine_url: str = "http://127.0.0.1:9") -> dict:
        """Config keys of a test sidecar attached to this fleet's controller."""
        return {
            "instance_id": instance_id, "controller_pull_url": f"localhost:{self.pull}",
            "controller_reply_url": f"localhost:{self.reply}", "sidecar_port": free_port(),
            "p2p_init_port": free_port(), "engine_url": engine_url,
            "chunk_size": layout.chunk_size, "heartbeat_interval_s": 0.2,
            "command_timeout_s": 5, "max_local_cpu_size": slots * layout.chunk_bytes / (1 << 30),
            "api_token": self.api_token if api_token is None else api_token}

    def spawn_sidecar(self, instance_id: str, layout, slots: int, fill=(), **config):
        """A sidecar in its own process (``tests.harness.standalone``): one a test can kill or
        stop. ``config`` overrides keys of :meth:`sidecar_config`."""
        proc = self.cluster.start_sidecar_process(
            self.sidecar_config(instance_id, layout, slots) | config, layout.to_dict(), list(fill))
        self.cluster.wait_ready(proc, timeout=60)
        self.wait_registered(instance_id)
        return proc

    def add_sidecar(self, instance_id: str, slots: int = 64, wait: bool = True,
                    api_token: str | None = None, engine_url: str = "http://127.0.0.1:9",
                    config: dict | None = None, rank: int = 0, world_size: int = 1,
                    block_hasher=None, **layout_over) -> Sidecar:
        """An in-process sidecar around a fresh store of ``slots`` chunks of
        ``tiny_layout(**layout_over)``, as tensor-parallel ``rank`` of ``world_size`` (kept in
        :attr:`sidecars` as ``"<id>/<rank>"`` when ``world_size > 1``); ``config`` overrides
        keys of :meth:`sidecar_config`. ``wait``: until the instance is listed (with every
        rank up, for ``world_size > 1``). ``block_hasher``: the engine's block hashing, as a
        connector with KV events on passes it."""
        layout = tiny_layout(**layout_over)
        cfg = build_config(self.sidecar_config(instance_id, layout, slots, api_token, engine_url)
                           | (config or {}))
        store = ChunkStore(layout, slots * layout.chunk_bytes)
        sc = Sidecar(cfg, store, layout, rank, world_size, block_hasher).start()
        sc.wait_ready(30)
        self.sidecars[instance_id if world_size == 1 else f"{instance_id}/{rank}"] = sc
        if wait:
            self.wait_registered(instance_id, up=world_size > 1)
        return sc

    def wait_registered(self, instance_id: str, timeout: float = 10, up: bool = False) -> None:
        """Until ``/instances`` lists ``instance_id`` (and, with ``up``, says it is up)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                listed = {i["instance_id"]: i["up"]
                          for i in self.http.get("/instances").json()["instances"]}
            except httpx.HTTPError:
                listed = {}
            if instance_id in listed and (listed[instance_id] or not up):
                return
            time.sleep(0.05)
        raise AssertionError(f"{instance_id} never registered{' all its ranks' if up else ''}")

    def kvmove(self, *args: str) -> int:
        """Run ``kvmove --controller <this fleet's controller> ARGS...`` in this process; its
        exit status."""
        token = ["--token", self.api_token] if self.api_token else []
        return cli_main(["--controller", f"http://localhost:{self.port}", *token, *args])

    def move(self, src: str, dst: str, **body) -> httpx.Response:
        return post_move(self.http, src, dst, **body)

    def wait_job(self, event_id: str, timeout: float = 20) -> dict:
        return wait_job(self.http, event_id, timeout)

    def wait_lookup(self, tokens, expect: dict, timeout: float = 5) -> dict:
        return wait_lookup(self.http, tokens, expect, timeout)

    def close(self) -> None:
        for sc in self.sidecars.values():
            sc.stop()
        self.http.close()
        self.cluster.stop_all()
