"""Promise 6: 100 moves and copies issued concurrently among three instances all end done,
byte-exact; stores hold exactly what the sequence implies; no pin or reference leaks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.harness.api import LOC
from tests.harness.stores import chunk_bytes, fill

N_OPS = 100


def test_100_concurrent_moves_and_copies(fleet):
    ids = ["load-0", "load-1", "load-2"]
    sc = {i: fleet.add_sidecar(i, slots=256) for i in ids}
    plan = []  # (tokens, source, destination, kind, {key: bytes})
    for n in range(N_OPS):
        tokens = list(range(10_000 + 100 * n, 10_000 + 100 * n + 40))  # a full chunk + 8 tokens
        src, dst = ids[n % 3], ids[(n + 1) % 3]
        plan.append((tokens, src, dst, "move" if n % 2 == 0 else "copy", fill(sc[src], tokens, seed=n)))
    for tokens, src, *_ in plan:
        assert fleet.wait_lookup(tokens, {src: 40}) == {src: 40}

    def start(op):
        tokens, src, dst, kind, _ = op
        r = fleet.http.post("/move", json={"old_position": [src, LOC], "new_position": [dst, LOC],
                                           "tokens": tokens, "copy": kind == "copy"})
        assert r.status_code == 200, r.text
        return r.json()["event_id"]

    with ThreadPoolExecutor(max_workers=32) as pool:
        events = list(pool.map(start, plan))
        finals = list(pool.map(lambda e: fleet.wait_job(e, timeout=60), events))
    assert [f["status"] for f in finals] == ["done"] * N_OPS, [f["error"] for f in finals if f["error"]]

    expected: dict[str, set[bytes]] = {i: set() for i in ids}
    for tokens, src, dst, kind, written in plan:
        for key, data in written.items():
            assert chunk_bytes(sc[dst], key) == data  # byte-exact at the destination
            expected[dst].add(key)
            if kind == "copy":
                assert chunk_bytes(sc[src], key) == data
                expected[src].add(key)
        want = {dst: 40} if kind == "move" else {src: 40, dst: 40}
        assert fleet.wait_lookup(tokens, want) == want
    for i in ids:
        assert {k for k, _ in sc[i].store.snapshot()[1]} == expected[i]
        assert sc[i].store.stats()["held_chunks"] == 0
        assert len(sc[i].commands.leases) == 0

    for i in ids:  # delete everything: nothing may stay referenced
        assert fleet.http.post("/clear", json={"instance_id": i}).status_code == 200
    for i in ids:
        st = sc[i].store.stats()
        assert (st["num_chunks"], st["held_chunks"], st["writing_chunks"]) == (0, 0, 0)
        assert st["free_slots"] == st["num_slots"]
    for tokens, *_ in plan[:10]:
        assert fleet.wait_lookup(tokens, {}) == {}
