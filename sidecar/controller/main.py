"""``kvmove-controller``: the controller's command line (``python -m sidecar.controller``)."""

from __future__ import annotations

import argparse
import json
import logging
import os

import uvicorn

from sidecar.controller.api import create_controller_app
from sidecar.controller.settings import FETCH_BATCH_BYTES, ControllerSettings
from sidecar.httpkit import plain_http_warning, server_config
from vllm_kvmove.zmqauth import FleetSecurity, SecurityError


def parse_settings(argv: list[str] | None = None) -> tuple[ControllerSettings, str]:
    """Settings and log level from the command line (argparse exits 2 on bad usage)."""
    p = argparse.ArgumentParser(prog="kvmove-controller",
                                description="Federate vllm-kvmove sidecars and move KV between engines.")
    p.add_argument("--host", default="localhost", help="interface for HTTP and ZMQ (default localhost)")
    p.add_argument("--port", type=int, default=9000, help="HTTP port (default 9000)")
    p.add_argument("--monitor-ports", default='{"pull": 8300, "reply": 8400}',
                   help='JSON {"pull": PORT, "reply": PORT}: ZMQ ports sidecars connect to')
    p.add_argument("--heartbeat-timeout", type=float, default=5.0,
                   help="seconds without heartbeat before an instance counts as down")
    p.add_argument("--api-token", default=os.environ.get("KVMOVE_API_TOKEN", ""),
                   help="the fleet's shared secret, 16 characters or more (default: env "
                        "KVMOVE_API_TOKEN): a bearer token on every endpoint but GET /health, "
                        "and the key of the CURVE-secured sockets sidecars connect to. Without "
                        "it the controller listens on loopback only")
    p.add_argument("--metrics-open", action="store_true",
                   help="serve GET /metrics without the token (for Prometheus scrapers)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open HTTP connections beyond which a new one is closed (default 1024)")
    p.add_argument("--tls-cert", default="", metavar="PEM",
                   help="serve the API over HTTPS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", default="", metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-ca", default="", metavar="PEM",
                   help="CA bundle to verify engines' HTTPS servers with (default: the system's)")
    p.add_argument("--fetch-batch-mib", type=float, default=FETCH_BATCH_BYTES / 2**20,
                   help="a move's fetch is sent in commands of at most this many MiB "
                        f"(default {FETCH_BATCH_BYTES >> 20}); progress advances per command")
    p.add_argument("--max-mib-per-s", type=float, default=0, metavar="MIB",
                   help="cap on the bytes of all moves and copies together, MiB per second "
                        "(default: none); a move may ask for a lower cap of its own")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    if a.fetch_batch_mib <= 0:
        p.error("--fetch-batch-mib must be > 0")
    if a.max_mib_per_s < 0:
        p.error("--max-mib-per-s must be >= 0")
    try:
        ports = json.loads(a.monitor_ports)
        pull, reply = int(ports["pull"]), int(ports["reply"])
    except (ValueError, KeyError, TypeError):
        p.error('--monitor-ports must be JSON like {"pull": 8300, "reply": 8400}')
    settings = ControllerSettings(host=a.host, port=a.port, pull_port=pull, reply_port=reply,
                                  heartbeat_timeout_s=a.heartbeat_timeout, api_token=a.api_token,
                                  fetch_batch_bytes=int(a.fetch_batch_mib * 2**20),
                                  max_bytes_per_s=int(a.max_mib_per_s * 2**20),
                                  metrics_open=a.metrics_open,
                                  http_max_connections=a.max_connections,
                                  tls_cert=a.tls_cert, tls_key=a.tls_key, tls_ca=a.tls_ca)
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    try:  # refused here, with the reason, rather than by the app's start-up
        FleetSecurity(a.api_token).check_bind(
            "127.0.0.1" if a.host == "localhost" else a.host, "the controller")
    except SecurityError as e:
        p.error(str(e))
    return settings, a.log_level


def main(argv: list[str] | None = None) -> int:
    """Console script ``kvmove-controller``: serve until interrupted."""
    settings, log_level = parse_settings(argv)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warning = plain_http_warning(settings.host, settings.api_token, bool(settings.tls_cert))
    if warning:
        logging.getLogger("vllm_kvmove.controller").warning(warning)
    uvicorn.Server(server_config(create_controller_app(settings), settings.host, settings.port,
                                 max_connections=settings.http_max_connections,
                                 log_level=log_level, tls_cert=settings.tls_cert,
                                 tls_key=settings.tls_key)).run()
    return 0
