"""A tensor-parallel engine in the controller, without sockets: its ranks' sidecars register
as one instance, which is up only while every rank is, holds a chunk only where every rank
holds its shard, and moves rank by rank (a lane per rank), deleting at the source only once
every rank of the destination holds every chunk."""

from __future__ import annotations

import asyncio
import time

import pytest

from sidecar import protocol
from sidecar.controller.instances import holder_name
from sidecar.controller.jobs import Conversion, Job, JobFailed, Lane, Source, run_transfer
from sidecar.controller.service import Controller
from sidecar.controller.settings import ControllerSettings
from sidecar.httpkit import ApiError
from tests.harness.stores import tiny_layout
from tests.unit.test_channel import Wire
from tests.unit.test_channel import register as channel_register
from tests.unit.test_job_fetch_window import MiB
from vllm_kvmove.hashing import chunk_spans


def register(iid: str, rank: int, world_size: int = 2, incarnation: str = "one",
             **layout_over) -> protocol.Register:
    """Rank ``rank``'s registration, of the tiny layout (``layout_over``: other fields)."""
    layout = tiny_layout(**layout_over)
    return channel_register(
        iid, f"{incarnation}-{rank}", sidecar_url=f"http://127.0.0.1:{10 + rank}",
        p2p_url=f"127.0.0.1:{20 + rank}", agent_name=f"{iid}-{rank}",
        fingerprint=layout.fingerprint(), layout=layout.to_dict(), rank=rank,
        world_size=world_size)


def conn(iid: str, rank: int) -> bytes:
    return f"conn-{iid}-{rank}".encode()


def test_ranks_register_as_one_instance_that_is_up_only_with_every_rank():
    w = Wire()
    w.receive(conn("e", 0), register("e", 0))
    inst = w.registry.get("e")
    assert inst.world_size == 2 and not w.registry.is_up(inst)  # rank 1 still missing
    with pytest.raises(ApiError, match=r"rank\(s\) \[1\] of 2 not registered"):
        w.registry.require_up(inst)
    w.receive(conn("e", 1), register("e", 1))
    assert [type(m).__name__ for _, m in w.sent] == ["RegisterAck", "RegisterAck"]
    assert w.registry.is_up(inst) and len(w.registry) == 1
    assert w.registry.bound(conn("e", 1)).holder == holder_name("e", 1) != "e"
    # Rank 1 goes silent: the engine is down, and says which rank.
    inst.members[1].last_heartbeat = time.monotonic() - 60
    assert not w.registry.is_up(inst)
    with pytest.raises(ApiError, match=r"rank\(s\) \[1\] of 2"):
        w.registry.require_up(inst)
    assert w.registry.down_holders() == {holder_name("e", 1)}


def test_a_rank_that_disagrees_with_a_live_rank_is_refused_and_displaces_nothing():
    w = Wire()
    w.receive(conn("e", 0), register("e", 0))
    w.receive(conn("e", 1), register("e", 1, world_size=4, incarnation="other"))
    assert isinstance(w.sent[-1][1], protocol.RegisterRefused)
    assert "world_size: 4 != 2" in w.sent[-1][1].reason
    w.receive(conn("e", 1), register("e", 1, hash_seed="other"))
    assert isinstance(w.sent[-1][1], protocol.RegisterRefused) and "fingerprint" in w.sent[-1][1].reason
    w.receive(conn("e", 9), register("e", 2))  # rank outside the world
    assert isinstance(w.sent[-1][1], protocol.RegisterRefused)
    assert "rank 2 is not below world_size 2" in w.sent[-1][1].reason
    assert list(w.registry.get("e").members) == [0]
    # Once rank 0 is down, an engine restarted with another degree takes the name over.
    w.registry.get("e").members[0].last_heartbeat = time.monotonic() - 60
    w.receive(conn("e", 5), register("e", 0, world_size=1, incarnation="new"))
    assert isinstance(w.sent[-1][1], protocol.RegisterAck)
    assert w.registry.get("e").world_size == 1 and w.registry.is_up(w.registry.get("e"))


def test_a_goodbye_of_one_rank_leaves_the_engine_down_and_its_other_rank_known():
    w = Wire()
    for r in (0, 1):
        w.receive(conn("e", r), register("e", r))
    w.receive(conn("e", 1), protocol.Goodbye("e"))
    inst = w.registry.get("e")
    assert list(inst.members) == [0] and not w.registry.is_up(inst)
    w.receive(conn("e", 0), protocol.Goodbye("e"))
    assert w.registry.get("e") is None


def snapshot(iid: str, keys: list[bytes]) -> protocol.Snapshot:
    return protocol.Snapshot(iid, 0, protocol.pack_chunks((k, 32) for k in keys))


def test_lookup_and_holdings_count_a_chunk_only_where_every_rank_holds_it():
    ctl = Controller(ControllerSettings())
    w = Wire()
    w.registry, w.channel.registry = ctl.registry, ctl.registry  # the controller's registry
    tokens = list(range(32 * 4))
    fp = tiny_layout().fingerprint()
    keys = [s.key for s in chunk_spans(tokens, 32, fp)]
    for r in (0, 1):
        w.receive(conn("tp", r), register("tp", r))
    w.receive(conn("one", 0), register("one", 0, world_size=1))
    ctl.registry.apply_snapshot(ctl.registry.bound(conn("tp", 0)), snapshot("tp", keys))
    ctl.registry.apply_snapshot(ctl.registry.bound(conn("tp", 1)), snapshot("tp", keys[:2]))
    ctl.registry.apply_snapshot(ctl.registry.bound(conn("one", 0)), snapshot("one", keys[:3]))
    # Rank 0 holds 4 chunks, rank 1 two: the engine can load two.
    assert ctl.lookup(tokens) == {"tp": 64, "one": 96}
    tp = ctl.registry.get("tp")
    assert ctl.registry.count_chunks(tp) == 2 and ctl.registry.holds(tp, keys[1])
    assert not ctl.registry.holds(tp, keys[2])
    spans = chunk_spans(tokens, 32, fp)
    assert [s.key for s in ctl.held_prefix(tp, spans)] == keys[:2]
    # A store event at rank 1 completes a third chunk.
    ctl.registry.apply_events(ctl.registry.bound(conn("tp", 1)),
                              [protocol.StoreEventMsg(1, "admit", keys[2], 32)])
    assert ctl.lookup(tokens)["tp"] == 96
    # An engine with a rank down is left out of lookups, whatever it holds.
    tp.members[1].last_heartbeat = time.monotonic() - 60
    assert ctl.lookup(tokens) == {"one": 96}


class RankedSidecars:
    """Fake sidecars of a TP=2 move: sources ``s`` and ``s\\x001`` (two 1 MiB chunks each),
    destinations ``d`` and ``d\\x001``; fails the fetches at ``fail_fetch_at`` and the lease at
    ``fail_lease_at``; records every command as (holder, kind, detail)."""

    def __init__(self, fail_fetch_at: str = "", fail_lease_at: str = ""):
        self.fail_fetch_at, self.fail_lease_at = fail_fetch_at, fail_lease_at
        self.log: list[tuple[str, str, object]] = []
        self.req_ids = iter(range(1, 1000))

    async def command(self, holder: str, msg, timeout=None, depends_on=()) -> protocol.Reply:
        msg.req_id = next(self.req_ids)
        await asyncio.sleep(0.001)
        if isinstance(msg, protocol.LeaseChunks):
            self.log.append((holder, "lease", msg.req_id))
            if holder == self.fail_lease_at:
                return protocol.Reply(req_id=msg.req_id, ok=False, error_kind="not_found",
                                      error="evicted")
            chunks = [protocol.ChunkDesc(k, 32, i * MiB, MiB, 0) for i, k in enumerate(msg.keys)]
            return protocol.Reply(req_id=msg.req_id, ok=True, chunks=chunks)
        if isinstance(msg, protocol.FetchChunks):
            self.log.append((holder, "fetch", (msg.source.agent_name, depends_on)))
            if msg.convert is not None:
                self.log.append((holder, "convert", tuple(s.rank for s in msg.convert.shards)))
            if holder == self.fail_fetch_at:
                return protocol.Reply(req_id=msg.req_id, ok=False, error_kind="transfer",
                                      error="link down")
            return protocol.Reply(req_id=msg.req_id, ok=True, bytes=MiB * len(msg.chunks))
        if isinstance(msg, protocol.EndLease):
            self.log.append((holder, "end", (msg.delete, msg.transferred_bytes)))
            return protocol.Reply(req_id=msg.req_id, ok=True)
        raise AssertionError(msg)


LANES = [Lane(holder_name("d", r), (Source(holder_name("s", r), protocol.PeerInfo(
    "s", f"s-agent-{r}", f"127.0.0.1:{20 + r}", "x"), r),)) for r in (0, 1)]


def run(fake: RankedSidecars, lanes: list[Lane] = LANES,
        conversion: Conversion | None = None) -> tuple[Job, Exception | None]:
    async def main():
        job = Job("j", "move", "s", "d", [b"a" * 16, b"b" * 16], 64)
        try:
            await run_transfer(job, lanes, fake.command, fetch_batch_bytes=MiB, lease_s=60,
                               conversion=conversion)
        except JobFailed as e:
            return job, e
        finally:
            await asyncio.sleep(0.02)  # the destinations' leases end in the background
        return job, None

    return asyncio.run(main())


def test_a_move_between_tensor_parallel_engines_goes_rank_to_rank_and_deletes_once_all_hold():
    fake = RankedSidecars()
    job, err = run(fake)
    assert err is None and job.bytes == job.total_bytes == 4 * MiB
    # Each destination rank read its shard from the same rank of the source, and depends on it.
    fetches = [(h, d) for h, what, d in fake.log if what == "fetch"]
    assert sorted(fetches) == sorted(
        [("d", ("s-agent-0", ("s",)))] * 2 + [("d\x001", ("s-agent-1", ("s\x001",)))] * 2)
    # Both sources delete, each told its own share, and only after every fetch of both ranks.
    ends = [(i, h, d) for i, (h, what, d) in enumerate(fake.log) if what == "end" and h[0] == "s"]
    assert sorted((h, d) for _, h, d in ends) == [("s", (True, 2 * MiB)), ("s\x001", (True, 2 * MiB))]
    last_fetch = max(i for i, (_, what, _) in enumerate(fake.log) if what == "fetch")
    assert all(i > last_fetch for i, _, _ in ends)


def test_a_failed_rank_deletes_nothing_at_any_source_rank():
    fake = RankedSidecars(fail_fetch_at="d\x001")
    job, err = run(fake)
    assert err is not None and "fetch at d rank 1 failed: link down" in str(err)
    ends = {h: d for h, what, d in fake.log if what == "end" and h[0] == "s"}
    assert ends["s"][0] is False and ends["s\x001"][0] is False


def test_a_lease_refused_at_one_rank_ends_the_others_and_moves_nothing():
    fake = RankedSidecars(fail_lease_at="s\x001")
    job, err = run(fake)
    assert err is not None and err.kind == "not_found" and "lease at s rank 1" in str(err)
    assert not [1 for _, what, _ in fake.log if what == "fetch"]
    assert [(h, d) for h, what, d in fake.log if what == "end"] == [("s", (False, 0))]


def converting(**over):
    """A layout whose packing this repository converts (amx: multiples of 16)."""
    return dict(backend="cpu_attn/amx", head_size=16, **over)


def test_the_plan_between_engines_of_different_tensor_parallelism():
    ctl = Controller(ControllerSettings())
    w = Wire()
    w.registry, w.channel.registry = ctl.registry, ctl.registry
    for r in (0, 1):
        w.receive(conn("tp", r), register("tp", r, **converting(num_kv_heads=1, total_kv_heads=2)))
    w.receive(conn("one", 0), register("one", 0, world_size=1, **converting(num_kv_heads=2)))
    w.receive(conn("odd", 0), register("odd", 0, world_size=1, num_kv_heads=2, head_size=16))
    assert [type(m).__name__ for _, m in w.sent] == ["RegisterAck"] * 4
    tp, one, odd = (ctl.registry.get(i) for i in ("tp", "one", "odd"))
    # Join: rank 0 of "one" reads both ranks of "tp", and converts from tp's format.
    lanes, conversion = ctl._plan(tp, one)
    assert [(ln.destination, [(s.holder, s.rank) for s in ln.sources]) for ln in lanes] == [
        ("one", [("tp", 0), ("tp\x001", 1)])]
    assert conversion == Conversion(tp.reg.layout, 2)
    # Split: each rank of "tp" reads rank 0 of "one".
    lanes, conversion = ctl._plan(one, tp)
    assert [(ln.destination, [s.holder for s in ln.sources]) for ln in lanes] == [
        ("tp", ["one"]), ("tp\x001", ["one"])]
    assert conversion == Conversion(one.reg.layout, 1)
    # Twins: no conversion, rank to rank.
    assert ctl._plan(one, one)[1] is None
    # A format this repository cannot convert is refused before anything starts, naming it.
    with pytest.raises(ApiError, match=r"backend: 'cpu_attn/amx' != 'test'.*no conversion is "
                                       r"known for backend 'test'") as e:
        ctl.create_move(one, odd, list(range(64)), copy=True)
    assert e.value.kind == "incompatible"


def test_a_split_leases_its_one_source_once_and_every_fetch_converts():
    lanes = [Lane(holder_name("d", r), (Source("s", protocol.PeerInfo("s", "s-agent-0", "x:1", "x"),
                                               0),)) for r in (0, 1)]
    fake = RankedSidecars()
    job, err = run(fake, lanes, Conversion({"fake": 1}, 1))
    assert err is None and job.bytes == job.total_bytes == 4 * MiB  # each rank read it whole
    assert [h for h, what, _ in fake.log if what == "lease"] == ["s"]
    assert sorted((h, d) for h, what, d in fake.log if what == "convert") == [
        ("d", (0,)), ("d", (0,)), ("d\x001", (0,)), ("d\x001", (0,))]
    ends = [(h, d) for h, what, d in fake.log if what == "end" and h == "s"]
    assert ends == [("s", (True, 4 * MiB))]


def test_a_tensor_parallel_engine_drains_rank_by_rank_into_another_format():
    """A drain of a TP=2 engine into a TP=1 one: the listing is every rank's (a chunk counts
    where both ranks hold it), the one destination rank reads and converts both source ranks'
    shards, both source ranks delete once it holds them, and both hear how the drain ended."""
    async def main():
        ctl = Controller(ControllerSettings())
        w = Wire()
        w.registry, w.channel.registry = ctl.registry, ctl.registry
        for r in (0, 1):
            w.receive(conn("tp", r), register("tp", r, **converting(num_kv_heads=1,
                                                                     total_kv_heads=2)))
        w.receive(conn("one", 0), register("one", 0, world_size=1, **converting(num_kv_heads=2)))
        tp = ctl.registry.get("tp")
        keys = [s.key for s in chunk_spans(list(range(96)), 32, tp.reg.fingerprint)]
        listing = [protocol.ChunkListing(k, 32, keys[i - 1] if i else None, False)
                   for i, k in enumerate(keys)]
        log: list[tuple[str, object, tuple]] = []

        async def command(holder, msg, timeout=None, depends_on=()):
            msg.req_id = len(log) + 1
            log.append((holder, msg, depends_on))
            if isinstance(msg, protocol.ListChunks):  # rank 1 lacks the third chunk's shard
                return protocol.Reply(req_id=msg.req_id, ok=True,
                                      listing=listing[:2] if holder == "tp\x001" else listing)
            if isinstance(msg, protocol.LeaseChunks):
                return protocol.Reply(req_id=msg.req_id, ok=True, chunks=[
                    protocol.ChunkDesc(k, 32, i * 4096, 4096, 0) for i, k in enumerate(msg.keys)])
            if isinstance(msg, protocol.FetchChunks):
                return protocol.Reply(req_id=msg.req_id, ok=True, bytes=8192 * len(msg.chunks))
            return protocol.Reply(req_id=msg.req_id, ok=True)

        ctl.channel.command = command
        ctl.channel._send = w.channel._send  # recorded
        job = ctl.create_drain(tp, None, copy=False)
        assert ctl.draining == {"tp": job.event_id} and job.destination == "one"
        st = await job.wait(10)
        await asyncio.sleep(0.02)  # the destination's lease ends in the background
        return ctl, w, job, st, keys, log

    ctl, w, job, st, keys, log = asyncio.run(main())
    assert st.status == "done" and (st.drain.units_done, st.drain.chunks_done) == (1, 2), st
    assert not ctl.draining
    by_kind = lambda kind: [(h, m, d) for h, m, d in log if isinstance(m, kind)]  # noqa: E731
    # Listed at each rank twice: for the plan, then for what the source gained meanwhile.
    assert sorted(h for h, _, _ in by_kind(protocol.ListChunks)) == ["tp", "tp", "tp\x001",
                                                                      "tp\x001"]
    assert sorted((h, tuple(m.keys)) for h, m, _ in by_kind(protocol.LeaseChunks)) == [
        ("tp", tuple(keys[:2])), ("tp\x001", tuple(keys[:2]))]
    ((holder, fetch, depends),) = by_kind(protocol.FetchChunks)
    assert holder == "one" and [s.rank for s in fetch.convert.shards] == [0, 1]
    assert set(depends) == {"tp", "tp\x001"} and fetch.chunks[1].key == keys[1]
    deletes = sorted(h for h, m, _ in by_kind(protocol.EndLease) if m.delete)
    assert deletes == ["tp", "tp\x001"]
    told = [(ident, m) for ident, m in w.sent if isinstance(m, protocol.DrainEnded)]
    assert sorted(ident for ident, _ in told) == [conn("tp", 0), conn("tp", 1)]
    assert all(m.status == "done" and m.event_id == job.event_id for _, m in told)
