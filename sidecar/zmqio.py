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
  receive is one non-blocking ``recv_multipart`` when a message is queued, and one wait on
  an event set by the loop's reader callback on ``ZMQ_FD`` when not.
* ZMQ's FD only says "the socket's state may have changed", and any call on the socket
  (a send included) may consume that signal while taking in messages. So after every send,
  and before every wait, ``ZMQ_EVENTS`` is asked whether a message is queued.
"""

from __future__ import annotations

import asyncio

import zmq


class LoopSocket:
    """Wrap ``sock`` (a plain ``zmq.Socket``) for use from the running event loop.

    Args:
        sock: the socket; this object closes it.
    """

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._readable = asyncio.Event()
        self._fd = sock.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._readable.set)

    def _message_queued(self) -> bool:
        return bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    async def recv_multipart(self) -> list[bytes]:
        """The next message's frames; waits (without blocking the loop) until one arrives."""
        while True:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                pass
            self._readable.clear()
            if not self._message_queued():
                await self._readable.wait()

    async def recv(self) -> bytes:
        """The next single-frame message."""
        return (await self.recv_multipart())[0]

    def send_multipart(self, frames: list[bytes]) -> None:
        """Queue a message at once. Raises zmq.Again if it cannot be queued now."""
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        finally:
            if self._message_queued():  # the send may have swallowed the FD's signal
                self._readable.set()

    def send(self, data: bytes) -> None:
        """Queue a single-frame message at once. Raises zmq.Again if it cannot be queued now."""
        self.send_multipart([data])

    def close(self) -> None:
        """Stop watching the socket and close it (unsent messages are dropped)."""
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self.sock.close(0)
