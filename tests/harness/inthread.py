"""An ASGI app served by uvicorn on a thread of the test process, for unit tests that need
real sockets (limits, streaming) without starting a process."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import uvicorn

from tests.harness.processes import free_port


@contextlib.contextmanager
def serving(config_of, timeout_s: float = 10.0) -> Iterator[int]:
    """Serve on 127.0.0.1 until the block ends.

    Args:
        config_of: ``port -> uvicorn.Config`` (lets the caller use the project's own
            ``httpkit.server_config``, or a plain config).
        timeout_s: how long start-up and shut-down may take.

    Yields:
        The port it listens on.
    """
    port = free_port()
    srv = uvicorn.Server(config_of(port))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout_s)
