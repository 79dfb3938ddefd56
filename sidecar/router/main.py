"""``kvmove-router``: the router's command line (``python -m sidecar.router``)."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from sidecar.httpkit import server_config
from sidecar.router.app import RouterSettings, create_router_app


def parse_settings(argv: list[str] | None = None) -> tuple[RouterSettings, str]:
    """Settings and log level from the command line (argparse exits 2 on bad usage)."""
    p = argparse.ArgumentParser(
        prog="kvmove-router",
        description="OpenAI-compatible proxy that sends each request to the engine holding "
                    "its prompt's KV (GPU prefix cache or host store), weighed against load.")
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on")
    p.add_argument("--port", type=int, default=9100, help="HTTP port (default 9100)")
    p.add_argument("--controller", default=os.environ.get("KVMOVE_CONTROLLER", ""),
                   help="the controller's URL: the engines, their host stores and KV events "
                        "come from it (default: env KVMOVE_CONTROLLER)")
    p.add_argument("--token", default=os.environ.get("KVMOVE_API_TOKEN", ""),
                   help="the fleet secret, for the controller's API (default: env "
                        "KVMOVE_API_TOKEN)")
    p.add_argument("--engine", action="append", default=[], metavar="ID=URL",
                   help="an engine to route to without a controller (repeat); by load only")
    p.add_argument("--host-weight", type=float, default=0.8,
                   help="a host-store token's worth against a GPU prefix-cache token")
    p.add_argument("--load-tokens", type=int, default=1024,
                   help="prompt tokens of prefix match one request in flight is worth")
    p.add_argument("--pull-min-tokens", type=int, default=0,
                   help="pull-on-route: copy a prompt's prefix from a busy holder's host store "
                        "to the chosen engine first when that gains at least this many tokens "
                        "(default 0: never)")
    p.add_argument("--pull-wait", type=float, default=2.0,
                   help="the longest a request waits for that copy, seconds")
    p.add_argument("--decode-weight", type=float, default=0.25,
                   help="what a request already streaming its answer weighs in an engine's "
                        "load, against 1 for one waiting for its first token (default 0.25)")
    p.add_argument("--expect-s", type=float, default=30.0,
                   help="how long a prompt sent to an engine counts as held there before the "
                        "engine's KV events confirm it, seconds (default 30)")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    engines = {}
    for spec in a.engine:
        iid, sep, url = spec.partition("=")
        if not sep or not iid or not url.startswith(("http://", "https://")):
            p.error(f"--engine {spec!r}: expected ID=http(s)://HOST:PORT")
        engines[iid] = url
    if not a.controller and not engines:
        p.error("give --controller or at least one --engine")
    if not 0 <= a.host_weight <= 1 or a.load_tokens < 0:
        p.error("--host-weight must be in [0, 1] and --load-tokens >= 0")
    if not 0 <= a.decode_weight <= 1 or a.expect_s < 0:
        p.error("--decode-weight must be in [0, 1] and --expect-s >= 0")
    return RouterSettings(host=a.host, port=a.port, controller=a.controller,
                          controller_token=a.token, engines=engines,
                          host_weight=a.host_weight, load_tokens=a.load_tokens,
                          pull_min_tokens=a.pull_min_tokens, pull_wait_s=a.pull_wait,
                          decode_weight=a.decode_weight, expect_s=a.expect_s), a.log_level


def main(argv: list[str] | None = None) -> int:
    """Console script ``kvmove-router``: serve until interrupted."""
    settings, log_level = parse_settings(argv)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.Server(server_config(create_router_app(settings), settings.host, settings.port,
                                 max_connections=4096, log_level=log_level)).run()
    return 0
