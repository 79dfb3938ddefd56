"""LoopSocket: messages arrive without zmq.asyncio, and an idle loop stays idle."""

from __future__ import annotations

import asyncio
import time

import zmq

from sidecar.zmqio import LoopSocket
from tests.harness.processes import free_port


def test_messages_arrive_in_order_while_the_receiver_waits_and_between_waits():
    async def main():
        ctx = zmq.Context.instance()
        url = f"tcp://127.0.0.1:{free_port()}"
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind(url)
        dealer.setsockopt(zmq.IDENTITY, b"d")
        dealer.connect(url)
        r, d = LoopSocket(router), LoopSocket(dealer)
        try:
            got = []

            async def receive(n):
                for _ in range(n):
                    got.append(await r.recv_multipart())

            task = asyncio.create_task(receive(200))
            for i in range(200):  # the dealer sends while the router's receiver waits
                d.send(str(i).encode())
                if i % 50 == 0:
                    await asyncio.sleep(0.01)
            await asyncio.wait_for(task, 5)
            assert got == [[b"d", str(i).encode()] for i in range(200)]
            r.send_multipart([b"d", b"back"])  # and the other way
            assert await asyncio.wait_for(d.recv(), 5) == b"back"
        finally:
            r.close()
            d.close()

    asyncio.run(main())


def test_a_send_only_socket_leaves_the_loop_idle():
    """The ZMQ FD of a socket nobody reads may stay signalled; watching it would spin the loop."""
    async def main():
        ctx = zmq.Context.instance()
        url = f"tcp://127.0.0.1:{free_port()}"
        pull = ctx.socket(zmq.PULL)
        pull.bind(url)
        push = ctx.socket(zmq.PUSH)
        push.connect(url)
        p = LoopSocket(push)
        try:
            for i in range(500):
                p.send(b"x" * 100)
            await asyncio.sleep(0.2)
            cpu0, t0 = time.thread_time(), time.monotonic()
            await asyncio.sleep(1.0)
            busy = (time.thread_time() - cpu0) / (time.monotonic() - t0)
            assert busy < 0.05, f"the idle loop used {busy:.0%} of a core"
            assert sum(1 for _ in iter(lambda: pull.poll(100) and pull.recv(), 0)) == 500
        finally:
            p.close()
            pull.close(0)

    asyncio.run(main())
