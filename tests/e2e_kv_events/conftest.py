"""Two engines with KV events on (vLLM's own stream and the sidecars' sockets) and a
controller, shared by the package's tests (KV events, the router). Its own package: its
engines start after the other packages' engines stopped (memory)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import pytest

from tests.harness.api import wait_instances_up
from tests.harness.engines import Engine, connector_config, model_dir
from tests.harness.kvevents import KVEventSubscriber
from tests.harness.processes import LocalCluster, free_port


@dataclass
class EventFleet:
    """``engines`` (``ev1``, ``ev2``), the controller's client ``http`` and its URL, and
    ``subs``: a subscriber per (engine, "engine" | "sidecar") event stream."""

    local: LocalCluster
    engines: dict[str, Engine]
    http: httpx.Client
    controller_url: str
    subs: dict[tuple[str, str], KVEventSubscriber]


@pytest.fixture(scope="package")
def fleet(tmp_path_factory):
    local = LocalCluster(model_dir(), tmp_path_factory.mktemp("kvev"))
    try:
        port, pull, reply = free_port(), free_port(), free_port()
        ctl = local.start_controller(port, pull, reply)
        engines, endpoints = {}, {}
        for cpu, iid in enumerate(("ev1", "ev2")):
            http, events, own = free_port(), free_port(), free_port()
            extra = connector_config(iid, http, pull, reply, kv_events_port=events)
            kv_events = {"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"tcp://*:{own}", "topic": f"kv@{iid}@tiny"}
            proc = local.start_engine(iid, http, cpu=cpu, extra_config=extra, extra_args=[
                "--kv-events-config", json.dumps(kv_events)],
                env={"VLLM_SERVER_DEV_MODE": "1"})  # /reset_prefix_cache
            engines[iid] = Engine(iid, proc, f"http://127.0.0.1:{extra['sidecar_port']}",
                                  str(local.model_dir))
            endpoints[iid] = (f"tcp://127.0.0.1:{own}", f"tcp://127.0.0.1:{events}")
        local.wait_ready(ctl, timeout=60)
        for e in engines.values():
            local.wait_ready(e.proc, timeout=300)
        http = httpx.Client(base_url=ctl.url, timeout=60)
        wait_instances_up(http, set(engines))
        subs = {(iid, where): KVEventSubscriber(ep) for iid, (engine_ep, sidecar_ep)
                in endpoints.items() for where, ep in (("engine", engine_ep),
                                                       ("sidecar", sidecar_ep))}
        yield EventFleet(local, engines, http, ctl.url, subs)
        for s in subs.values():
            s.close()
    finally:
        local.stop_all()
