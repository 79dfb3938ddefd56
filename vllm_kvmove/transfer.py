"""NixlTransfer: peer-to-peer chunk reads between two engines' store pools over NIXL (UCX).

Contract
--------
* Owner: one ``NixlTransfer`` per engine, created by the sidecar in the worker process,
  around the engine's :class:`~vllm_kvmove.store.ChunkStore`. It knows nothing of HTTP or the
  controller: callers hand it peer addresses and byte ranges.
* Set-up, once: one NIXL agent (~0.45 s), the store's pool registered once as one region, and
  a metadata server — a ZMQ REP socket on ``host:port`` — that hands this agent's metadata to
  peers. With a fleet secret it is a CURVE server admitting fleet members only
  (:class:`~vllm_kvmove.zmqauth.FleetSecurity`); without one it binds only to loopback. It
  answers any request (of any shape) and never stops on one. The NIXL progress thread's poll
  timeout is raised from 0 (NIXL's Python default, which spins a whole core even when idle) to
  ``progress_delay_us`` (100 ms): the thread wakes on UCX's event fd whenever there is work,
  so the timeout only bounds idle wake-ups (measured: handshakes, cma and tcp reads are as
  fast at 100 ms as at 1 ms).
* Per peer, once: :meth:`connect_peer` fetches the peer's metadata (with a timeout, after a
  TCP probe that fails at once on a closed port: a dead peer must not hang the caller) and
  adds the peer; later calls are no-ops.
* Per transfer: :meth:`read` READs ranges of the peer's pool into ranges of ours (the
  destination pulls, which is NIXL's fast direction here), polls to completion or timeout,
  and always releases the transfer handle. It blocks the calling thread (NIXL releases the
  GIL while copying): call it from a worker thread, never from the engine's forward thread or
  an event loop.
* Failure: every error surfaces as :class:`TransferError` with the cause; nothing here
  changes the store (the caller reserves, verifies and commits or aborts).
* Process-wide changes, at the agent's creation: ``UCX_TLS`` is set to ``cma,tcp``,
  ``UCX_NET_DEVICES`` to the interface that holds ``host`` (so UCX's own listener binds only
  there), ``UCX_TCP_PORT_RANGE`` to ``data_ports`` when given and UCX's tcp segment sizes to
  :data:`TCP_SEGMENT` (both, unless the operator set either), each unless the operator set
  it; and NIXL's agent constructor is wrapped (under a
  lock, for that call only) to set the progress thread's poll delay (:func:`_make_agent`).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import zmq

from vllm_kvmove.zmqauth import FleetSecurity

logger = logging.getLogger(__name__)

_MD_REQUEST = b"kvmove-md/2"
# Largest message the metadata server reads (a request is a dozen bytes): a bigger one drops
# the peer's connection inside ZMQ, before any of it reaches us.
_MD_MAX_MESSAGE = 4096
_agent_lock = threading.Lock()
# UCX_TCP_TX_SEG_SIZE and UCX_TCP_RX_SEG_SIZE unless the operator set them (see _make_agent).
TCP_SEGMENT = "256k"


class TransferError(Exception):
    """A NIXL handshake or transfer failed; the message says why."""

    kind = "transfer_failed"


@dataclass(frozen=True, slots=True)
class ReadRange:
    """Copy ``nbytes`` from the peer's address ``remote_addr`` to our ``local_addr``."""

    remote_addr: int
    local_addr: int
    nbytes: int


def _make_agent(name: str, progress_delay_us: int, host: str, data_ports: str = ""):
    """Create a NIXL agent whose progress thread polls its workers' event fds with a timeout
    of ``progress_delay_us`` (NIXL rounds it up to whole milliseconds).

    NIXL's ``nixl_agent`` hard-codes ``pthrDelay = 0``; the binding's agent constructor is
    wrapped for the duration of the call to set the delay before the agent starts.
    """
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
    import nixl._api as api

    # UCX's default transport choice moves host memory between processes at ~2.4 GB/s here;
    # cross-memory attach (one kernel copy) reaches ~5.4 GB/s, 0.87x memcpy. tcp stays for
    # peers on other hosts. A UCX_TLS set by the operator (e.g. rc for RDMA) wins.
    os.environ.setdefault("UCX_TLS", "cma,tcp")
    # UCX's tcp transport listens on every device it uses: only on the one holding our
    # address, unless the operator chose (an unset UCX_NET_DEVICES means every interface).
    device = interface_of(host)
    if device is not None:
        os.environ.setdefault("UCX_NET_DEVICES", device)
    if data_ports:  # UCX's tcp listener picks its port in this range (for firewalls)
        os.environ.setdefault("UCX_TCP_PORT_RANGE", data_ports)
    # UCX's tcp transport moves a large READ in segments of 8 KiB by default: between two
    # test hosts that reached 0.42x iperf3; 128 KiB-512 KiB segments reach 0.86-1.1x
    # (benchmarks/README.md, P7). Only tcp reads use them (cma does not). Both or neither:
    # UCX refuses to create a worker whose tx segment is larger than its rx one.
    segments = ("UCX_TCP_TX_SEG_SIZE", "UCX_TCP_RX_SEG_SIZE")
    if not any(var in os.environ for var in segments):
        for var in segments:
            os.environ[var] = TCP_SEGMENT
    bindings = api.nixlBind
    real_ctor = bindings.nixlAgent

    def ctor(agent_name, cfg):
        cfg.pthrDelay = progress_delay_us
        return real_ctor(agent_name, cfg)

    with _agent_lock:
        bindings.nixlAgent = ctor
        try:
            # STRICT: the sidecar calls the agent from several threads at once.
            return nixl_agent(name, nixl_agent_config(
                backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        finally:
            bindings.nixlAgent = real_ctor


class NixlTransfer:
    """One engine's NIXL endpoint.

    Args:
        agent_name: unique agent name (the instance id is a good one).
        pool_addr: address of the memory to register (the store pool).
        pool_bytes: its size.
        host: interface for the metadata server; peers reach us at ``host:port``.
        port: metadata server port.
        progress_delay_us: NIXL progress-thread poll timeout (idle wake-up period).
        security: how the metadata sockets secure themselves (default: no secret, so the
            server binds to loopback only).
        data_ports: ``"LOW-HIGH"``: the TCP ports UCX's own listener (the KV bytes between
            hosts) may take; "" for any the system gives.
    Raises:
        SecurityError: ``host`` is not loopback and there is no secret.
    """

    def __init__(self, agent_name: str, pool_addr: int, pool_bytes: int, host: str, port: int,
                 progress_delay_us: int = 100_000, security: FleetSecurity | None = None,
                 data_ports: str = ""):
        self.agent_name = agent_name
        self._security = security or FleetSecurity("")
        # ZMQ binds interfaces, not host names: "localhost" means the loopback interface.
        host = "127.0.0.1" if host == "localhost" else host
        self._security.check_bind(host, "the NIXL metadata server")
        self.agent = _make_agent(agent_name, progress_delay_us, host, data_ports)
        self._reg = self.agent.register_memory([(pool_addr, pool_bytes, 0, "")], "DRAM")
        self._metadata = self.agent.get_agent_metadata()
        self._peers: dict[str, tuple[str, str]] = {}  # name -> (url, incarnation)
        self._peers_lock = threading.Lock()
        self._ctx = zmq.Context.instance()
        self._md_sock = self._ctx.socket(zmq.REP)
        self._md_sock.setsockopt(zmq.LINGER, 0)
        self._md_sock.setsockopt(zmq.MAXMSGSIZE, _MD_MAX_MESSAGE)
        self._security.server(self._md_sock)
        self._md_sock.bind(f"tcp://{host}:{port}")
        self.p2p_url = f"{host}:{port}"
        self._stop = threading.Event()
        self._md_thread = threading.Thread(target=self._serve_metadata, name="kvmove-nixl-md",
                                           daemon=True)
        self._md_thread.start()

    def _serve_metadata(self) -> None:
        """Answer every request, whatever its frames: the metadata to a well-formed one, an
        empty reply otherwise (REP must answer before it can read the next request)."""
        poller = zmq.Poller()
        poller.register(self._md_sock, zmq.POLLIN)
        refused = 0
        while not self._stop.is_set():
            try:
                if not poller.poll(200):
                    continue
                frames = self._md_sock.recv_multipart()
                ok = frames == [_MD_REQUEST]
                if not ok:
                    refused += 1
                    if refused == 1:
                        logger.warning("NIXL metadata server: dropping a malformed request "
                                       "(%d frames); further ones are counted only", len(frames))
                self._md_sock.send(self._metadata if ok else b"")
            except zmq.ZMQError as e:  # e.g. a reply to a peer that vanished
                logger.debug("NIXL metadata server: %s", e)
        self._md_sock.close()

    def connect_peer(self, peer_name: str, peer_url: str, timeout_s: float,
                     incarnation: str = "") -> None:
        """Make sure ``peer_name`` (metadata server at ``host:port``) is known to our agent.

        ``incarnation`` names the peer's current start: a peer known under another one (it
        restarted, so it has a new agent) is forgotten and handshaken anew.

        Raises:
            TransferError: the peer did not answer within ``timeout_s``, or its metadata is
                not a NIXL agent's / names another agent.
        """
        with self._peers_lock:
            if self._peers.get(peer_name) == (peer_url, incarnation):
                return
            _probe(peer_name, peer_url, timeout_s)
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            ms = int(timeout_s * 1000)
            sock.setsockopt(zmq.RCVTIMEO, ms)
            sock.setsockopt(zmq.SNDTIMEO, ms)
            self._security.client(sock)
            try:
                sock.connect(f"tcp://{peer_url}")
                sock.send(_MD_REQUEST)
                md = sock.recv()
            except zmq.Again:
                raise TransferError(f"NIXL handshake with {peer_name} at {peer_url}: no answer in "
                                    f"{timeout_s} s (the peer is stuck, or it is not of this "
                                    f"fleet: another secret)") from None
            except zmq.ZMQError as e:
                raise TransferError(f"NIXL handshake with {peer_name} at {peer_url}: {e}") from None
            finally:
                sock.close()
            if not md:
                raise TransferError(f"NIXL handshake with {peer_name} at {peer_url}: refused "
                                    f"(it speaks another protocol version)")
            if peer_name in self._peers:
                # The peer restarted (new address or new agent): forget the old one first.
                self.agent.remove_remote_agent(peer_name)
                del self._peers[peer_name]
            try:
                added = self.agent.add_remote_agent(md)
            except Exception as e:  # noqa: BLE001 - nixl raises its own exception types
                raise TransferError(f"NIXL rejected metadata of {peer_name}: {e}") from None
            added = added.decode() if isinstance(added, bytes) else str(added)
            if added != peer_name:
                self.agent.remove_remote_agent(added)
                raise TransferError(f"peer at {peer_url} is agent {added!r}, not {peer_name!r}")
            self._peers[peer_name] = (peer_url, incarnation)

    def knows_peer(self, peer_name: str, peer_url: str, incarnation: str = "") -> bool:
        """Whether :meth:`connect_peer` would return at once (no handshake needed)."""
        return self._peers.get(peer_name) == (peer_url, incarnation)

    def forget_peer(self, peer_name: str) -> None:
        """Drop a peer (e.g. after it failed); the next :meth:`connect_peer` handshakes anew."""
        with self._peers_lock:
            if self._peers.pop(peer_name, None) is not None:
                try:
                    self.agent.remove_remote_agent(peer_name)
                except Exception:  # noqa: BLE001
                    logger.debug("remove_remote_agent(%s) failed", peer_name, exc_info=True)

    def read(self, peer_name: str, ranges: Sequence[ReadRange], timeout_s: float) -> int:
        """READ ``ranges`` from ``peer_name``'s registered memory into ours.

        Args:
            peer_name: a peer added by :meth:`connect_peer`.
            ranges: byte ranges to copy; each lies inside the peer's pool and ours.
            timeout_s: longest time to wait for completion.
        Returns:
            Bytes moved (the sum of ``nbytes``).
        Raises:
            TransferError: NIXL refused the descriptors, the peer went away, or the timeout
                passed. Our destination ranges may hold partial data; callers must not publish
                them.
        """
        if not ranges:
            return 0
        agent = self.agent
        try:
            local = agent.get_xfer_descs([(r.local_addr, r.nbytes, 0) for r in ranges], "DRAM")
            remote = agent.get_xfer_descs([(r.remote_addr, r.nbytes, 0) for r in ranges], "DRAM")
            handle = agent.initialize_xfer("READ", local, remote, peer_name)
        except Exception as e:  # noqa: BLE001
            raise TransferError(f"NIXL refused the read from {peer_name}: {e}") from None
        deadline = time.monotonic() + timeout_s
        try:
            state = agent.transfer(handle)
            delay = 20e-6
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TransferError(f"read from {peer_name} timed out after {timeout_s} s")
                time.sleep(delay)
                delay = min(delay * 2, 2e-3)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"read from {peer_name} ended in state {state}")
        except TransferError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. nixlRemoteDisconnectError
            raise TransferError(f"read from {peer_name} failed: {type(e).__name__}: {e}") from None
        finally:
            try:
                agent.release_xfer_handle(handle)
            except Exception:  # noqa: BLE001
                logger.debug("release_xfer_handle failed", exc_info=True)
        return sum(r.nbytes for r in ranges)

    def register_local(self, addr: int, nbytes: int) -> object:
        """Register more of our memory (besides the pool) as a place READs may land — a
        staging buffer for bytes that cannot go to a slot as they are. Peers never read it
        (our published metadata covers the pool only). Returns the registration, for
        :meth:`deregister_local`.

        Raises:
            TransferError: NIXL refused the registration.
        """
        try:
            return self.agent.register_memory([(addr, nbytes, 0, "")], "DRAM")
        except Exception as e:  # noqa: BLE001 - nixl raises its own exception types
            raise TransferError(f"NIXL refused to register {nbytes} bytes: {e}") from None

    def deregister_local(self, registration: object) -> None:
        """Undo a :meth:`register_local` (no READ may be in flight into it)."""
        try:
            self.agent.deregister_memory(registration)
        except Exception:  # noqa: BLE001
            logger.debug("deregister_memory failed", exc_info=True)

    def close(self) -> None:
        """Stop the metadata server. The agent itself is released with the process."""
        self._stop.set()
        self._md_thread.join(timeout=2)


def _probe(peer_name: str, peer_url: str, timeout_s: float) -> None:
    """Fail at once if nothing listens at the peer's metadata port: a ZMQ request to a closed
    port is not an error, it just waits out the whole timeout (a peer that died)."""
    host, _, port = peer_url.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout_s, 2.0)).close()
    except ConnectionRefusedError:
        raise TransferError(f"NIXL handshake with {peer_name} at {peer_url}: connection "
                            f"refused (the peer is not running)") from None
    except (OSError, ValueError):
        pass  # unreachable or slow: the handshake's own timeout decides


def split_ranges(ranges: list[ReadRange], piece_bytes: int) -> list[list[tuple[int, ReadRange]]]:
    """Cut ``ranges`` into consecutive pieces of at most ``piece_bytes`` bytes.

    A range may be split across pieces; small ranges share one. The sidecar reads and
    hashes a NIXL fetch in such pieces.

    Returns:
        The pieces, in order; each item is (index of its range in ``ranges``, sub-range).
    """
    pieces: list[list[tuple[int, ReadRange]]] = [[]]
    room = piece_bytes
    for i, r in enumerate(ranges):
        done = 0
        while done < r.nbytes:
            if room == 0:
                pieces.append([])
                room = piece_bytes
            n = min(room, r.nbytes - done)
            pieces[-1].append((i, ReadRange(r.remote_addr + done, r.local_addr + done, n)))
            done += n
            room -= n
    return pieces


def interface_of(host: str) -> str | None:
    """The name of the network interface holding the IPv4 address ``host`` (``"lo"`` for
    127.0.0.1), or None (a name, an IPv6 or wildcard address, or no such interface)."""
    try:
        addr = ipaddress.IPv4Address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        return None
    if addr.is_unspecified:
        return None
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                got = fcntl.ioctl(s.fileno(), siocgifaddr, req)[20:24]
            except OSError:  # no IPv4 address on it
                continue
            if ipaddress.IPv4Address(got) == addr or (addr.is_loopback and name == "lo"):
                return name
    return None
