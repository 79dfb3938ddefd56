"""The controller's HTTP API as tests call it: moves, lookups, and waits that raise on timeout
with what they last saw (a wait that returns quietly on timeout hides failures)."""

from __future__ import annotations

import time

from sidecar.protocol import FINAL_STATES, LOCATION

LOC = LOCATION


def post_move(http, src: str, dst: str, **body):
    """POST /move from ``src`` to ``dst`` (both at LocalCPUBackend); ``body`` adds tokens,
    prompt, copy..."""
    return http.post("/move", json={"old_position": [src, LOC], "new_position": [dst, LOC], **body})


def wait_job(http, event_id: str, timeout: float = 60) -> dict:
    """Long-poll the controller until the job is in a final state; its status. Raises
    AssertionError on timeout, with the last status seen."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        st = http.get(f"/events/{event_id}", params={"wait": max(0.0, min(left, 60))}).json()
        if st["status"] in FINAL_STATES:
            return st
        if left <= 0:
            raise AssertionError(f"job {event_id} did not end in {timeout} s: {st}")


def lookup(http, tokens: list[int]) -> dict[str, int]:
    """POST /lookup once: ``{instance: matched_tokens}``."""
    r = http.post("/lookup", json={"tokens": tokens})
    assert r.status_code == 200, r.text
    return {k: v[1] for k, v in r.json()["layout_info"].items()}


def wait_lookup(http, tokens: list[int], expect: dict[str, int], timeout: float = 5) -> dict:
    """Poll POST /lookup until it answers ``{instance: matched_tokens}`` == ``expect``; returns
    it. Raises AssertionError after ``timeout`` seconds, with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        got = lookup(http, tokens)
        if got == expect:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"/lookup still answers {got}, not {expect}, after {timeout} s")
        time.sleep(0.02)


def wait_sole_holder(http, tokens: list[int], among: set[str], timeout: float = 30) -> str:
    """Poll POST /lookup until exactly one instance holds any of ``tokens`` — one of
    ``among``, holding all of them — and return it (a prefix moved whole to one place, the
    index settled). Raises AssertionError after ``timeout`` seconds, with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        got = lookup(http, tokens)
        if len(got) == 1 and set(got) <= among and next(iter(got.values())) == len(tokens):
            return next(iter(got))
        if time.monotonic() > deadline:
            raise AssertionError(f"{tokens[:3]}...: held by {got}, not by one of {among}")
        time.sleep(0.02)


def kill_mid_move(http, src: str, dst: str, tokens: list[int], kill, copy: bool,
                  max_bytes_per_s: int) -> tuple[dict, float]:
    """Start a move (or copy) of ``tokens`` from ``src`` to ``dst`` capped at
    ``max_bytes_per_s`` (so that it lasts long enough to be interrupted whatever the machine's
    speed), call ``kill()`` once some bytes moved while the job still runs, and wait for the
    job's end.

    Returns the job's final status and the seconds from the kill to the end. Fails the test
    if the job ends before it could be interrupted or is not mid-transfer at the kill.
    """
    r = post_move(http, src, dst, tokens=tokens, copy=copy, max_bytes_per_s=max_bytes_per_s)
    assert r.status_code == 200, r.text
    eid = r.json()["event_id"]
    deadline = time.monotonic() + 30
    while True:
        st = http.get(f"/events/{eid}").json()
        assert st["status"] in ("pending", "running"), f"too fast to interrupt: {st}"
        if st["bytes"] > 0:
            break
        assert time.monotonic() < deadline, f"no bytes moved in 30 s: {st}"
        time.sleep(0.002)
    assert st["bytes"] < st["total_bytes"]
    kill()
    killed = time.monotonic()
    final = wait_job(http, eid, timeout=30)
    return final, time.monotonic() - killed


def wait_settled(store_info, timeout: float) -> dict:
    """Poll ``store_info()`` (a sidecar's ``/store`` answer) until nothing is being written or
    held there — every interrupted fetch settled (committed whole, or dropped) and every lease
    ended; returns it. Raises AssertionError after ``timeout`` seconds, with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        store = store_info()
        if store["writing_chunks"] == 0 and store["held_chunks"] == 0:
            return store
        if time.monotonic() > deadline:
            raise AssertionError(f"the store did not settle in {timeout} s: {store}")
        time.sleep(0.2)


def wait_instances_up(http, ids: set[str], timeout: float = 30) -> None:
    """Poll the controller's ``/instances`` until every one of ``ids`` is listed and up.
    Raises AssertionError after ``timeout`` seconds, naming those that are not."""
    deadline = time.monotonic() + timeout
    while True:
        up = {i["instance_id"] for i in http.get("/instances").json()["instances"] if i["up"]}
        if ids <= up:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"instances not up after {timeout} s: {sorted(ids - up)}")
        time.sleep(0.2)
