"""KV events of the host tier with real engines, decoded with vLLM's own decoder, as a router
subscribed to them would see them.

Two engines (``ev1``, ``ev2``), each with vLLM's own event stream on (``--kv-events-config``)
and its sidecar's socket (``kv_events_port``), and a controller:

* a prompt served on ``ev1``: its engine stream carries vLLM's ``BlockStored`` for the GPU
  tier and ours for the host tier (``medium="CPU"``) — the same block hashes, the engine's own
  chain — and its sidecar's socket the same host-tier events;
* a move into ``ev2`` while it is idle: its sidecar publishes the blocks at once (no step, no
  request), ``ev1``'s sidecar publishes their removal; the next request on ``ev2`` is served
  from them (hits >= N-1) and its engine stream then carries the host-tier events too;
* a clear of ``ev2``'s store: ``BlockRemoved``.

Its own package: its engines start after the other packages' engines stopped (memory)."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest

from tests.harness.api import LOC, wait_lookup
from tests.harness.engines import Engine, model_dir
from tests.harness.kvevents import KVEventSubscriber, hashes
from tests.harness.processes import LocalCluster, free_port

N = 700


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    local = LocalCluster(model_dir(), tmp_path_factory.mktemp("kvev"))
    try:
        port, pull, reply = free_port(), free_port(), free_port()
        ctl = local.start_controller(port, pull, reply)
        engines, endpoints = {}, {}
        for cpu, iid in enumerate(("ev1", "ev2")):
            http, sidecar, events, own = free_port(), free_port(), free_port(), free_port()
            extra = {"instance_id": iid, "controller_pull_url": f"localhost:{pull}",
                     "controller_reply_url": f"localhost:{reply}", "sidecar_port": sidecar,
                     "p2p_init_port": free_port(), "kv_events_port": events,
                     "engine_url": f"http://127.0.0.1:{http}", "max_local_cpu_size": 0.25}
            kv_events = {"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"tcp://*:{own}", "topic": f"kv@{iid}@tiny"}
            proc = local.start_engine(iid, http, cpu=cpu, extra_config=extra, extra_args=[
                "--kv-events-config", json.dumps(kv_events)])
            engines[iid] = Engine(iid, proc, f"http://127.0.0.1:{sidecar}", str(local.model_dir))
            endpoints[iid] = (f"tcp://127.0.0.1:{own}", f"tcp://127.0.0.1:{events}")
        local.wait_ready(ctl, timeout=60)
        for e in engines.values():
            local.wait_ready(e.proc, timeout=300)
        http = httpx.Client(base_url=ctl.url, timeout=60)
        deadline = time.monotonic() + 30
        while sum(i["up"] for i in http.get("/instances").json()["instances"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        subs = {(iid, where): KVEventSubscriber(ep) for iid, (engine_ep, sidecar_ep)
                in endpoints.items() for where, ep in (("engine", engine_ep),
                                                       ("sidecar", sidecar_ep))}
        yield engines, http, subs
        for s in subs.values():
            s.close()
    finally:
        local.stop_all()


def stored(kind="BlockStored", medium="CPU", n=1):
    return lambda events: len(hashes(events, kind, medium)) >= n


def test_served_moved_and_cleared_blocks_are_published_as_vllm_names_them(fleet):
    engines, http, subs = fleet
    ev1, ev2 = engines["ev1"], engines["ev2"]
    tokens = [random.Random(5).randrange(3, 4000) for _ in range(N)]
    full_blocks = N // 128  # the engines' block size
    reference = ev1.complete(tokens)
    # ev1's engine stream: the GPU tier's blocks (vLLM's) and the host tier's (ours), alike.
    engine_events = subs["ev1", "engine"].events(stored(n=full_blocks), timeout=10)
    gpu = hashes(engine_events, "BlockStored", "GPU")
    cpu = hashes(engine_events, "BlockStored", "CPU")
    assert len(cpu) == full_blocks and gpu[:full_blocks] == cpu, (gpu, cpu)
    host = subs["ev1", "sidecar"].events(stored(n=full_blocks))
    assert hashes(host, "BlockStored", "CPU") == cpu
    # A move into the idle ev2: published by its sidecar as it lands.
    assert wait_lookup(http, tokens, {"ev1": N}, timeout=30) == {"ev1": N}
    t0 = time.monotonic()
    r = http.post("/move", params={"wait": 60}, json={
        "old_position": ["ev1", LOC], "new_position": ["ev2", LOC], "tokens": tokens})
    assert r.status_code == 200 and r.json()["status"] == "done", r.text
    landed = subs["ev2", "sidecar"].events(stored(n=full_blocks))
    seen_after = time.monotonic() - t0
    assert hashes(landed, "BlockStored", "CPU") == cpu
    gone = subs["ev1", "sidecar"].events(stored("BlockRemoved", n=full_blocks))
    assert sorted(hashes(gone, "BlockRemoved", "CPU")) == sorted(cpu)
    # Served there from the moved KV; ev2's engine stream carries the host-tier blocks once
    # it steps (its own GPU blocks of the prompt besides).
    hits = ev2.serve_and_check(tokens, tokens, reference["choices"][0]["text"])
    later = subs["ev2", "engine"].events(stored(n=full_blocks), timeout=10)
    assert hashes(later, "BlockStored", "CPU") == cpu
    # A clear of ev2's store removes them.
    assert http.post("/clear", json={"instance_id": "ev2"}).status_code == 200
    cleared = subs["ev2", "sidecar"].events(stored("BlockRemoved", n=full_blocks))
    assert sorted(hashes(cleared, "BlockRemoved", "CPU")) == sorted(cpu)
    print(f"\n[kv events] {N} tokens, {full_blocks} full blocks: engine GPU and CPU events "
          f"agree; a move published at the idle destination {seen_after * 1e3:.0f} ms after "
          f"POST /move; destination hits {hits:.0f}")
