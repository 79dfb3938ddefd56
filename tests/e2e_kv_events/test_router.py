"""``kvmove-router`` in front of two real engines (the package's: KV events on, a controller):
requests follow the KV — a repeated prompt goes where vLLM's prefix cache holds it (from the
engines' own KV events), a moved prompt goes to the engine whose host store now holds it
(hits >= N-1 there, the source's greedy output) — answers stream through as they come, a
client that goes away ends the engine's work, and an engine that cannot be reached is skipped
without the client seeing it."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time

import httpx
import pytest

from sidecar.router.app import head_digest, rendezvous
from tests.harness.api import LOC, wait_lookup
from tests.harness.engines import BY_SOURCE, HITS
from tests.harness.processes import free_port

N = 700


@pytest.fixture(scope="module")
def router(fleet):
    port = free_port()
    proc = fleet.local.start_router(port, ["--controller", fleet.controller_url])
    fleet.local.wait_ready(proc, timeout=60)
    client = router_client(proc.url)
    deadline = time.monotonic() + 20
    while client.get("/health").json()["engines_up"] < 2:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.2)
    yield client
    client.close()
    fleet.local.stop(proc)


def router_client(url: str) -> httpx.Client:
    """A client of the router that opens a connection per request: on this 2-core host the
    router's loop, starved for seconds by busy engines, closed a kept-alive connection as its
    idle timer fired late, just as the next poll was sent on it ("Server disconnected without
    sending a response", seen in CI)."""
    return httpx.Client(base_url=url, timeout=120,
                        limits=httpx.Limits(max_keepalive_connections=0))


def router_sees(router, engine: str, check, timeout: float = 20.0) -> dict:
    """Poll the router's /health until ``check(its view of engine)`` holds (the engines' KV
    events and /metrics reach it asynchronously); that view."""
    deadline = time.monotonic() + timeout
    while True:
        view = router.get("/health").json()["by_engine"][engine]
        if check(view):
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.1)


def complete(client, model, prompt, **extra) -> httpx.Response:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                             "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4000) for _ in range(N)]


def test_a_repeated_prompt_goes_where_vllms_prefix_cache_holds_it(fleet, router):
    model = fleet.engines["ev1"].model
    tokens = prompt(101)
    before = {iid: router.get("/health").json()["by_engine"][iid]["gpu_blocks"]
              for iid in fleet.engines}
    first = complete(router, model, tokens)
    engine = first.headers["x-kvmove-engine"]
    # The engine's KV events of that step reach the router: the prompt's 5 full blocks.
    router_sees(router, engine, lambda v: v["gpu_blocks"] >= before[engine] + N // 128)
    for _ in range(2):
        again = complete(router, model, tokens)
        assert again.headers["x-kvmove-engine"] == engine
        assert again.headers["x-kvmove-route"] == "gpu"
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= N - 128
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]


def test_after_a_move_the_next_request_goes_to_the_destination(fleet, router):
    ev1, ev2 = fleet.engines["ev1"], fleet.engines["ev2"]
    tokens = prompt(202)
    before = router.get("/health").json()["by_engine"]["ev1"]["gpu_blocks"]
    reference = ev1.complete(tokens)
    router_sees(router, "ev1", lambda v: v["gpu_blocks"] >= before + N // 128)
    # ev1's own prefix cache is dropped (as an engine being drained or restarted loses it):
    # its GPU tier no longer holds the prompt, only the host store does, until the move.
    # (vLLM publishes the reset at its next step: a short request makes one.)
    ev1.http.post("/reset_prefix_cache").raise_for_status()
    ev1.complete("a step", max_tokens=1)
    router_sees(router, "ev1", lambda v: v["gpu_blocks"] <= 1)  # the reset reached it
    assert wait_lookup(fleet.http, tokens, {"ev1": N}, timeout=30) == {"ev1": N}
    r = fleet.http.post("/move", params={"wait": 60}, json={
        "old_position": ["ev1", LOC], "new_position": ["ev2", LOC], "tokens": tokens})
    assert r.json()["status"] == "done", r.text
    hits0, host0 = ev2.metric(HITS), ev2.metric(BY_SOURCE, source="host")
    out = complete(router, ev2.model, tokens)
    assert out.headers["x-kvmove-engine"] == "ev2" and out.headers["x-kvmove-route"] == "host"
    hits = ev2.metric(HITS) - hits0
    assert hits >= N - 1 and ev2.metric(BY_SOURCE, source="host") - host0 == hits
    assert out.json()["choices"][0]["text"] == reference["choices"][0]["text"]


def test_a_streamed_answer_is_passed_through_whole(fleet, router):
    """vLLM's own event stream through the router: every event, in order, the same greedy text
    as the answer unstreamed. (That the router relays each event as it comes, without
    buffering, is proven without timing in tests/unit/test_router_stream.py: timing a real
    engine's stream here measured this 2-core machine's scheduling as often as the router.)"""
    model = fleet.engines["ev1"].model
    body = {"model": model, "prompt": prompt(303), "max_tokens": 64, "temperature": 0,
            "ignore_eos": True}
    with router.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 3 and events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == complete(router, model, body["prompt"], max_tokens=64,
                                ignore_eos=True).json()["choices"][0]["text"]


def test_a_client_that_goes_away_ends_the_engines_work(fleet, router):
    model = fleet.engines["ev1"].model
    running = "vllm:num_requests_running"
    with router.stream("POST", "/v1/completions", json={
            "model": model, "prompt": prompt(404), "max_tokens": 3000, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        engine = fleet.engines[r.headers["x-kvmove-engine"]]
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream itself
        next(lines)  # the answer has started
        # The engine's gauge follows its scheduler's stats, a step or a busy /metrics late.
        deadline = time.monotonic() + 10
        while engine.metric(running) < 1:
            assert time.monotonic() < deadline, "the engine never counted the request running"
            next(lines)
    # The client is gone: the router closes its upstream request, and vLLM aborts it long
    # before 3,000 tokens could have been generated.
    deadline = time.monotonic() + 10
    while engine.metric(running) > 0:
        assert time.monotonic() < deadline, "the engine kept generating for a gone client"
        time.sleep(0.2)


def test_an_engine_busy_with_other_clients_requests_is_avoided(fleet, router):
    """Load counts what the engine itself reports (running + waiting, from its /metrics), not
    only the router's own requests: ev1 holds a 700-token prompt (served straight to it), and
    while it generates for clients that went straight to it, that prompt goes to the idle ev2
    (one request in flight outweighs 1,024 tokens of prefix). (A busy engine answers /metrics
    seconds late here: the router's view lags by that much.) A prompt no engine holds is
    another matter: it may go to an engine one request busier than the least loaded, to keep
    the prefixes spread (unit-tested)."""
    ev1 = fleet.engines["ev1"]
    tokens = prompt(506)
    ev1.complete(tokens)
    assert wait_lookup(fleet.http, tokens, {"ev1": N}, timeout=30) == {"ev1": N}
    with contextlib.ExitStack() as stack:
        busy(stack, ev1, router)
        out = complete(router, ev1.model, tokens)
        assert out.headers["x-kvmove-engine"] == "ev2", router.get("/health").json()


def busy(stack: contextlib.ExitStack, engine, router) -> None:
    """Keep ``engine`` busy with six long generations, straight to it (not through the
    router), until ``stack`` closes — each one started again when it ends, so the engine stays
    busy however long the router takes to see it (its /metrics, which a busy engine here
    answers seconds late; on a fast host 3,000 tokens can end before that) — and return once
    the router sees them in the engine's own count."""
    stop = threading.Event()

    def generate(seed: int, max_tokens: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError), httpx.stream(
                    "POST", engine.url + "/v1/completions", timeout=120, json={
                        "model": engine.model, "prompt": prompt(seed), "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True}) as stream:
                for _ in stream.iter_lines():
                    if stop.is_set():
                        break  # closing the stream makes vLLM abort the request
            stop.wait(0.05)  # not a tight loop should the engine refuse

    # Lengths that differ: equal ones run in lockstep and end on the same step, and a
    # /metrics read in the moment before they start again sees the engine idle (the router
    # then counted no load and routed to it: seen in CI). Six, not three: on a starved host
    # the client threads took seconds to start theirs again, and vLLM's count of three
    # differing ones still read 0 once in CI.
    threads = [threading.Thread(target=generate, args=(505 + 10 * i, 3000 - 200 * i),
                                daemon=True) for i in range(6)]
    for t in threads:
        t.start()

    def end() -> None:
        stop.set()
        for t in threads:
            t.join(30)
    stack.callback(end)
    # The router reads the engines' /metrics every 0.5 s; a busy engine answers late.
    router_sees(router, engine.instance_id, lambda v: v["others"] >= 1, timeout=60)


def test_pull_on_route_copies_a_busy_holders_prefix_to_an_idle_engine(fleet):
    """With pull-on-route on: ev1 holds a prompt (its host store) but is busy, ev2 is idle —
    the router copies the prefix to ev2, then sends the request there: served from the copied
    KV (hits >= N-1, ev1's greedy output)."""
    ev1, ev2 = fleet.engines["ev1"], fleet.engines["ev2"]
    tokens = prompt(606)
    reference = ev1.complete(tokens)
    assert wait_lookup(fleet.http, tokens, {"ev1": N}, timeout=30) == {"ev1": N}
    port = free_port()
    proc = fleet.local.start_router(port, ["--controller", fleet.controller_url,
                                           "--pull-min-tokens", "256", "--pull-wait", "10"])
    fleet.local.wait_ready(proc, timeout=60)
    try:
        with router_client(proc.url) as client, \
                contextlib.ExitStack() as stack:
            deadline = time.monotonic() + 20
            while client.get("/health").json()["engines_up"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            busy(stack, ev1, client)
            # The precondition: ev2 idle *and up*. On this 2-core machine ev1's busy engine can
            # starve ev2's sidecar of CPU for over the controller's 5 s heartbeat timeout (ev2
            # then counts as down: a known, undiagnosed effect of two engines on two cores, see
            # benchmarks/README "P2b"); wait for it to be back rather than test routing to a
            # down engine.
            deadline = time.monotonic() + 30
            while not client.get("/health").json()["by_engine"]["ev2"]["usable"]:
                assert time.monotonic() < deadline, client.get("/health").json()
                time.sleep(0.2)
            hits0 = ev2.metric(HITS)
            seen = client.get("/health").json()  # what the router saw, should this fail
            out = complete(client, ev2.model, tokens)
            why = (out.headers, seen, [line for line in client.get("/metrics").text.splitlines()
                                       if line.startswith("kvmove_router_pulls_total")])
            assert out.headers["x-kvmove-engine"] == "ev2", why
            assert out.headers["x-kvmove-route"] == "pulled", why
            assert ev2.metric(HITS) - hits0 >= N - 1
            assert out.json()["choices"][0]["text"] == reference["choices"][0]["text"]
            assert 'kvmove_router_pulls_total{outcome="done"} 1.0' in client.get("/metrics").text
    finally:
        fleet.local.stop(proc)


def test_an_engine_that_cannot_be_reached_is_skipped(fleet):
    """A router given a dead engine beside ev1, and a prompt whose rendezvous hash prefers
    ``dead`` (neither engine holds it: ties go by that hash): the request sent there is re-sent
    to ev1 without the client seeing it, the dead engine is kept out of rotation, and both are
    counted."""
    port, dead = free_port(), free_port()
    proc = fleet.local.start_router(port, ["--engine", f"dead=http://127.0.0.1:{dead}",
                                           "--engine", f"ev1={fleet.engines['ev1'].url}"])
    fleet.local.wait_ready(proc, timeout=60)
    try:
        with router_client(proc.url) as client:
            model = fleet.engines["ev1"].model
            # Token ids need no tokenizing: "dead" first by the hash, then re-sent.
            tokens = next([5, 6, 7, t] for t in range(8, 200)
                          if rendezvous(head_digest([5, 6, 7, t]), "dead")
                          > rendezvous(head_digest([5, 6, 7, t]), "ev1"))
            out = complete(client, model, tokens)
            assert out.headers["x-kvmove-engine"] == "ev1"
            for i in range(3):
                assert complete(client, model, f"hello {i}").headers["x-kvmove-engine"] == "ev1"
            metrics = client.get("/metrics").text
        assert 'kvmove_router_retries_total{engine="dead"} 1.0' in metrics
        assert 'kvmove_router_engine_failures_total{engine="dead",stage="request"} 1.0' in metrics
    finally:
        fleet.local.stop(proc)
