"""LoopSocket: a ZMQ socket driven by the asyncio loop's reader callback, without zmq.asyncio.

Contract
--------
* Owner: one coroutine loop per socket receives (the controller's ROUTER and PULL loops, the
  sidecar's DEALER loop); any coroutine of the same event loop may send. Nothing here is
  thread-safe: a LoopSocket lives and dies on its loop's thread.
* Sends never wait: they are ``NOBLOCK`` and raise ``zmq.Again`` when the peer is away
  (``IMMEDIATE``) or its queue is full — callers drop the message, as the protocol allows.
* Why not zmq.asyncio: its per-call Python machinery (futures, flag enums, rescheduling)
  cost a measurable share of a small move's ~1 ms controller<->sidecar round trips. Here a
  receive is one non-blocking ``recv_multipart`` when a message is queued, and one wait for
  the loop's reader callback on ``ZMQ_FD`` when not; the FD is watched only during that wait.
* ZMQ's FD only says "the socket's state may have changed", and any call on the socket
  (a send included) may consume that signal while taking in messages. So before every wait,
  and after every send while a receiver waits, ``ZMQ_EVENTS`` is asked whether a message is
  queued.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Awaitable, Callable

import zmq

logger = logging.getLogger(__name__)


class LoopSocket:
    """Wrap ``sock`` (a plain ``zmq.Socket``) for use from the running event loop.

    Args:
        sock: the socket; this object closes it.
    """

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._waiter: asyncio.Future | None = None

    def _message_queued(self) -> bool:
        return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    async def recv_multipart(self) -> list[bytes]:
        """The next message's frames; waits (without blocking the loop) until one arrives."""
        while True:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            if self._message_queued():
                continue
            # Watch the FD only while waiting: it is level-triggered in the loop's selector, and
            # a signal nobody drains (a send-only socket's, say) would wake the loop forever.
            self._waiter = self._loop.create_future()
            self._loop.add_reader(self._fd, self._wake)
            try:
                await self._waiter
            finally:
                self._loop.remove_reader(self._fd)
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> bytes:
        """The next single-frame message."""
        return (await self.recv_multipart())[0]

    def send_multipart(self, frames: list[bytes]) -> None:
        """Queue a message at once. Raises zmq.Again if it cannot be queued now."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        finally:
            # The send may have taken in a message and swallowed the FD's signal for it.
            if self._waiter is not None and self._message_queued():
                self._wake()

    def send(self, data: bytes) -> None:
        """Queue a single-frame message at once. Raises zmq.Again if it cannot be queued now."""
        self.send_multipart([data])

    def close(self) -> None:
        """Close the socket (unsent messages are dropped); a receiver still waiting is woken
        and sees the closed socket's error."""
        self._wake()
        self.sock.close(0)


async def serve_forever(sock: LoopSocket, handle: Callable[[list[bytes]], Awaitable[None] | None],
                        what: str) -> None:
    """Receive messages on ``sock`` until cancelled, handing each one's frames to ``handle``
    (a function or a coroutine function). An exception in ``handle`` is logged with ``what``
    and the loop goes on: no message, whatever its shape, stops a receive loop."""
    while True:
        frames = await sock.recv_multipart()
        try:
            result = handle(frames)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - one message must not stop the loop
            logger.exception("error handling a message on %s", what)
