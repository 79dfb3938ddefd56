"""ControllerSettings: the controller's options (``kvmove-controller --help`` sets them)."""

from __future__ import annotations

from dataclasses import dataclass, field

# Default for ControllerSettings.fetch_batch_bytes.
FETCH_BATCH_BYTES = 256 << 20


@dataclass
class ControllerSettings:
    """Controller options.

    Attributes:
        host: interface for HTTP and the ZMQ sockets ("localhost" is the loopback interface).
        port: HTTP port.
        pull_port: ZMQ PULL port (store events from sidecars).
        reply_port: ZMQ ROUTER port (registration, heartbeats, commands and replies).
        heartbeat_timeout_s: seconds without a heartbeat before an instance counts as down.
        command_timeout_s: longest wait for one command's reply.
        tokenize_timeout_s: longest wait for an engine's ``/tokenize``.
        max_jobs: jobs remembered (the oldest finished ones are forgotten first).
        fetch_batch_bytes: a move's fetch is split into commands of at most this many bytes,
            so its progress (bytes moved) advances while it runs and a failure wastes at most
            two batches; each command is still one transfer of many chunks. Smaller batches
            cost a round trip each.
        max_bytes_per_s: a cap on all moves' and copies' bytes together (0: none), so that
            moving KV leaves the links to serving; each job may ask for a lower one of its own.
        api_token: the fleet's shared secret (default: env KVMOVE_API_TOKEN; at least 16
            characters). When set, every HTTP endpoint but ``GET /health`` (and the static
            status page) needs ``Authorization: Bearer <token>``, and both ZMQ sockets run
            CURVE with keys derived from it (only fleet members connect). Without it the
            controller listens on loopback only.
        metrics_open: serve ``GET /metrics`` without the token (for scrapers).
        http_max_connections: open HTTP connections beyond which a new one is closed.
        tls_cert, tls_key: PEM files; when both are given the API is served over HTTPS.
        tls_ca: a PEM bundle the controller's own HTTP client verifies engines' HTTPS
            servers with (``/tokenize``); "" for the system's.
    """

    host: str = "localhost"
    port: int = 9000
    pull_port: int = 8300
    reply_port: int = 8400
    heartbeat_timeout_s: float = 5.0
    command_timeout_s: float = 60.0
    tokenize_timeout_s: float = 10.0
    max_jobs: int = 10000
    fetch_batch_bytes: int = FETCH_BATCH_BYTES
    max_bytes_per_s: int = 0
    api_token: str = field(default="", repr=False)
    metrics_open: bool = False
    http_max_connections: int = 1024
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
