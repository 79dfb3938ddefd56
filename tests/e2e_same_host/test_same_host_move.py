"""A move between two real vLLM engines on one host through the same-host path (the default,
``same_host_copy: true``): the destination maps the source engine's store pool and copies the
chunks itself, no NIXL read. The proof is the destination engine's own word, as for the seed
flow over NIXL (tests/e2e): its external prefix-cache hits rise by at least N-1, attributed to
the host tier, ``cached_tokens`` agrees, its greedy output equals the source's, and the moved
bytes are identical — and its sidecar counts the fetch as a same-host one.

Its own controller and two engines (our config keys, free ports), started after the e2e
package's seed cluster has stopped (one directory later), so at most two engines run at once.
"""

from __future__ import annotations

import httpx
import pytest

from tests.harness.api import post_move, wait_job, wait_lookup
from tests.harness.engines import Engine, chunk_keys, model_dir
from tests.harness.processes import LocalCluster, free_port

PROMPT = ("Moving the KV cache of a long prompt between two engines on one host need not go "
          "through the kernel page by page: the destination maps the source's pool. ") * 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    local = LocalCluster(model_dir(), tmp_path_factory.mktemp("same-host"))
    try:
        pull, reply = free_port(), free_port()
        ctl = local.start_controller(free_port(), pull, reply)
        engines = []
        for i, iid in enumerate(("host-a", "host-b")):
            port, sidecar_port = free_port(), free_port()
            proc = local.start_engine(iid, port, cpu=i, extra_config={
                "instance_id": iid, "controller_pull_url": f"localhost:{pull}",
                "controller_reply_url": f"localhost:{reply}", "sidecar_port": sidecar_port,
                "p2p_init_port": free_port(), "engine_url": f"http://127.0.0.1:{port}",
                "max_local_cpu_size": 0.25})
            engines.append(Engine(iid, proc, f"http://127.0.0.1:{sidecar_port}", str(local.model_dir)))
        local.wait_ready(ctl, timeout=60)
        for e in engines:
            local.wait_ready(e.proc, timeout=300)
        http = httpx.Client(base_url=ctl.url, timeout=60)
        yield http, engines
    finally:
        local.stop_all()


def test_a_move_between_engines_on_one_host_copies_from_the_mapped_pool(pair):
    http, (a, b) = pair
    tokens = a.tokenize(PROMPT)
    source = a.complete(PROMPT)
    assert wait_lookup(http, tokens, {"host-a": len(tokens)}, timeout=30) == {"host-a": len(tokens)}
    keys = chunk_keys(http, tokens, "host-a")
    assert len(keys) >= 2
    before = {k: a.chunk_bytes(k) for k in keys}
    assert all(before.values())

    r = post_move(http, "host-a", "host-b", tokens=tokens)
    assert r.status_code == 200, r.text
    st = wait_job(http, r.json()["event_id"], timeout=60)
    assert st["status"] == "done" and st["bytes"] == st["total_bytes"] > 0, st
    transfers = b.sidecar("/store").json()["transfers"]
    assert transfers["same_host_fetches"] == transfers["fetches"] >= 1, transfers

    assert {k: b.chunk_bytes(k) for k in keys} == before
    assert all(a.chunk_bytes(k) is None for k in keys)  # moved: gone at a
    hits = b.serve_and_check(PROMPT, tokens, source["choices"][0]["text"])
    print(f"\n[same host] {len(keys)} chunks, {st['bytes']} bytes moved in {st['elapsed_s'] * 1e3:.1f} ms; "
          f"{hits:.0f} external hits on host-b for a {len(tokens)}-token prompt")
