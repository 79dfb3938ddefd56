"""An impaired point-to-point link between two test hosts — one-way delay and random loss —
for kernels without ``netem`` (this machine's has neither ``sch_netem`` nor ``act_gact``).

Each host gets a TAP device in its network namespace with an address on a /30 of its own; a
thread of this process carries Ethernet frames between the two devices, holding each one
``delay_s`` (each way: the round trip gains twice that) and dropping it with probability
``loss``. Everything else about the hosts is unchanged: their bridge addresses still reach each
other directly, so a product configured with the link's addresses as its data path
(``p2p_host``) sends its KV over the impaired link while its control plane stays on the bridge.

The carrier is Python: it moves on the order of 10^4 frames per second, so the link's MTU is
9,000 bytes (set on both devices) to keep it from being the bottleneck of a 50 ms link.
"""

from __future__ import annotations

import collections
import fcntl
import os
import random
import selectors
import struct
import threading
import time

from tests.harness.hosts import Host, _run

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    return fd


class ImpairedLink:
    """A link between ``a`` and ``b`` with ``delay_s`` each way and ``loss`` (0..1) per frame.

    Args:
        a, b: the two hosts; ``a`` gets ``{prefix}.1``, ``b`` ``{prefix}.2``.
        prefix: the /30's first three octets (a range no other link or host uses).
        tag: device-name prefix (at most 12 characters).
    Attributes:
        address_a, address_b: the link's addresses in each host.
        frames, dropped: frames carried and dropped so far (both directions).
    Use :meth:`set` to change the impairment, and always :meth:`close`.
    """

    def __init__(self, a: Host, b: Host, prefix: str, tag: str, delay_s: float = 0.0,
                 loss: float = 0.0, mtu: int = 9000, seed: int = 0):
        self.address_a, self.address_b = f"{prefix}.1", f"{prefix}.2"
        self.delay_s, self.loss = delay_s, loss
        self.frames = self.dropped = 0
        self._rng = random.Random(seed)
        self._names = (f"{tag}ta", f"{tag}tb")
        self._fds: list[int] = []
        self._stop = threading.Event()
        try:
            for name, host, address in ((self._names[0], a, self.address_a),
                                        (self._names[1], b, self.address_b)):
                self._fds.append(_open_tap(name))
                _run("ip", "link", "set", name, "netns", host.namespace)
                host.ip("link", "set", name, "mtu", str(mtu))
                host.ip("addr", "add", f"{address}/30", "dev", name)
                host.ip("link", "set", name, "up")
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._carry, name="impaired-link", daemon=True)
        self._thread.start()

    def set(self, delay_s: float, loss: float) -> None:
        """Change the impairment of frames read from now on."""
        self.delay_s, self.loss = delay_s, loss

    def _carry(self) -> None:
        a, b = self._fds
        peer = {a: b, b: a}
        queues: dict[int, collections.deque] = {a: collections.deque(), b: collections.deque()}
        sel = selectors.DefaultSelector()
        for fd in (a, b):
            sel.register(fd, selectors.EVENT_READ)
        while not self._stop.is_set():
            now = time.monotonic()
            due = [q[0][0] for q in queues.values() if q]
            timeout = max(0.0, min(due) - now) if due else 0.1
            for key, _ in sel.select(min(timeout, 0.1)):
                fd = key.fd
                for _ in range(64):  # a burst per wake-up
                    try:
                        frame = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    except OSError:
                        return  # the device is gone (close)
                    self.frames += 1
                    if self.loss and self._rng.random() < self.loss:
                        self.dropped += 1
                        continue
                    queues[peer[fd]].append((time.monotonic() + self.delay_s, frame))
            now = time.monotonic()
            for fd, q in queues.items():
                while q and q[0][0] <= now:
                    _, frame = q.popleft()
                    try:
                        os.write(fd, frame)
                    except BlockingIOError:
                        self.dropped += 1  # the receiving device's queue is full: a loss
                    except OSError:
                        return

    def close(self) -> None:
        """Stop carrying and remove both devices (they vanish with the last fd)."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=5)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "ImpairedLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
