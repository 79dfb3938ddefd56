"""Drains between real sidecars over NIXL (a real controller process, no vLLM): ``POST /drain``
and ``kvmove drain`` empty an instance into the others — each prefix family whole at one
destination, bytes identical, the operator's pins carried over; a drain that cannot fit copies
what fits and says what stays; a destination killed mid-drain leaves its share to the others
and nothing is lost; while an instance drains it takes no KV and ``/instances`` says so; a
cancel stops it between batches; bad requests are refused with the error envelope and start
nothing."""

from __future__ import annotations

import time

import pytest

from tests.harness.api import LOC, wait_sole_holder
from tests.harness.stores import BIG_LAYOUT, chunk_bytes, fill, fill_synthetic, keys_of
from tests.harness.stores import synthetic_chunk
from vllm_kvmove.hashing import chunk_spans

CHUNK = 32  # tokens per chunk of the tiny layout
MiB = 1 << 20


def prompt(seed: int, chunks: int, head: list[int] | None = None) -> list[int]:
    """``chunks`` chunks of tokens: ``head`` (whole chunks) then tokens of ``seed``."""
    head = head or []
    return head + [seed * 1000 + i for i in range(chunks * CHUNK - len(head))]


def drain(fleet, instance_id: str, **body) -> dict:
    r = fleet.http.post("/drain", json={"instance_id": instance_id, **body})
    assert r.status_code == 200, r.text
    return r.json()


def draining(fleet, instance_id: str) -> str:
    listed = {i["instance_id"]: i for i in fleet.http.get("/instances").json()["instances"]}
    return listed[instance_id]["draining"]


def test_a_drain_empties_the_source_into_the_others_whole_prefixes_pins_and_bytes(fleet, capsys):
    src = fleet.add_sidecar("dr-src", slots=32)
    dests = {"dr-d1": fleet.add_sidecar("dr-d1", slots=8),
             "dr-d2": fleet.add_sidecar("dr-d2", slots=8)}
    p1 = prompt(1, 4)
    p2 = prompt(2, 4, head=p1[:2 * CHUNK])  # shares p1's first two chunks: one family
    p3, p4 = prompt(3, 3), prompt(4, 2)
    data = {}
    for seed, p in enumerate((p1, p2, p3, p4)):
        data |= fill(src, p, seed=100 * seed)
    assert len(data) == 11
    fleet.wait_lookup(p4, {"dr-src": len(p4)})
    r = fleet.http.post("/pin", json={"instance_id": "dr-src", "location": LOC, "tokens": p4})
    assert r.status_code == 200, r.text

    assert fleet.kvmove("drain", "--from", "dr-src", "--wait") == 0
    out = capsys.readouterr().out
    assert "drain dr-src -> dr-d1, dr-d2" in out and "done: 3 of 3 prefixes (11 chunks)" in out
    job = fleet.http.get("/events", params={"limit": 1}).json()["events"][0]
    assert job["kind"] == "drain" and job["status"] == "done", job
    d = job["drain"]
    assert (d["units_total"], d["units_done"], d["chunks_done"]) == (3, 3, 11) and not d["problems"]
    assert job["bytes"] == job["total_bytes"] == 11 * src.layout.chunk_bytes

    assert src.store.stats()["num_chunks"] == 0
    # Each prompt whole at exactly one destination.
    homes = [wait_sole_holder(fleet.http, p, set(dests), timeout=10) for p in (p1, p2, p3, p4)]
    for p, home in zip((p1, p2, p3, p4), homes):
        for k in keys_of(src, p):
            assert chunk_bytes(dests[home], k) == data[k]
    home1, home2, _, home4 = homes
    assert home1 == home2  # one family
    pinned = {s.key for s in dests[home4].store.summaries() if s.pinned}
    assert pinned == set(keys_of(src, p4))
    # Parents travel too: a later drain of the destination keeps the family together.
    parents = {s.key: s.parent for s in dests[home1].store.summaries()}
    k1 = keys_of(src, p1)
    assert [parents[k] for k in k1] == [None] + k1[:-1]
    assert draining(fleet, "dr-src") == ""


def test_a_drain_that_cannot_fit_copies_what_fits_and_says_what_stays(fleet):
    src = fleet.add_sidecar("fit-src", slots=32, model="fit")
    dst = fleet.add_sidecar("fit-d", slots=4, model="fit")
    p1 = prompt(5, 4)
    p2 = prompt(6, 4, head=p1[:2 * CHUNK])
    p3 = prompt(7, 3)
    for p in (p1, p2, p3):
        fill(src, p)
    fleet.wait_lookup(p3, {"fit-src": len(p3)})
    eid = drain(fleet, "fit-src")["event_id"]
    st = fleet.wait_job(eid)
    assert st["status"] == "failed" and st["error_kind"] == "store_full", st
    d = st["drain"]
    assert (d["units_total"], d["units_done"], d["units_skipped"]) == (3, 1, 2)
    stays = {(p["first_chunk"], p["num_chunks"]) for p in d["problems"]}
    assert stays == {(keys_of(src, p2)[2].hex(), 2), (keys_of(src, p3)[0].hex(), 3)}
    assert all(p["reason"].startswith("no room") for p in d["problems"])
    # p1 (the family's head, parents first) fitted and was copied; the source keeps all.
    assert fleet.wait_lookup(p1, {"fit-src": len(p1), "fit-d": len(p1)})
    assert src.store.stats()["num_chunks"] == 9 and dst.store.stats()["num_chunks"] == 4


def test_while_an_instance_drains_it_takes_no_kv_and_a_cancel_stops_it(fleet, capsys):
    # 512 KiB chunks, drained at 8 MiB/s: 64 chunks take 4 s.
    layout = dict(model="slow", num_layers=4, num_kv_heads=8, head_size=128)
    src = fleet.add_sidecar("slow-src", slots=64, **layout)
    dst = fleet.add_sidecar("slow-d", slots=64, **layout)
    other = fleet.add_sidecar("slow-o", slots=8, **layout)
    families = [prompt(10 + i, 4) for i in range(16)]
    data = {}
    for i, p in enumerate(families):
        data |= fill(src, p, seed=10 * i)
    small = prompt(40, 1)
    fill(other, small)
    fleet.wait_lookup(families[-1], {"slow-src": 4 * CHUNK})
    eid = drain(fleet, "slow-src", to=["slow-d"], max_bytes_per_s=8 * MiB)["event_id"]

    assert draining(fleet, "slow-src") == eid and draining(fleet, "slow-d") == ""
    r = fleet.move("slow-o", "slow-src", tokens=small)
    assert r.status_code == 409 and "drained" in r.json()["error"]["message"], r.text
    r = fleet.http.post("/drain", json={"instance_id": "slow-src"})
    assert r.status_code == 409 and eid in r.json()["error"]["message"], r.text
    r = fleet.http.post("/drain", json={"instance_id": "slow-o", "to": ["slow-src"]})
    assert r.status_code == 409, r.text
    assert fleet.kvmove("instances") == 0
    assert "up, draining" in capsys.readouterr().out

    while fleet.http.get(f"/events/{eid}").json()["drain"]["units_done"] < 2:
        time.sleep(0.05)
    st = fleet.http.post(f"/events/{eid}/cancel", params={"wait": 30}).json()
    assert st["status"] == "cancelled", st
    d = st["drain"]
    assert 2 <= d["units_done"] < 16 and d["units_skipped"] == 16 - d["units_done"]
    assert {p["reason"] for p in d["problems"]} == {"cancelled"}
    # Nothing lost: each family whole at the source or at the destination, bytes intact.
    moved = 0
    for p in families:
        home = wait_sole_holder(fleet.http, p, {"slow-src", "slow-d"}, timeout=10)
        moved += home == "slow-d"
        sc = dst if home == "slow-d" else src
        for k in keys_of(src, p):
            assert chunk_bytes(sc, k) == data[k]
    assert moved == d["units_done"]
    # Over: moves into it are taken again.
    assert draining(fleet, "slow-src") == ""
    r = fleet.move("slow-o", "slow-src", tokens=small, copy=True)
    assert r.status_code == 200, r.text
    assert fleet.wait_job(r.json()["event_id"])["status"] == "done"


def test_a_destination_killed_mid_drain_leaves_its_share_to_the_other(fleet):
    """16 MiB chunks at 32 MiB/s: the victim's batch is mid-way when it is killed; its units go
    to the survivor, the source deletes nothing that did not land, nothing is lost."""
    big = dict(model=BIG_LAYOUT.model, num_layers=16, num_kv_heads=8, head_size=128,
               block_size=128, chunk_size=256)
    src = fleet.add_sidecar("kill-src", slots=8, **big)
    survivor = fleet.add_sidecar("kill-live", slots=8, **big)
    victim = fleet.spawn_sidecar("kill-dead", BIG_LAYOUT, 8)
    prompts = [list(range(1 + 1000 * i, 1 + 1000 * i + 512)) for i in range(4)]
    for i, p in enumerate(prompts):
        fill_synthetic(src.store, src.fingerprint, 10 * i, p)
    fleet.wait_lookup(prompts[-1], {"kill-src": 512})
    eid = drain(fleet, "kill-src", max_bytes_per_s=32 * MiB)["event_id"]
    deadline = time.monotonic() + 10
    while fleet.http.get(f"/events/{eid}").json()["bytes"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    fleet.cluster.kill(victim)
    st = fleet.wait_job(eid, timeout=60)
    assert st["status"] == "done", st
    dests = {x["instance_id"]: x for x in st["drain"]["destinations"]}
    assert dests["kill-dead"]["lost"] and dests["kill-dead"]["units"] == 0
    assert dests["kill-live"]["units"] == 4 and st["drain"]["units_done"] == 4
    assert src.store.stats()["num_chunks"] == 0
    for i, p in enumerate(prompts):
        for j, s in enumerate(chunk_spans(p, 256, src.fingerprint)):
            expect = synthetic_chunk(survivor.layout, s.num_tokens, 10 * i + j)
            assert chunk_bytes(survivor, s.key) == expect.numpy().tobytes()


@pytest.mark.parametrize("body, status, kind", [
    ({"instance_id": "nobody"}, 404, "not_found"),
    ({"instance_id": "bad-src", "to": ["bad-src"]}, 400, "bad_request"),
    ({"instance_id": "bad-src", "to": ["bad-other"]}, 409, "incompatible"),
    ({"instance_id": "bad-src", "to": []}, 400, "bad_request"),
    ({"instance_id": "bad-src", "max_bytes_per_s": 5}, 400, "bad_request"),
    ({"to": ["bad-src"]}, 400, "bad_request"),
    ({"instance_id": "bad-src"}, 503, "unavailable"),  # no other instance of its model
])
def test_a_bad_drain_is_refused_and_starts_nothing(fleet, body, status, kind):
    if "bad-src" not in fleet.sidecars:
        fill(fleet.add_sidecar("bad-src", model="lonely"), prompt(50, 2))
        fleet.add_sidecar("bad-other", model="another")
        fleet.wait_lookup(prompt(50, 2), {"bad-src": 2 * CHUNK})
    before = len(fleet.http.get("/events?limit=1000").json()["events"])
    r = fleet.http.post("/drain", json=body)
    assert r.status_code == status and r.json()["error"]["kind"] == kind, r.text
    assert len(fleet.http.get("/events?limit=1000").json()["events"]) == before
    listed = {i["instance_id"]: i for i in fleet.http.get("/instances").json()["instances"]}
    assert listed["bad-src"]["draining"] == "" and listed["bad-src"]["num_chunks"] == 2


def test_a_sidecar_leaving_is_drained_and_hears_how_it_ended(fleet):
    """What an engine with ``drain_on_shutdown`` does at exit (:meth:`Sidecar.leave`): the
    controller drains it and tells it the outcome; with nowhere to go it hears why at once."""
    src = fleet.add_sidecar("lv-src", slots=16, model="leaving")
    dst = fleet.add_sidecar("lv-d", slots=16, model="leaving")
    p1, p2 = prompt(60, 3), prompt(61, 2)
    data = fill(src, p1) | fill(src, p2, seed=7)
    ended = src.leave(timeout=30)  # the drain lists the store itself: no wait for the index
    assert ended is not None and ended.status == "done", ended
    assert (ended.units_done, ended.units_total, ended.chunks_done) == (2, 2, 5)
    assert ended.destinations == ["lv-d"] and ended.bytes == 5 * src.layout.chunk_bytes
    assert src.store.stats()["num_chunks"] == 0
    for k, v in data.items():
        assert chunk_bytes(dst, k) == v

    alone = fleet.add_sidecar("lv-alone", slots=4, model="alone")
    fill(alone, prompt(62, 1))
    ended = alone.leave(timeout=30)
    assert ended is not None and ended.status == "failed" and ended.event_id == ""
    assert "no other instance" in ended.error
    assert alone.store.stats()["num_chunks"] == 1
    # No controller to ask (it is gone, or none is configured): no wait at all.
    lonely = fleet.add_sidecar("lv-none", slots=4, model="alone", wait=False,
                               config={"controller_reply_url": "", "controller_pull_url": ""})
    t0 = time.monotonic()
    assert lonely.leave(timeout=30) is None and time.monotonic() - t0 < 1


def test_a_batch_move_takes_several_prefixes_or_everything_in_one_job(fleet, capsys):
    src = fleet.add_sidecar("bm-src", slots=16, model="batch")
    dst = fleet.add_sidecar("bm-d", slots=16, model="batch")
    small = fleet.add_sidecar("bm-small", slots=2, model="batch")
    p1, p3, p4 = prompt(71, 3), prompt(73, 2), prompt(74, 2)
    data = fill(src, p1) | fill(src, p3, seed=3) | fill(src, p4, seed=4)
    fleet.wait_lookup(p4, {"bm-src": len(p4)})
    before = len(fleet.http.get("/events?limit=1000").json()["events"])
    for body, status, kind in (
            ({"prefixes": []}, 400, "bad_request"),
            ({"prefixes": [p1], "tokens": p1}, 400, "bad_request"),
            ({"all": True, "prefixes": [p1]}, 400, "bad_request"),
            ({"prefixes": [[1, -2]]}, 400, "bad_request"),
            ({"prefixes": [prompt(99, 1)]}, 404, "not_found")):
        r = fleet.move("bm-src", "bm-d", **body)
        assert r.status_code == status and r.json()["error"]["kind"] == kind, (body, r.text)
    r = fleet.move("bm-src", "bm-small", prefixes=[p1, p3])
    assert r.status_code == 507 and r.json()["error"]["kind"] == "store_full", r.text
    assert len(fleet.http.get("/events?limit=1000").json()["events"]) == before

    r = fleet.move("bm-src", "bm-d", prefixes=[p1, p3])
    assert r.status_code == 200 and r.json()["num_tokens"] == len(p1) + len(p3), r.text
    st = fleet.wait_job(r.json()["event_id"])
    assert st["status"] == "done" and st["kind"] == "move", st
    assert (st["drain"]["units_done"], st["drain"]["chunks_done"]) == (2, 5)
    for p in (p1, p3):
        assert wait_sole_holder(fleet.http, p, {"bm-d"}, timeout=10) == "bm-d"
    assert wait_sole_holder(fleet.http, p4, {"bm-src"}, timeout=10) == "bm-src"

    assert fleet.kvmove("move", "--from", "bm-src", "--to", "bm-d", "--all", "--copy",
                        "--wait") == 0
    assert f"copy bm-src -> bm-d: {len(p4)} tokens" in capsys.readouterr().out
    st = fleet.http.get("/events", params={"limit": 1}).json()["events"][0]
    assert st["status"] == "done" and st["kind"] == "copy" and st["drain"]["units_done"] == 1
    fleet.wait_lookup(p4, {"bm-src": len(p4), "bm-d": len(p4)})
    for k, v in data.items():
        assert chunk_bytes(dst, k) == v
    assert draining(fleet, "bm-src") == ""  # a batch move is no drain
