"""The controller's SidecarChannel, without sockets: a reply ends a command only when it comes
on the connection of the instance the command went to; registrations bind instances to
connections; bad messages are dropped and counted."""

from __future__ import annotations

import asyncio

from sidecar import protocol
from sidecar.controller.channel import SidecarChannel
from sidecar.controller.index import ChunkIndex
from sidecar.controller.instances import InstanceRegistry
from sidecar.controller.metrics import ControllerMetrics
from sidecar.controller.settings import ControllerSettings
from tests.harness.stores import tiny_layout


def register(iid: str, incarnation: str = "one", **over) -> protocol.Register:
    """A registration of the tiny layout (``over``: other Register fields)."""
    layout = tiny_layout()
    fields = dict(
        instance_id=iid, engine_url="http://127.0.0.1:1", sidecar_url="http://127.0.0.1:2",
        p2p_url="127.0.0.1:3", agent_name=iid, model=layout.model,
        fingerprint=layout.fingerprint(), layout=layout.to_dict(), chunk_size=layout.chunk_size,
        capacity_bytes=1 << 20, slot_bytes=layout.chunk_bytes, incarnation=incarnation, pid=1)
    return protocol.Register(**(fields | over))


class Wire:
    """A channel whose sends are recorded instead of sent."""

    def __init__(self) -> None:
        index = ChunkIndex()
        self.registry = InstanceRegistry(index, heartbeat_timeout_s=5)
        self.channel = SidecarChannel(ControllerSettings(), self.registry, "ctl",
                                      ControllerMetrics(self.registry, index))
        self.sent: list[tuple[bytes, object]] = []
        self.channel._send = lambda identity, msg: self.sent.append((identity, msg))

    def receive(self, identity: bytes, msg) -> None:
        self.channel._on_router_message([identity, protocol.sidecar_encoder.encode(msg)])


def test_a_reply_counts_only_from_the_connection_of_the_instance_commanded():
    async def main():
        w = Wire()
        w.receive(b"conn-a", register("a"))
        w.receive(b"conn-b", register("b"))
        assert [type(m).__name__ for _, m in w.sent] == ["RegisterAck", "RegisterAck"]
        fut = asyncio.get_running_loop().create_future()
        w.channel._pending[77] = ("a", fut, ())
        for stranger in (b"conn-b", b"conn-nobody"):  # another instance, or no instance at all
            w.receive(stranger, protocol.Reply(req_id=77, ok=True, bytes=1 << 30))
            assert not fut.done()
        assert w.channel.dropped["router", "unexpected_reply"] == 2
        w.receive(b"conn-a", protocol.Reply(req_id=77, ok=True, bytes=5))
        assert fut.done() and fut.result().bytes == 5
        assert 77 not in w.channel._pending

    asyncio.run(main())


def test_request_ids_start_at_a_random_origin():
    a, b = Wire().channel, Wire().channel
    assert next(a._req_ids) != next(b._req_ids)  # a restarted controller's ids are not the last's


def test_an_instance_speaks_only_on_the_connection_it_registered_on():
    w = Wire()
    w.receive(b"conn-a", register("a"))
    # Another connection, another start of "a" while it is live: refused, nothing displaced.
    w.receive(b"conn-x", register("a", incarnation="two"))
    assert isinstance(w.sent[-1][1], protocol.RegisterRefused) and w.sent[-1][0] == b"conn-x"
    assert w.registry.bound(b"conn-a").instance_id == "a" and w.registry.bound(b"conn-x") is None
    # A heartbeat from an unbound connection is told to register; from the bound one, acked.
    w.receive(b"conn-x", protocol.Heartbeat("a", 0, 0, 0, 1, 1))
    assert isinstance(w.sent[-1][1], protocol.Resync)
    w.receive(b"conn-a", protocol.Heartbeat("a", 0, 0, 0, 1, 1))
    assert isinstance(w.sent[-1][1], protocol.HeartbeatAck) and w.sent[-1][0] == b"conn-a"
    # The same start on a new connection (it reconnected) is rebound there.
    w.receive(b"conn-a2", register("a"))
    assert isinstance(w.sent[-1][1], protocol.RegisterAck)
    assert w.registry.bound(b"conn-a2").instance_id == "a" and w.registry.bound(b"conn-a") is None
    # A Goodbye frees the name: a new start may take it at once.
    w.receive(b"conn-a2", protocol.Goodbye("a"))
    w.receive(b"conn-x", register("a", incarnation="two"))
    assert isinstance(w.sent[-1][1], protocol.RegisterAck)


def test_bad_messages_are_dropped_and_counted_and_the_loop_goes_on():
    w = Wire()
    ch = w.channel
    ch._on_router_message([b"only-one-frame"])
    ch._on_router_message([b"a", b"b", b"c"])
    ch._on_router_message([b"conn", b"\x81"])  # a map, cut short
    ch._on_router_message([b"conn", protocol.sidecar_encoder.encode({"type": "Register"})])
    ch._on_event_batch([b"x", b"y"])
    ch._on_event_batch([b"\x92garbage"])
    assert ch.dropped == {("router", "frames"): 2, ("router", "undecodable"): 1,
                          ("router", "invalid"): 1, ("pull", "frames"): 1,
                          ("pull", "undecodable"): 1}
    assert isinstance(w.sent[-1][1], protocol.RegisterRefused)  # the invalid one is told why
    w.receive(b"conn-a", register("a"))  # and the channel still works
    assert isinstance(w.sent[-1][1], protocol.RegisterAck)


def test_a_command_fails_when_its_instance_or_one_it_depends_on_goes_down():
    async def main():
        w = Wire()
        for iid in ("src", "dst", "other"):
            w.receive(f"conn-{iid}".encode(), register(iid))
        loop = asyncio.get_running_loop()
        fetch, plain = loop.create_future(), loop.create_future()
        w.channel._pending[1] = ("dst", fetch, ("src",))  # a fetch at dst, reading from src
        w.channel._pending[2] = ("dst", plain, ())
        w.channel.fail_commands_on_the_down()
        assert not fetch.done() and not plain.done()  # everyone heartbeats
        w.registry.member("src").last_heartbeat -= 60  # the source goes silent
        w.channel.fail_commands_on_the_down()
        assert fetch.done() and "instance src stopped heartbeating" in fetch.result().error
        assert fetch.result().error_kind == "unavailable" and not plain.done()
        w.registry.member("dst").last_heartbeat -= 60
        w.channel.fail_commands_on_the_down()
        assert "instance dst" in plain.result().error

    asyncio.run(main())


def test_a_snapshot_travels_packed_and_a_malformed_one_changes_nothing():
    """A snapshot's chunks are one bytes field (20 bytes a chunk), read as they are applied:
    a record with an impossible token count is skipped, bytes that are not whole records drop
    the snapshot (counted) and leave the holdings as they were."""
    w = Wire()
    w.receive(b"conn-a", register("a"))
    keys = [bytes([i]) * 16 for i in range(1, 6)]
    packed = protocol.pack_chunks([(k, 32) for k in keys[:3]] + [(keys[3], 0)])
    assert len(packed) == 4 * protocol.SNAPSHOT_RECORD.size
    assert list(protocol.unpack_chunks(packed)) == [(k, 32) for k in keys[:3]]
    w.receive(b"conn-a", protocol.Snapshot("a", 0, packed))
    index = w.registry.index
    assert [index.held_prefix("a", [_Span(k)]) for k in keys] == [1, 1, 1, 0, 0]
    w.receive(b"conn-a", protocol.Snapshot("a", 0, protocol.pack_chunks([(keys[4], 8)]) + b"x"))
    assert w.channel.dropped["router", "invalid"] == 1
    assert [index.held_prefix("a", [_Span(k)]) for k in keys] == [1, 1, 1, 0, 0]


class _Span:
    """Just what ChunkIndex.held_prefix reads of a span."""

    def __init__(self, key: bytes):
        self.key = key
