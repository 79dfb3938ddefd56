"""SidecarChannel: the controller's ZMQ sockets to the sidecars, and its command RPC.

Contract
--------
* Two sockets, opened by :meth:`SidecarChannel.start` on the controller's event loop (the
  app's lifespan): a ROUTER on the reply port — sidecars register, heartbeat and answer
  commands on it — and a PULL on the pull port (store events). With the fleet secret both are
  CURVE servers admitting fleet members only (:class:`~vllm_kvmove.zmqauth.FleetSecurity`);
  without it they bind to loopback only.
* Identity: ROUTER routing ids are the ones ZMQ assigns per connection (no handover): a
  sidecar (one rank of an instance, a :class:`~sidecar.controller.instances.Member`) is bound to
  the connection its accepted registration came on
  (:class:`~sidecar.controller.instances.InstanceRegistry`), and only that connection speaks
  for it. Commands address sidecars by their holder name
  (:func:`~sidecar.controller.instances.holder_name`: the instance id for rank 0). A message
  from a connection bound to no sidecar gets a :class:`~sidecar.protocol.Resync` (a
  reconnected sidecar then registers again), unless it is a reply, which is dropped.
* Every receive loop survives any input: a message with the wrong number of frames, one that
  does not decode, or one that breaks a bound (oversized: ZMQ drops the connection at
  ``MAXMSGSIZE``) is dropped, counted in ``kvmove_dropped_messages_total{socket,reason}`` and
  logged once per reason; a refused registration is answered with the reason
  (:class:`~sidecar.protocol.RegisterRefused`). Every heartbeat is acknowledged.
* Commands: :meth:`SidecarChannel.command` assigns a ``req_id`` (unique per controller start,
  from a random origin), sends, and awaits the :class:`~sidecar.protocol.Reply` carrying it
  *from the connection of the sidecar it was sent to*; any number may be in flight to one
  sidecar. It never raises for a peer's fault: a timeout, a sidecar that is not registered
  or that stops heartbeating while a command is in flight — the one commanded, or another the
  command depends on (a fetch's source) — (the watchdog notices within 0.25 s) all come back
  as a failed Reply with a kind (``timeout``, ``unavailable``).
* Sends never wait (see :mod:`sidecar.zmqio`); a message to a peer that is away is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import Counter
from typing import Any, Callable

import msgspec
import zmq

from sidecar import protocol
from sidecar.controller.instances import (InstanceRegistry, Member, describe_holder,
                                         holder_name)
from sidecar.controller.metrics import ControllerMetrics
from sidecar.controller.settings import ControllerSettings
from sidecar.zmqio import LoopSocket, serve_forever
from vllm_kvmove.zmqauth import FleetSecurity

logger = logging.getLogger("vllm_kvmove.controller")

# How often the watchdog looks for commands in flight to instances that went down.
_WATCHDOG_S = 0.25
# Largest message read on each socket: a snapshot of a million chunks is ~22 MiB; an event
# batch is small. ZMQ drops the connection of a peer that sends more.
_MAX_ROUTER_MESSAGE = 256 << 20
_MAX_PULL_MESSAGE = 64 << 20


class SidecarChannel:
    """The controller's side of the sidecar protocol.

    Args:
        settings: ports, interface, command timeout, API token.
        registry: where registrations, heartbeats, snapshots and events go.
        controller_id: this controller's id, sent in every RegisterAck (a sidecar that sees
            it change knows the old controller's jobs are gone).
        metrics: where dropped messages are counted.
    """

    def __init__(self, settings: ControllerSettings, registry: InstanceRegistry,
                 controller_id: str, metrics: ControllerMetrics):
        self.settings = settings
        self.registry = registry
        self.controller_id = controller_id
        self.metrics = metrics
        self.security = FleetSecurity(settings.api_token)
        # In-flight commands: req_id -> (holder, future of its Reply, the holders it depends
        # on besides).
        self._pending: dict[int, tuple[str, asyncio.Future, tuple[str, ...]]] = {}
        # A random origin: a reply to a previous controller's command never matches ours.
        self._req_ids = itertools.count(secrets.randbits(52) + 1)
        self._router: LoopSocket | None = None
        self._pull: LoopSocket | None = None
        self._tasks: list[asyncio.Task] = []
        self.dropped: Counter[tuple[str, str]] = Counter()  # (socket, reason) -> messages
        # Called with the member whose engine is shutting down (its Leaving): the controller
        # drains the instance.
        self.on_leaving: Callable[[Member], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind both sockets and start the receive loops.

        Raises:
            SecurityError: the interface is not loopback and there is no secret.
        """
        ctx = zmq.Context.instance()
        host = "127.0.0.1" if self.settings.host == "localhost" else self.settings.host
        self.security.check_bind(host, "the controller's ZMQ sockets")
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, _MAX_ROUTER_MESSAGE)
        self.security.server(router)
        router.bind(f"tcp://{host}:{self.settings.reply_port}")
        self._router = LoopSocket(router)
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.MAXMSGSIZE, _MAX_PULL_MESSAGE)
        self.security.server(pull)
        pull.bind(f"tcp://{host}:{self.settings.pull_port}")
        self._pull = LoopSocket(pull)
        self._tasks = [
            asyncio.create_task(serve_forever(self._router, self._on_router_message, "router")),
            asyncio.create_task(serve_forever(self._pull, self._on_event_batch, "pull")),
            asyncio.create_task(self._watchdog_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in (self._router, self._pull):
            if s is not None:
                s.close()

    # -- commands --------------------------------------------------------------------------
    async def command(self, holder: str, msg: Any, timeout: float | None = None,
                      depends_on: tuple[str, ...] = ()) -> protocol.Reply:
        """Send one command (its ``req_id`` is set here) and await the reply.

        Args:
            holder: the sidecar commanded (:func:`~sidecar.controller.instances.holder_name`:
                the instance id for rank 0).
            msg: the command.
            timeout: longest wait (default: the settings' ``command_timeout_s``).
            depends_on: other sidecars the command needs alive (a fetch's source): if one
                stops heartbeating, the command fails at once rather than when the commanded
                sidecar's own transport notices.
        Returns:
            The sidecar's Reply, or a failed Reply of kind ``timeout`` or ``unavailable``.
        """
        member = self.registry.member(holder)
        if member is None:
            return protocol.Reply(req_id=0, ok=False, error_kind="unavailable",
                                  error=f"instance {describe_holder(holder)} is not registered")
        msg.req_id = next(self._req_ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg.req_id] = (holder, fut, depends_on)
        self._send(member.identity, msg)
        timeout = self.settings.command_timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return protocol.Reply(req_id=msg.req_id, ok=False, error_kind="timeout",
                                  error=f"{type(msg).__name__} to {member.describe()}: no "
                                        f"answer in {timeout} s")
        finally:
            self._pending.pop(msg.req_id, None)

    def notify(self, holder: str, msg: Any) -> None:
        """Send ``msg`` (no reply expected) to the registered sidecar named ``holder``, if any."""
        member = self.registry.member(holder)
        if member is not None:
            self._send(member.identity, msg)

    def _send(self, identity: bytes, msg: Any) -> None:
        assert self._router is not None
        try:
            self._router.send_multipart([identity, protocol.sidecar_encoder.encode(msg)])
        except zmq.ZMQError as e:
            logger.warning("cannot send %s to %r: %s", type(msg).__name__, identity, e)

    def _drop(self, socket_name: str, reason: str, detail: str) -> None:
        """Count a dropped message; log the first of each (socket, reason)."""
        self.metrics.dropped_messages.labels(socket_name, reason).inc()
        self.dropped[socket_name, reason] += 1
        if self.dropped[socket_name, reason] == 1:
            logger.warning("dropping a message on the %s socket (%s): %s; further ones are "
                           "counted only (kvmove_dropped_messages_total)", socket_name, reason,
                           detail)

    # -- receive loops ---------------------------------------------------------------------
    def _on_router_message(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._drop("router", "frames", f"{len(frames)} frames, expected 2")
            return
        identity, raw = frames
        try:
            msg = protocol.sidecar_msg_decoder.decode(raw)
        except msgspec.ValidationError as e:  # well-formed, out of bounds: tell the sender
            self._drop("router", "invalid", str(e))
            self._send(identity, protocol.RegisterRefused(f"invalid message: {e}"))
            return
        except msgspec.DecodeError as e:
            self._drop("router", "undecodable", str(e))
            return
        now = time.monotonic()
        registry = self.registry
        if isinstance(msg, protocol.Register):
            reason = registry.register(identity, msg, now)
            if reason is None:
                self._send(identity, protocol.RegisterAck(self.controller_id))
            else:
                self._drop("router", "refused_registration", f"{msg.instance_id}: {reason}")
                self._send(identity, protocol.RegisterRefused(reason))
            return
        member = registry.bound(identity)
        if isinstance(msg, protocol.Reply):
            pending = self._pending.get(msg.req_id)
            if pending is None or member is None or pending[0] != member.holder:
                # Not an answer to a command in flight to this connection's sidecar.
                self._drop("router", "unexpected_reply", f"req_id {msg.req_id}")
                return
            if msg.heartbeat is not None:
                self._heartbeat(member, msg.heartbeat, now)
            del self._pending[msg.req_id]
            if not pending[1].done():
                pending[1].set_result(msg)
            return
        if member is None:
            self._send(identity, protocol.Resync("unknown sender: register first"))
        elif isinstance(msg, protocol.Goodbye):
            registry.goodbye(member)
        elif isinstance(msg, protocol.Leaving):
            if self.on_leaving is not None:
                self.on_leaving(member)
        elif isinstance(msg, protocol.Snapshot):
            problem = protocol.snapshot_problem(msg.chunks)
            if problem is not None:  # no sidecar of ours sends it: its holdings stay as they were
                self._drop("router", "invalid", f"a snapshot of {member.describe()}: {problem}")
            else:
                registry.apply_snapshot(member, msg)
        elif isinstance(msg, protocol.Heartbeat):
            self._send(identity, protocol.HeartbeatAck(self.controller_id))
            self._heartbeat(member, msg, now)

    def _heartbeat(self, member: Member, hb: protocol.Heartbeat, now: float) -> None:
        reason = self.registry.apply_heartbeat(member, hb, now)
        if reason is not None:
            self._send(member.identity, protocol.Resync(reason))

    def _on_event_batch(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            self._drop("pull", "frames", f"{len(frames)} frames, expected 1")
            return
        try:
            batch = protocol.event_batch_decoder.decode(frames[0])
        except msgspec.DecodeError as e:
            self._drop("pull", "undecodable", str(e))
            return
        member = self.registry.member(holder_name(batch.instance_id, batch.rank))
        if member is None:
            return  # not registered yet: its snapshot will cover these
        if batch.incarnation != member.reg.incarnation:
            self._drop("pull", "stale_incarnation", f"a batch of {member.describe()} from "
                       f"another start ({batch.incarnation}) than the registered one")
            return
        reason = self.registry.apply_events(member, batch.events)
        if reason is not None:
            self._send(member.identity, protocol.Resync(reason))

    async def _watchdog_loop(self) -> None:
        """Fail the commands in flight to an instance as soon as it stops heartbeating, so a
        job waiting on a dead peer ends within the heartbeat timeout, not the command's."""
        while True:
            await asyncio.sleep(_WATCHDOG_S)
            self.fail_commands_on_the_down()

    def fail_commands_on_the_down(self) -> None:
        """Fail every command in flight to a sidecar that is down or gone, or that depends on
        one (the watchdog's pass)."""
        down = self.registry.down_holders()
        for req_id, (holder, fut, depends_on) in list(self._pending.items()):
            gone = next((h for h in (holder, *depends_on)
                         if h in down or self.registry.member(h) is None), None)
            if gone is not None and not fut.done():
                fut.set_result(protocol.Reply(
                    req_id=req_id, ok=False, error_kind="unavailable",
                    error=f"instance {describe_holder(gone)} stopped heartbeating "
                          f"({self.settings.heartbeat_timeout_s} s)"))
