"""Promise 4: the controller is killed and restarted during traffic: sidecars re-register and
re-send their holdings; /lookup answers match the stores again within 5 s; moves started
afterwards succeed; events in flight at the crash are reported failed or unknown — never done."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.integration.conftest import Fleet
from tests.integration.test_controller_sidecars import LOC, fill
from vllm_kvmove.hashing import chunk_spans

BIG = dict(num_layers=8, num_kv_heads=8, head_size=128, block_size=16, chunk_size=32)


def holders(sidecars, tokens) -> dict[str, int]:
    """What /lookup must answer, computed from the stores themselves."""
    out = {}
    for iid, sc in sidecars.items():
        spans = chunk_spans(tokens, sc.layout.chunk_size, sc.fingerprint)
        n = sc.store.match_prefix([s.key for s in spans])
        if n:
            out[iid] = spans[n - 1].end
    return out


def test_controller_killed_during_traffic(tmp_path):
    fleet = Fleet(tmp_path)
    try:
        ids = ["rs-0", "rs-1", "rs-2"]
        sc = {i: fleet.add_sidecar(i, slots=512, **BIG) for i in ids}  # 2 MiB chunks
        prefixes = [list(range(20_000 + 1000 * n, 20_000 + 1000 * n + 160)) for n in range(30)]
        for n, tokens in enumerate(prefixes):
            fill(sc[ids[n % 3]], tokens, seed=n)
        for n, tokens in enumerate(prefixes):
            assert fleet.wait_lookup(tokens, {ids[n % 3]: 160}) == {ids[n % 3]: 160}

        def start(n):
            r = fleet.http.post("/move", json={"old_position": [ids[n % 3], LOC],
                                               "new_position": [ids[(n + 1) % 3], LOC],
                                               "tokens": prefixes[n], "copy": n % 2 == 1})
            return r.json()["event_id"]

        with ThreadPoolExecutor(max_workers=30) as pool:
            events = list(pool.map(start, range(30)))
        fleet.kill_controller()  # SIGKILL, jobs in flight
        t0 = time.monotonic()
        fleet.start_controller()
        for i in ids:
            fleet.wait_registered(i)
        # Within 5 s of the restart, /lookup matches what the stores hold, for every prefix.
        for tokens in prefixes:
            want = holders(sc, tokens)
            assert fleet.wait_lookup(tokens, want, timeout=max(0.1, 5 - (time.monotonic() - t0))) == want
        resync_s = time.monotonic() - t0
        assert resync_s < 5 + 3  # + the controller's own start-up
        # No event from before the crash is reported done: the new controller never saw them.
        for eid in events:
            r = fleet.http.get(f"/events/{eid}")
            assert r.status_code == 404 and "unknown event_id" in r.json()["error"]["message"]
        # The dead controller's transfer pins were released when the sidecars met the new one.
        deadline = time.monotonic() + 5
        while any(s.store.stats()["pinned_chunks"] for s in sc.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(s.store.stats()["pinned_chunks"] == 0 for s in sc.values())
        # Nothing lost: every prefix is still held whole somewhere.
        assert all(holders(sc, tokens) for tokens in prefixes)
        # Moves started afterwards succeed.
        tokens = list(range(90_000, 90_160))
        fill(sc["rs-0"], tokens, seed=99)
        fleet.wait_lookup(tokens, {"rs-0": 160})
        r = fleet.http.post("/move", json={"old_position": ["rs-0", LOC], "new_position": ["rs-2", LOC],
                                           "tokens": tokens})
        assert fleet.wait_job(r.json()["event_id"])["status"] == "done"
        print(f"\n[promise 4] lookup consistent {resync_s:.2f} s after the restart began")
    finally:
        fleet.close()
