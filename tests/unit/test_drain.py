"""Drains planned and run against fakes (:mod:`sidecar.controller.drain`): chunks grouped into
prefix families by their parents, units placed whole by room (split parents-first where they
fit nowhere whole), pins carried, a lost destination's units planned again over the others,
a failed batch retried unit by unit, a cancel stopping between batches, the source listed
again for what it gained — and the status saying what moved where and why the rest did not."""

from __future__ import annotations

import asyncio

import pytest

from sidecar import protocol
from sidecar.controller.drain import Drain, DrainHooks, assign, prefix_units
from sidecar.controller.jobs import Job, JobCancelled, JobFailed

SLOT = 100


def key(name: str) -> bytes:
    return name.encode().ljust(16, b".")


def listing(*chains: str, pinned: str = "") -> list[protocol.ChunkListing]:
    """Chunks from chains like ``"a>b>c"`` (b's parent is a), 10 tokens each; chains may share
    their heads (``"a>b>d"``): a chunk is listed once. ``pinned``: names of pinned chunks."""
    out, seen = [], set()
    for chain in chains:
        parent = None
        for name in chain.split(">"):
            if name not in seen:
                seen.add(name)
                out.append(protocol.ChunkListing(key(name), 10, parent and key(parent),
                                                 name in pinned))
            parent = name
    return out


def names(keys) -> str:
    return "".join(k.rstrip(b".").decode() for k in keys)


def test_chunks_group_into_prefix_families_parents_first():
    units = prefix_units(listing("a>b>c", "a>b>d", "e>f", "g"))
    assert sorted(names(u.keys) for u in units) == ["abcd", "ef", "g"]
    # A chunk whose parent is not listed (evicted) starts a unit of its own.
    units = prefix_units(listing("a>b>c")[1:])
    assert [names(u.keys) for u in units] == ["bc"]
    # A parent cycle (a hostile listing) cannot loop: each chunk lands in exactly one unit.
    cycle = [protocol.ChunkListing(key("x"), 10, key("y"), False),
             protocol.ChunkListing(key("y"), 10, key("x"), False)]
    assert sorted(names(u.keys) for u in prefix_units(cycle)) == ["xy"]


def test_units_go_whole_to_the_roomiest_destination_pinned_first_largest_next():
    units = prefix_units(listing("a>b>c>d", "e>f", "g", "p", pinned="p"))
    room = {"d1": 5 * SLOT, "d2": 3 * SLOT}
    plan, skipped = assign(units, room, lambda d, k: SLOT)
    assert not skipped
    placed = {names(u.keys): d for d, us in plan.items() for u in us}
    assert placed["p"] == "d1"  # pinned first, to the roomiest
    assert placed["abcd"] == "d1" and placed["ef"] == "d2" and placed["g"] == "d2"
    assert room == {"d1": 0, "d2": 0}


def test_a_family_too_big_for_any_destination_is_split_parents_first_and_the_rest_skipped():
    units = prefix_units(listing("a>b>c>d>e"))
    plan, skipped = assign(units, {"d1": 2 * SLOT, "d2": 3 * SLOT}, lambda d, k: SLOT)
    assert [names(u.keys) for u in plan["d2"]] == ["abc"] and plan["d1"] == []
    assert plan["d2"][0].keep  # copied: the rest stays at the source and needs it
    ((rest, why),) = skipped
    assert names(rest.keys) == "de" and why.startswith("no room")
    # Chunks a destination holds already cost nothing there.
    held = {key("a"), key("b"), key("c")}
    plan, skipped = assign(prefix_units(listing("a>b>c>d")), {"d1": SLOT},
                           lambda d, k: 0 if k in held else SLOT)
    assert [names(u.keys) for u in plan["d1"]] == ["abcd"] and not skipped


class FakeFleet:
    """Holdings per instance; transfers move keys from "src" (as a move deletes at the source
    once the destination holds them all)."""

    def __init__(self, chunks: list[protocol.ChunkListing], room: dict[str, int]):
        self.src = {c.key: c for c in chunks}
        self.held: dict[str, set[bytes]] = {d: set() for d in room}
        self.pinned: dict[str, set[bytes]] = {d: set() for d in room}
        self.capacity = dict(room)
        self.up = {"src", *room}
        self.batches: list[tuple[str, str]] = []
        self.fail: dict[str, str] = {}  # destination -> kind to fail its transfers with
        self.bad_keys: set[bytes] = set()  # not at the source any more (lease fails)
        self.listings = 0
        self.gained: list[protocol.ChunkListing] = []  # chunks the source gains after listing 1
        self.on_batch = None
        self.kinds: list[str] = []

    async def list_chunks(self):
        self.listings += 1
        if self.listings == 2:
            for c in self.gained:
                self.src[c.key] = c
        return list(self.src.values())

    async def transfer(self, job: Job, dst: str, pinned: set[bytes]):
        await asyncio.sleep(0)
        self.batches.append((dst, names(job.keys)))
        self.kinds.append(job.kind)
        if self.on_batch:
            self.on_batch(dst, job)
        if dst in self.fail:
            if self.fail[dst] == "unavailable":
                self.up.discard(dst)
            raise JobFailed(self.fail[dst], f"fetch at {dst} failed")
        if self.bad_keys & set(job.keys):
            raise JobFailed("not_found", "lease at src failed: chunk is not in the store")
        for k in job.keys:
            if job.kind == "move":
                self.src.pop(k)
        self.held[dst] |= set(job.keys)
        self.pinned[dst] |= pinned
        job.bytes = len(job.keys) * SLOT

    def hooks(self) -> DrainHooks:
        return DrainHooks(self.list_chunks, self.transfer,
                          room=lambda d: self.capacity[d] - len(self.held[d]) * SLOT,
                          chunk_cost=lambda d, k: 0 if k in self.held[d] else SLOT,
                          alive=lambda i: i in self.up, chunk_bytes=lambda n: n * 10)


def drain(fleet: FakeFleet, copy: bool = False, batch_bytes: int = 1 << 30) -> tuple[Job, Drain]:
    job = Job("drain-1", "drain", "src", ",".join(fleet.capacity), [], 0)
    job.drain = Drain(job, list(fleet.capacity), copy, fleet.hooks(), batch_bytes)
    return job, job.drain


def run(d: Drain):
    asyncio.run(d.run())


def test_a_drain_moves_every_family_whole_and_carries_pins():
    fleet = FakeFleet(listing("a>b>c", "a>b>d", "e>f", "g", pinned="ef"), {"d1": 500, "d2": 500})
    job, d = drain(fleet)
    run(d)
    assert not fleet.src
    st = d.to_status()
    assert (st.units_total, st.units_done, st.units_failed, st.units_skipped) == (3, 3, 0, 0)
    assert (st.chunks_total, st.chunks_done) == (7, 7) and d.bytes == 7 * SLOT
    homes = {u: [dst for dst, h in fleet.held.items() if set(map(key, u)) <= h]
             for u in ("abcd", "ef", "g")}
    assert all(len(h) == 1 for h in homes.values()), homes  # each family whole at one place
    assert fleet.pinned[homes["ef"][0]] == {key("e"), key("f")}
    assert {x.instance_id: x.units for x in st.destinations} == {
        dst: sum(1 for h in homes.values() if h == [dst]) for dst in ("d1", "d2")}
    assert job.num_chunks == 7 and job.num_tokens == 70 and job.total_bytes == 700


def test_a_lost_destinations_units_go_to_the_others():
    fleet = FakeFleet(listing("a>b", "c>d", "e>f", "g>h"), {"d1": 800, "d2": 800})
    fleet.fail["d1"] = "unavailable"
    _, d = drain(fleet, batch_bytes=2 * SLOT)
    run(d)
    assert not fleet.src and len(fleet.held["d2"]) == 8
    st = d.to_status()
    assert st.units_done == 4 and not st.problems
    lost = {x.instance_id: x.lost for x in st.destinations}
    assert lost == {"d1": True, "d2": False}
    assert [dst for dst, _ in fleet.batches].count("d1") == 1  # tried once, then replanned


def test_a_failed_batch_is_retried_unit_by_unit_and_only_the_bad_unit_stays():
    fleet = FakeFleet(listing("a>b", "c>d", "e>f"), {"d1": 2000})
    fleet.bad_keys = {key("c")}
    job, d = drain(fleet)
    with pytest.raises(JobFailed) as e:
        run(d)
    assert e.value.kind == "not_found" and "1 of 3 units did not move" in str(e.value)
    assert set(fleet.src) == {key("c"), key("d")}
    st = d.to_status()
    assert (st.units_done, st.units_skipped) == (2, 1)
    (p,) = st.problems
    assert p.first_chunk == key("c").hex() and p.outcome == "skipped" and p.num_chunks == 2
    assert fleet.batches[0][1] == "abcdef"  # one batch of the three, then each alone
    assert sorted(b for _, b in fleet.batches[1:]) == ["ab", "cd", "ef"]


def test_what_fits_nowhere_stays_at_the_source_and_the_job_says_which():
    fleet = FakeFleet(listing("a>b>c>d", "e"), {"d1": 2 * SLOT})
    job, d = drain(fleet)
    with pytest.raises(JobFailed) as e:
        run(d)
    assert e.value.kind == "store_full"
    # The head that fitted is copied: the source keeps the whole family (its tail needs it).
    assert fleet.held["d1"] == {key("a"), key("b")} and fleet.kinds == ["copy"]
    assert set(fleet.src) == {key(x) for x in "abcde"}
    st = d.to_status()
    assert (st.units_total, st.units_done, st.units_skipped) == (3, 1, 2)
    assert {p.first_chunk for p in st.problems} == {key("c").hex(), key("e").hex()}
    assert all(p.reason.startswith("no room") for p in st.problems)


def test_a_cancel_stops_between_batches_and_the_rest_stays():
    fleet = FakeFleet(listing("a", "b", "c", "d"), {"d1": 2000})
    job, d = drain(fleet, batch_bytes=SLOT)
    fleet.on_batch = lambda dst, j: setattr(job, "cancel_requested", True)
    with pytest.raises(JobCancelled) as e:
        run(d)
    assert "1 of 4 units moved" in str(e.value)
    assert len(fleet.src) == 3 and len(fleet.held["d1"]) == 1 and len(fleet.batches) == 1
    st = d.to_status()
    assert st.units_skipped == 3 and {p.reason for p in st.problems} == {"cancelled"}


def test_a_dead_source_fails_what_is_left():
    fleet = FakeFleet(listing("a", "b", "c"), {"d1": 2000})
    job, d = drain(fleet, batch_bytes=SLOT)

    def die(dst, j):
        if len(fleet.batches) == 2:
            fleet.up.discard("src")
            fleet.fail[dst] = "unavailable"

    fleet.on_batch = die
    with pytest.raises(JobFailed):
        run(d)
    st = d.to_status()
    assert (st.units_done, st.units_failed) == (1, 2)
    assert len(fleet.src) == 2  # nothing deleted that did not land
    assert not {x.instance_id: x.lost for x in st.destinations}["d1"]


def test_chunks_the_source_gained_meanwhile_are_drained_in_a_second_round():
    fleet = FakeFleet(listing("a>b"), {"d1": 2000})
    fleet.gained = listing("c>d")
    job, d = drain(fleet)
    run(d)
    assert not fleet.src and fleet.held["d1"] == {key(x) for x in "abcd"}
    assert d.to_status().units_total == 2 and fleet.listings == 3


def test_a_copy_drain_reports_copy():
    fleet = FakeFleet(listing("a"), {"d1": 2000})
    _, d = drain(fleet, copy=True)
    run(d)
    assert d.to_status().copy is True


def test_a_destination_that_begins_a_drain_of_its_own_takes_no_more():
    fleet = FakeFleet(listing("a", "b", "c", "d"), {"d1": 2000, "d2": 2000})
    draining: set[str] = set()
    hooks = fleet.hooks()
    hooks.accepts = lambda d: d in fleet.up and d not in draining
    job = Job("drain-1", "drain", "src", "d1,d2", [], 0)
    job.drain = d = Drain(job, ["d1", "d2"], False, hooks, batch_bytes=SLOT)
    fleet.on_batch = lambda dst, j: draining.add("d1")  # after the first batch, wherever it went
    run(d)
    assert not fleet.src
    first = fleet.batches[0][0]
    assert [dst for dst, _ in fleet.batches].count("d1") == (1 if first == "d1" else 0)
    assert {x.instance_id: x.lost for x in d.to_status().destinations}["d1"]
