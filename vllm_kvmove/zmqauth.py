"""FleetSecurity: CURVE on every ZMQ socket of a fleet, from its one shared secret.

Contract
--------
* With a secret (``api_token`` / ``KVMOVE_API_TOKEN``), every ZMQ socket between the
  controller and the sidecars, and between sidecars (the NIXL metadata handshake), runs
  ZMQ's CURVE: encrypted, and authenticated both ways. Both keypairs derive from the secret
  (keyed blake2b, one per role): the *server* keypair (the controller's ROUTER and PULL, every
  sidecar's metadata server) and the *member* keypair (every client). Knowing the secret is
  being a fleet member. A peer without it cannot complete a CURVE handshake, so it cannot get
  one message through; nothing secret ever crosses the wire (no token is sent, in clear or
  not).
* A ZAP handler (one per ZMQ context, on a daemon thread, started by the first server socket)
  admits a CURVE client only if it presents the member key of the domain its server socket
  names; NULL sockets of the same context (the lookup channel) are not asked about.
* Without a secret: NULL (plaintext, unauthenticated) — for one machine. Callers then refuse
  to bind beyond loopback (:func:`is_loopback`).
* Knows nothing of what travels on the sockets.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading

import zmq
from zmq.utils import z85

logger = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by ZMQ's ZAP specification (RFC 27)
# A secret this short is refused: both keypairs derive from it, and the fleet is as safe as it.
MIN_SECRET_CHARS = 16


class SecurityError(ValueError):
    """A secret or an address that cannot be used safely; the message says why."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an interface address or name) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _derive(secret: str, role: bytes) -> tuple[bytes, bytes]:
    """(public, secret) Z85 CURVE keys for ``role``, derived from the fleet secret."""
    seed = hashlib.blake2b(secret.encode(), digest_size=32, key=b"vllm-kvmove/curve",
                           person=role.ljust(16, b"\0")[:16]).digest()
    secret_key = z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


class FleetSecurity:
    """How this process's ZMQ sockets secure themselves.

    Args:
        secret: the fleet's shared secret; "" for none (NULL mechanism, loopback only).
    Raises:
        SecurityError: the secret is shorter than :data:`MIN_SECRET_CHARS`.
    """

    def __init__(self, secret: str):
        self.enabled = bool(secret)
        if not self.enabled:
            return
        if len(secret) < MIN_SECRET_CHARS:
            raise SecurityError(f"the fleet secret must have at least {MIN_SECRET_CHARS} "
                                f"characters (it derives the CURVE keys of every socket); "
                                f"e.g. `openssl rand -hex 32`")
        self._server_public, self._server_secret = _derive(secret, b"server")
        self._member_public, self._member_secret = _derive(secret, b"member")
        self.domain = b"kvmove-" + hashlib.blake2b(self._server_public, digest_size=8).hexdigest().encode()

    def check_bind(self, host: str, what: str) -> None:
        """Refuse (SecurityError) to listen beyond loopback without a secret."""
        if not self.enabled and not is_loopback(host):
            raise SecurityError(f"refusing to listen on {host!r} for {what} without a fleet "
                                f"secret: set api_token (KVMOVE_API_TOKEN), or listen on loopback")

    def server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it binds) a CURVE server admitting fleet members only."""
        if not self.enabled:
            return
        _ZapHandler.for_context(sock.context).admit(self.domain, z85.decode(self._member_public))
        sock.curve_server = True
        sock.curve_secretkey = self._server_secret
        sock.zap_domain = self.domain

    def client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it connects) a CURVE client of fleet servers."""
        if not self.enabled:
            return
        sock.curve_serverkey = self._server_public
        sock.curve_publickey = self._member_public
        sock.curve_secretkey = self._member_secret


class _ZapHandler:
    """ZMQ's authentication handler for one context: a CURVE client is admitted when its
    long-term public key is the member key of the domain its server socket names."""

    _by_context: dict[int, "_ZapHandler"] = {}
    _lock = threading.Lock()

    @classmethod
    def for_context(cls, ctx: zmq.Context) -> "_ZapHandler":
        with cls._lock:
            handler = cls._by_context.get(id(ctx))
            if handler is None:
                handler = cls._by_context[id(ctx)] = cls(ctx)
            return handler

    def __init__(self, ctx: zmq.Context):
        self._members: dict[bytes, bytes] = {}  # domain -> member public key (32 bytes)
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        threading.Thread(target=self._serve, name="kvmove-zap", daemon=True).start()

    def admit(self, domain: bytes, member_key: bytes) -> None:
        self._members[domain] = member_key

    def _serve(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart()
            except zmq.ZMQError:
                return  # the context was terminated
            try:
                version, request_id, domain, _address, _identity, mechanism, *creds = frames
                ok = (mechanism == b"CURVE" and len(creds) == 1
                      and self._members.get(domain) == creds[0])
            except ValueError:  # not a ZAP request: answer it as a refusal all the same
                version, request_id, ok = b"1.0", b"", False
            self._sock.send_multipart([version, request_id, b"200" if ok else b"400",
                                       b"OK" if ok else b"not a fleet member",
                                       b"member" if ok else b"", b""])
