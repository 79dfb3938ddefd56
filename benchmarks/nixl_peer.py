"""A bare NIXL endpoint for P7-nixl-raw: NIXL's READ between two test hosts, without a sidecar.

Two roles, each run on a test host (``Host.wrap``); P1-nixl-raw (one host, one process) uses
:func:`read_pieces` and :func:`timed_reads` too:

* ``serve NAME HOST PORT NBYTES SECRET``: registers ``NBYTES`` of filled memory with a NIXL
  agent (:class:`~vllm_kvmove.transfer.NixlTransfer`, as a sidecar does: same UCX settings,
  same metadata server), prints ``READY <address>`` and serves until its stdin closes.
* ``read NAME HOST PORT NBYTES SECRET PEER_NAME PEER_URL PEER_ADDR TRIALS``: registers its own
  ``NBYTES``, connects to the peer and READs its memory whole, in the pieces a sidecar's fetch
  uses (:data:`sidecar.agent.fetch.PIECE_BYTES`), ``TRIALS + 1`` times (the first faults the
  pages in and is not counted); prints ``{"read_s": [...]}``.

No store, no checksums, no controller: what the transport itself reaches over the link.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sidecar.agent.fetch import PIECE_BYTES  # noqa: E402
from vllm_kvmove.transfer import NixlTransfer, ReadRange, split_ranges  # noqa: E402
from vllm_kvmove.zmqauth import FleetSecurity  # noqa: E402


def read_pieces(remote_addr: int, local_addr: int, nbytes: int) -> list[list[ReadRange]]:
    """``nbytes`` from ``remote_addr`` to ``local_addr`` cut as a sidecar's fetch cuts a READ
    (:data:`~sidecar.agent.fetch.PIECE_BYTES`)."""
    return [[r for _, r in piece] for piece in split_ranges(
        [ReadRange(remote_addr, local_addr, nbytes)], PIECE_BYTES)]


def timed_reads(me: NixlTransfer, peer_name: str, pieces: list[list[ReadRange]],
                trials: int) -> list[float]:
    """Seconds per READ of every piece, one after another, ``trials`` times after one that
    faults the pages in (not counted)."""
    reads = []
    for trial in range(trials + 1):
        t0 = time.perf_counter()
        for piece in pieces:
            me.read(peer_name, piece, 60)
        if trial:
            reads.append(time.perf_counter() - t0)
    return reads


def main(argv: list[str]) -> None:
    role, name, host, port, nbytes, secret = argv[:6]
    nbytes_i = int(nbytes)
    buf = torch.empty(nbytes_i, dtype=torch.uint8)
    buf.fill_(7 if role == "serve" else 0)
    me = NixlTransfer(name, buf.data_ptr(), nbytes_i, host, int(port),
                      security=FleetSecurity(secret))
    try:
        if role == "serve":
            print(f"READY {buf.data_ptr()}", flush=True)
            sys.stdin.read()  # until the parent closes our stdin
            return
        peer_name, peer_url, peer_addr, trials = argv[6], argv[7], int(argv[8]), int(argv[9])
        me.connect_peer(peer_name, peer_url, 30)
        reads = timed_reads(me, peer_name, read_pieces(peer_addr, buf.data_ptr(), nbytes_i),
                            trials)
        assert bool((buf == 7).all()), "the READ did not bring the peer's bytes"
        print(json.dumps({"read_s": reads}), flush=True)
    finally:
        me.close()


if __name__ == "__main__":
    main(sys.argv[1:])
