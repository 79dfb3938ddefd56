"""ChunkIndex against a plain model (``{holder: {key: num_tokens}}``) under random changes,
and snapshots applied in slices: readers see the old holdings whole until the new ones are in,
a replacement can be abandoned, and the registry holds events back until the switch."""

from __future__ import annotations

import asyncio
import random

import pytest

from sidecar import protocol
from sidecar.controller import index as index_mod
from sidecar.controller.index import ChunkIndex
from sidecar.controller.instances import InstanceRegistry
from vllm_kvmove.hashing import ChunkSpan

KEYS = [bytes([i]) * 16 for i in range(40)]
HOLDERS = [f"h{i}" for i in range(6)]


def spans(keys: list[bytes]) -> list[ChunkSpan]:
    return [ChunkSpan(k, 16 * i, 16 * (i + 1)) for i, k in enumerate(keys)]


def check(ix: ChunkIndex, model: dict[str, dict[bytes, int]]) -> None:
    for h in HOLDERS:
        held = model.get(h, {})
        assert ix.count(h) == len(held)
        assert sorted(ix.keys_of(h)) == sorted(held)
        for k in KEYS:
            assert ix.num_tokens(h, k) == held.get(k, 0)
            assert ix.holds(h, k) == (k in held)
    assert len(ix) == len({k for held in model.values() for k in held})
    for _ in range(20):
        prompt = random.sample(KEYS, 4)
        expect = {}
        for h, held in model.items():
            n = 0
            while n < len(prompt) and prompt[n] in held:
                n += 1
            if n:
                expect[h] = n
            assert ix.held_prefix(h, spans(prompt)) == n
        assert ix.prefix_holders(spans(prompt)) == expect


@pytest.mark.parametrize("seed", range(6))
def test_random_changes_match_a_plain_model(seed, monkeypatch):
    monkeypatch.setattr(index_mod, "_COMPACT_SLACK", 2)  # compact often
    random.seed(seed)
    ix, model = ChunkIndex(), {}
    for step in range(600):
        h, k = random.choice(HOLDERS), random.choice(KEYS)
        r = random.random()
        if r < 0.5:
            n = random.choice([1, 16, 256, 65536])
            ix.add(h, k, n)
            model.setdefault(h, {})[k] = n
        elif r < 0.85:
            ix.remove(h, k)
            model.get(h, {}).pop(k, None)
        elif r < 0.95:
            chunks = [(c, random.randint(1, 300)) for c in random.sample(KEYS, random.randint(0, 12))]
            ix.replace(h, chunks)
            model[h] = dict(chunks)
        else:
            ix.drop_instance(h)
            model.pop(h, None)
        model = {h: held for h, held in model.items() if held}
        if step % 25 == 0:
            check(ix, model)
    check(ix, model)


def test_many_holders_of_one_key_are_packed_and_unpacked():
    ix = ChunkIndex()
    names = [f"e{i}" for i in range(30)]
    for i, name in enumerate(names):
        ix.add(name, KEYS[0], i + 1)
    assert ix.prefix_holders(spans(KEYS[:1])) == {n: 1 for n in names}
    ix.add("e7", KEYS[0], 999)  # a new count for one in the middle
    for name in names[::2]:
        ix.remove(name, KEYS[0])
    assert {n: ix.num_tokens(n, KEYS[0]) for n in names} == \
        {n: (999 if n == "e7" else i + 1) if i % 2 else 0 for i, n in enumerate(names)}
    with pytest.raises(ValueError):
        ix.add("e1", KEYS[1], 1 << 17)


def test_a_replacement_in_slices_shows_the_old_holdings_until_it_switches(monkeypatch):
    monkeypatch.setattr(index_mod, "SLICE_KEYS", 4)
    ix = ChunkIndex()
    ix.replace("a", [(k, 16) for k in KEYS[:10]])
    ix.add("b", KEYS[0], 16)
    steps = ix.replace_steps("a", [(k, 32) for k in KEYS[5:25]])
    for _ in range(5):  # 4, 8, .. 20 of 20 linked: not switched yet
        assert next(steps) is False
        assert ix.count("a") == 10 and ix.num_tokens("a", KEYS[5]) == 16
        assert ix.prefix_holders(spans(KEYS[:12])) == {"a": 10, "b": 1}
        assert ix.prefix_holders(spans(KEYS[20:22])) == {}
    assert next(steps) is True  # switched; the old holdings are being released
    assert ix.count("a") == 20 and ix.num_tokens("a", KEYS[5]) == 32
    assert ix.prefix_holders(spans(KEYS[5:25])) == {"a": 20}
    assert ix.prefix_holders(spans(KEYS[:2])) == {"b": 1}
    assert list(steps) == [True]  # 10 old keys, 4 a slice: released 4, 8, then the rest
    assert len(ix) == 21 and sorted(ix.keys_of("a")) == sorted(KEYS[5:25])


@pytest.mark.parametrize("how", ["drop", "replace", "close"])
def test_an_abandoned_replacement_leaves_no_trace(monkeypatch, how):
    monkeypatch.setattr(index_mod, "SLICE_KEYS", 4)
    ix = ChunkIndex()
    ix.replace("a", [(k, 16) for k in KEYS[:10]])
    steps = ix.replace_steps("a", [(k, 32) for k in KEYS[20:40]])
    next(steps)
    next(steps)
    if how == "drop":
        ix.drop_instance("a")
        expect = {}
    elif how == "replace":
        ix.replace("a", [(KEYS[30], 8)])
        expect = {KEYS[30]: 8}
    else:
        steps.close()
        expect = {k: 16 for k in KEYS[:10]}
    assert list(steps) == []
    assert {k: ix.num_tokens("a", k) for k in KEYS if ix.holds("a", k)} == expect
    assert len(ix) == len(expect) and ix.count("a") == len(expect)


def test_a_generator_closed_while_releasing_finishes_the_release(monkeypatch):
    monkeypatch.setattr(index_mod, "SLICE_KEYS", 4)
    ix = ChunkIndex()
    ix.replace("a", [(k, 16) for k in KEYS[:20]])
    steps = ix.replace_steps("a", [(KEYS[39], 1)])
    next(steps)  # switched, released 4 of the old 20
    steps.close()
    assert len(ix) == 1 and ix.prefix_holders(spans(KEYS[:1])) == {}


def test_the_registry_applies_a_big_snapshot_in_slices_and_holds_events_back(monkeypatch):
    monkeypatch.setattr(index_mod, "SLICE_KEYS", 4)
    ix = ChunkIndex()
    registry = InstanceRegistry(ix, heartbeat_timeout_s=5)

    class M:  # the members' fields apply_snapshot / apply_events use
        holder = "m"
        applied_seq = 0
        behind_since = None
        num_chunks = 0
        snapshot_task = None
        held_back = None

        @staticmethod
        def describe() -> str:
            return "m"

    m = M()
    registry._by_holder["m"] = m  # as registered
    ix.replace("m", [(k, 16) for k in KEYS[:8]])

    async def scenario() -> None:
        snap = protocol.Snapshot("m", 5, protocol.pack_chunks((k, 32) for k in KEYS[10:30]))
        registry.apply_snapshot(m, snap)
        assert m.snapshot_task is not None and m.applied_seq == 5
        assert ix.count("m") == 8  # old holdings, whole, until the switch
        ev = [protocol.StoreEventMsg(6, "evict", KEYS[10], 32),
              protocol.StoreEventMsg(7, "admit", KEYS[35], 16)]
        assert registry.apply_events(m, ev) is None
        assert m.applied_seq == 7 and not ix.holds("m", KEYS[35])
        assert registry.apply_events(m, [protocol.StoreEventMsg(9, "admit", KEYS[36], 16)]) \
            == "event gap"
        await m.snapshot_task
        assert m.snapshot_task is None and m.held_back is None
        assert sorted(ix.keys_of("m")) == sorted(KEYS[11:30] + [KEYS[35]])
        # A snapshot of one slice is in at once (the old holdings' release may go on).
        registry.apply_snapshot(m, protocol.Snapshot("m", 9, protocol.pack_chunks([(KEYS[0], 8)])))
        assert list(ix.keys_of("m")) == [KEYS[0]] and m.held_back is None
        registry.apply_events(m, [protocol.StoreEventMsg(10, "admit", KEYS[1], 8)])
        assert ix.holds("m", KEYS[1])
        await m.snapshot_task
        assert len(ix) == 2
        # Another snapshot while one is being applied abandons it (and its held events).
        registry.apply_snapshot(m, snap)
        registry.apply_events(m, [protocol.StoreEventMsg(6, "admit", KEYS[36], 16)])
        first = m.snapshot_task
        registry.apply_snapshot(m, protocol.Snapshot("m", 3, protocol.pack_chunks([(KEYS[2], 8)])))
        await first
        assert list(ix.keys_of("m")) == [KEYS[2]] and len(ix) == 1

    asyncio.run(scenario())
