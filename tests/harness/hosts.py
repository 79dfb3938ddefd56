"""TestHosts: machines of their own on this one, for tests that cross hosts.

Each test host is a network namespace with one address on a veth pair into a bridge in the
root namespace (the test process reaches every host through the bridge's address), and every
process started on it also gets a pid namespace of its own (``unshare --pid --fork
--mount-proc``), so the product's same-host detection (boot id + pid namespace) sees separate
machines: bytes between hosts travel over NIXL on TCP, never through shared memory.

Needs root and ``ip`` (CI runs as root). :meth:`TestHosts.create` raises :class:`HostsUnavailable`
with the reason where it cannot build them, for a test to skip on. :meth:`TestHosts.close`
removes every namespace, veth and the bridge, even after a failure; the script
``scripts/test-hosts.sh`` makes the same hosts by hand.

Addresses: ``10.213.<net>.<i>/24`` for host ``i`` (1..), ``.254`` for the root namespace's
side of the bridge; ``net`` is drawn from the process id so that concurrent runs do not meet.
All traffic stays inside the namespaces made here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass


class HostsUnavailable(RuntimeError):
    """Test hosts cannot be made here (not root, no ``ip``, no namespaces)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@dataclass
class Host:
    """One test host: its namespace, its address, and its side of the veth pair."""

    name: str
    address: str
    namespace: str
    veth: str  # the root namespace's end (in the bridge)
    device: str = "eth0"  # the namespace's end

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run on this host: in its network namespace and a pid namespace of its own
        (its processes die with the wrapper, ``--kill-child``)."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--pid", "--fork",
                "--mount-proc", "--kill-child", *argv]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``ip ARGS`` inside this host."""
        return _run("ip", "netns", "exec", self.namespace, "ip", *args, check=check)

    def tc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``tc ARGS`` inside this host."""
        return _run("ip", "netns", "exec", self.namespace, "tc", *args, check=check)

    def link(self, up: bool) -> None:
        """Plug this host's network cable in (``up``) or pull it."""
        self.ip("link", "set", self.device, "up" if up else "down")


def iperf3_bits_per_s(client: Host, server: Host, address: str, seconds: float) -> float:
    """One TCP stream from ``client`` to ``server`` (its iperf3 bound to ``address``, one of
    its addresses) for ``seconds``: bits per second received. Needs ``iperf3`` on this machine.

    Raises:
        subprocess.CalledProcessError, subprocess.TimeoutExpired: iperf3 failed.
    """
    listener = subprocess.Popen(["ip", "netns", "exec", server.namespace, "iperf3", "-s", "-1",
                                 "-B", address], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        out = subprocess.run(["ip", "netns", "exec", client.namespace, "iperf3", "-c", address,
                              "-t", f"{seconds:g}", "-J"], capture_output=True, text=True,
                             check=True, timeout=seconds + 60).stdout
    finally:
        try:
            listener.wait(10)
        except subprocess.TimeoutExpired:
            listener.kill()
            listener.wait()
    return json.loads(out)["end"]["sum_received"]["bits_per_second"]


class TestHosts:
    """``count`` hosts on one bridge. Use :meth:`create`; always :meth:`close`."""

    __test__ = False  # not a pytest class

    def __init__(self, count: int, tag: str | None = None):
        self.tag = tag or f"kv{os.getpid() % 10000}"
        net = os.getpid() % 250 + 1
        self.prefix = f"10.213.{net}"
        self.bridge = f"{self.tag}br"
        self.gateway = f"{self.prefix}.254"
        self.hosts = [Host(f"host{i}", f"{self.prefix}.{i}", f"{self.tag}h{i}", f"{self.tag}v{i}")
                      for i in range(1, count + 1)]

    @classmethod
    def create(cls, count: int, tag: str | None = None) -> "TestHosts":
        """Make the hosts, or raise HostsUnavailable with the reason (nothing left behind)."""
        if os.geteuid() != 0:
            raise HostsUnavailable("test hosts need root (network and pid namespaces)")
        for tool in ("ip", "unshare"):
            if shutil.which(tool) is None:
                raise HostsUnavailable(f"test hosts need `{tool}`")
        hosts = cls(count, tag)
        try:
            hosts._build()
        except subprocess.CalledProcessError as e:
            hosts.close()
            raise HostsUnavailable(f"cannot make test hosts: {' '.join(e.cmd)}: "
                                   f"{(e.stderr or '').strip()}") from None
        return hosts

    def _build(self) -> None:
        self.close()  # leftovers of a run that died with this tag
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for h in self.hosts:
            _run("ip", "netns", "add", h.namespace)
            _run("ip", "link", "add", h.veth, "type", "veth", "peer", "name", h.device,
                 "netns", h.namespace)
            _run("ip", "link", "set", h.veth, "master", self.bridge, "up")
            h.ip("link", "set", "lo", "up")
            h.ip("addr", "add", f"{h.address}/24", "dev", h.device)
            h.ip("link", "set", h.device, "up")

    def close(self) -> None:
        """Remove every namespace (its veth end goes with it), veth and the bridge."""
        for h in self.hosts:
            _run("ip", "netns", "del", h.namespace, check=False)
            _run("ip", "link", "del", h.veth, check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    def __enter__(self) -> "TestHosts":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.harness.hosts up N`` makes N test hosts (tag ``kvhosts``) and prints
    how to run a command on each; ``... down N`` removes them."""
    import argparse

    p = argparse.ArgumentParser(prog="scripts/test-hosts.sh", description=main.__doc__)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("count", type=int, nargs="?", default=3)
    a = p.parse_args(argv)
    if a.action == "down":
        TestHosts(a.count, tag="kvhosts").close()
        print(f"removed test hosts kvhostsh1..{a.count} and bridge kvhostsbr")
        return 0
    try:
        hosts = TestHosts.create(a.count, tag="kvhosts")
    except HostsUnavailable as e:
        print(f"test hosts: {e}")
        return 1
    print(f"bridge {hosts.bridge}: {hosts.gateway}/24 (this shell reaches every host)")
    for h in hosts.hosts:
        print(f"{h.name}: {h.address}  run there: {' '.join(h.wrap(['COMMAND']))}")
    print(f"remove them: scripts/test-hosts.sh down {a.count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
