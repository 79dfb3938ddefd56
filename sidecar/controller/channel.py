"""SidecarChannel: the controller's ZMQ sockets to the sidecars, and its command RPC.

Contract
--------
* Two sockets, opened by :meth:`SidecarChannel.start` on the controller's event loop (the
  app's lifespan): a ROUTER on the reply port — sidecars register, heartbeat and answer
  commands on it — and a PULL on the pull port (store events). A receive loop per socket
  decodes each message and hands it to the :class:`~sidecar.controller.instances.InstanceRegistry`,
  then sends what the registry asks for (a :class:`~sidecar.protocol.RegisterAck`, a
  :class:`~sidecar.protocol.Resync`). One bad message is logged and dropped; it never stops a
  loop.
* Commands: :meth:`SidecarChannel.command` assigns a ``req_id``, sends, and awaits the
  :class:`~sidecar.protocol.Reply` carrying it; any number may be in flight to one sidecar.
  It never raises for a peer's fault: a timeout, an instance that is not registered or that
  stops heartbeating while a command is in flight (the watchdog notices within 0.25 s) all
  come back as a failed Reply with a kind (``timeout``, ``unavailable``) and a cause.
* Sends never wait (see :mod:`sidecar.zmqio`); a message to a peer that is away is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import msgspec
import zmq

from sidecar import protocol
from sidecar.controller.instances import Instance, InstanceRegistry
from sidecar.controller.settings import ControllerSettings
from sidecar.zmqio import LoopSocket

logger = logging.getLogger("vllm_kvmove.controller")

# How often the watchdog looks for commands in flight to instances that went down.
_WATCHDOG_S = 0.25


class SidecarChannel:
    """The controller's side of the sidecar protocol.

    Args:
        settings: ports, interface, command timeout, API token.
        registry: where registrations, heartbeats, snapshots and events go.
        controller_id: this controller's id, sent in every RegisterAck (a sidecar that sees
            it change knows the old controller's jobs are gone).
    """

    def __init__(self, settings: ControllerSettings, registry: InstanceRegistry,
                 controller_id: str):
        self.settings = settings
        self.registry = registry
        self.controller_id = controller_id
        # In-flight commands: req_id -> (instance_id, future of its Reply).
        self._pending: dict[int, tuple[str, asyncio.Future]] = {}
        self._req_ids = itertools.count(1)
        self._router: LoopSocket | None = None
        self._pull: LoopSocket | None = None
        self._tasks: list[asyncio.Task] = []

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        ctx = zmq.Context.instance()
        host = "127.0.0.1" if self.settings.host == "localhost" else self.settings.host
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted sidecar takes its name back
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"tcp://{host}:{self.settings.reply_port}")
        self._router = LoopSocket(router)
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(f"tcp://{host}:{self.settings.pull_port}")
        self._pull = LoopSocket(pull)
        self._tasks = [asyncio.create_task(self._router_loop()),
                       asyncio.create_task(self._pull_loop()),
                       asyncio.create_task(self._watchdog_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in (self._router, self._pull):
            if s is not None:
                s.close()

    # -- commands --------------------------------------------------------------------------
    async def command(self, instance_id: str, msg: Any,
                      timeout: float | None = None) -> protocol.Reply:
        """Send one command (its ``req_id`` and ``auth`` are set here) and await the reply.

        Returns:
            The sidecar's Reply, or a failed Reply of kind ``timeout`` or ``unavailable``.
        """
        inst = self.registry.get(instance_id)
        if inst is None:
            return protocol.Reply(req_id=0, ok=False, error_kind="unavailable",
                                  error=f"instance {instance_id} is not registered")
        msg.req_id = next(self._req_ids)
        msg.auth = self.settings.api_token
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg.req_id] = (instance_id, fut)
        self._send(inst.identity, msg)
        timeout = self.settings.command_timeout_s if timeout is None else timeout
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return protocol.Reply(req_id=msg.req_id, ok=False, error_kind="timeout",
                                  error=f"{type(msg).__name__} to {instance_id}: no answer in "
                                        f"{timeout} s")
        finally:
            self._pending.pop(msg.req_id, None)

    def _send(self, identity: bytes, msg: Any) -> None:
        assert self._router is not None
        try:
            self._router.send_multipart([identity, protocol.sidecar_encoder.encode(msg)])
        except zmq.ZMQError as e:
            logger.warning("cannot send %s to %r: %s", type(msg).__name__, identity, e)

    # -- receive loops ---------------------------------------------------------------------
    async def _router_loop(self) -> None:
        assert self._router is not None
        while True:
            identity, raw = await self._router.recv_multipart()
            try:
                msg = protocol.sidecar_msg_decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("dropping undecodable message from %r", identity)
                continue
            try:
                self._on_sidecar_message(identity, msg)
            except Exception:  # noqa: BLE001 - one bad message must not stop the controller
                logger.exception("error handling %s from %r", type(msg).__name__, identity)

    def _on_sidecar_message(self, identity: bytes, msg: Any) -> None:
        now = time.monotonic()
        registry = self.registry
        if isinstance(msg, protocol.Reply):
            if msg.heartbeat is not None:
                inst = registry.get(identity.decode(errors="replace"))
                if inst is not None:
                    self._heartbeat(inst, msg.heartbeat, now)
            pending = self._pending.pop(msg.req_id, None)
            if pending is not None and not pending[1].done():
                pending[1].set_result(msg)
            return
        if isinstance(msg, protocol.Register):
            if registry.register(identity, msg, now):
                self._send(identity, protocol.RegisterAck(self.controller_id))
            return
        inst = registry.get(identity.decode(errors="replace"))
        if inst is None:
            self._send(identity, protocol.Resync("unknown instance"))
        elif isinstance(msg, protocol.Goodbye):
            registry.goodbye(inst)
        elif isinstance(msg, protocol.Snapshot):
            registry.apply_snapshot(inst, msg)
        elif isinstance(msg, protocol.Heartbeat):
            self._heartbeat(inst, msg, now)

    def _heartbeat(self, inst: Instance, hb: protocol.Heartbeat, now: float) -> None:
        reason = self.registry.apply_heartbeat(inst, hb, now)
        if reason is not None:
            self._send(inst.identity, protocol.Resync(reason))

    async def _pull_loop(self) -> None:
        assert self._pull is not None
        while True:
            raw = await self._pull.recv()
            try:
                batch = protocol.event_batch_decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("dropping undecodable event batch")
                continue
            inst = self.registry.get(batch.instance_id)
            if inst is None:
                continue  # not registered yet: its snapshot will cover these
            reason = self.registry.apply_events(inst, batch.events)
            if reason is not None:
                self._send(inst.identity, protocol.Resync(reason))

    async def _watchdog_loop(self) -> None:
        """Fail the commands in flight to an instance as soon as it stops heartbeating, so a
        job waiting on a dead peer ends within the heartbeat timeout, not the command's."""
        while True:
            await asyncio.sleep(_WATCHDOG_S)
            down = self.registry.down_ids()
            for req_id, (iid, fut) in list(self._pending.items()):
                if (iid in down or self.registry.get(iid) is None) and not fut.done():
                    fut.set_result(protocol.Reply(
                        req_id=req_id, ok=False, error_kind="unavailable",
                        error=f"instance {iid} stopped heartbeating "
                              f"({self.settings.heartbeat_timeout_s} s)"))
