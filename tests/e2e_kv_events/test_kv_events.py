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

The engines are the package's (``conftest.py``)."""

from __future__ import annotations

import random
import time

from tests.harness.api import LOC, wait_lookup
from tests.harness.kvevents import hashes

N = 700


def stored(kind="BlockStored", medium="CPU", n=1):
    return lambda events: len(hashes(events, kind, medium)) >= n


def test_served_moved_and_cleared_blocks_are_published_as_vllm_names_them(fleet):
    engines, http, subs = fleet.engines, fleet.http, fleet.subs
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
