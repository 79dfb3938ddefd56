"""P7 — moves between two test hosts, against the link; and what TLS costs a lookup.

Test hosts (tests/harness/hosts.py): network namespaces on a bridge, every process in a pid
namespace of its own, so the bytes go over NIXL on TCP through two veths and the bridge, as
between machines. In the same run:

* the link: ``iperf3`` from host 1 to host 2 (one TCP stream, 3 s), three times — before,
  between and after the moves — and the median taken (it varies by ±20 % here);
* a move: a standalone sidecar on host 1 holding 1 GiB of KV in a 64 KiB/token layout (16 MiB
  chunks), another on host 2, the controller on host 3 (with a fleet secret: CURVE on its
  sockets); each trial copies the prefix host 1 → host 2, times ``POST /move`` → done (long
  poll), then clears the destination; the first trial warms the destination's pages;
* the transport alone (P7-nixl-raw): a bare NIXL endpoint on host 2 READs 1 GiB from one on
  host 1 (``nixl_peer.py``: the sidecars' UCX settings and piece size, no store, checksum or
  controller) — how much of the gap to iperf3 is NIXL over UCX tcp itself;
* TLS: ``POST /lookup`` of a 4,096-token prompt over keep-alive httpx, to one controller over
  HTTPS and one over plain HTTP on the same host, trials interleaved.

Needs root (namespaces) and ``iperf3`` (``scripts/setup-debian.sh`` installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import WORK, Result, median, percentile
from sidecar.httpkit import verify_with
from sidecar.protocol import LOCATION as LOC
from tests.harness.hosts import Host, HostsUnavailable, TestHosts, iperf3_bits_per_s
from tests.harness.processes import LocalCluster
from tests.harness.stores import BIG_LAYOUT, GIB_TOKENS
from tests.harness.tls import make_certs

SECRET = "p7-benchmark-fleet-secret"
TRIALS = 4
LOOKUPS = 300


def iperf3_gbits(hosts: TestHosts) -> float:
    """One TCP stream host 1 → host 2 for 3 s: Gbit/s received."""
    h1, h2 = hosts.hosts[:2]
    return iperf3_bits_per_s(h1, h2, h2.address, 3) / 1e9


def nixl_raw_reads(src: Host, dst: Host, nbytes: int) -> list[float]:
    """P7-nixl-raw: seconds per whole READ of ``nbytes`` by a bare NIXL endpoint on ``dst``
    from one on ``src`` (benchmarks/nixl_peer.py), TRIALS of them."""
    peer = [sys.executable, str(Path(__file__).with_name("nixl_peer.py"))]
    server = subprocess.Popen(src.wrap([*peer, "serve", "p7-raw-src", src.address, "8600",
                                        str(nbytes), SECRET]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line: list[str] = []
        while not (line and line[0] == "READY"):  # NIXL logs to stdout too
            text = server.stdout.readline()
            assert text, "the NIXL peer exited before it was ready"
            line = text.split()
        out = subprocess.run(dst.wrap([*peer, "read", "p7-raw-dst", dst.address, "8600",
                                       str(nbytes), SECRET, "p7-raw-src",
                                       f"{src.address}:8600", line[1], str(TRIALS)]),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["read_s"]
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def sidecar_config(iid: str, host, controller, port: int) -> dict:
    return {"instance_id": iid, "api_token": SECRET, "sidecar_host": host.address,
            "sidecar_port": port, "p2p_host": host.address, "p2p_init_port": port + 100,
            "controller_pull_url": f"{controller.address}:8300",
            "controller_reply_url": f"{controller.address}:8400",
            "chunk_size": BIG_LAYOUT.chunk_size, "max_local_cpu_size": 1.1,
            "heartbeat_interval_s": 0.5, "command_timeout_s": 60}


def run() -> list[Result]:
    if shutil.which("iperf3") is None:
        raise RuntimeError("P7 needs iperf3: run `bash scripts/setup-debian.sh`")
    try:
        hosts = TestHosts.create(3)
    except HostsUnavailable as e:
        raise RuntimeError(f"P7 needs test hosts: {e}") from None
    h1, h2, h3 = hosts.hosts
    workdir = WORK / "p7"
    certs = make_certs(workdir / "tls", [h.address for h in hosts.hosts])
    cluster = LocalCluster("unused", workdir)
    try:
        links = [iperf3_gbits(hosts)]
        ctl = cluster.start_controller(9000, 8300, 8400, host=h3, extra_args=[
            "--api-token", SECRET, "--tls-cert", certs["cert"], "--tls-key", certs["key"]])
        plain = cluster.start_controller(9001, 8301, 8401, host=h3, extra_args=["--api-token", SECRET])
        verify = verify_with(certs["ca"])
        src = cluster.start_sidecar_process(sidecar_config("p7-src", h1, h3, 8500),
                                            BIG_LAYOUT.to_dict(), [f"7:{GIB_TOKENS[0]}:{len(GIB_TOKENS)}"],
                                            host=h1)
        dst = cluster.start_sidecar_process(sidecar_config("p7-dst", h2, h3, 8500),
                                            BIG_LAYOUT.to_dict(), host=h2)
        cluster.wait_ready(ctl, timeout=60, verify=verify)
        cluster.wait_ready(plain, timeout=60)
        for p in (src, dst):
            cluster.wait_ready(p, timeout=180)
        auth = {"Authorization": f"Bearer {SECRET}"}
        http = httpx.Client(base_url=ctl.url, headers=auth, timeout=120, verify=verify)
        deadline = time.monotonic() + 60
        while http.post("/lookup", json={"tokens": GIB_TOKENS}).json()["layout_info"].get(
                "p7-src", [0, 0])[1] != len(GIB_TOKENS):
            assert time.monotonic() < deadline, "the source never registered its chunks"
            time.sleep(0.2)
        time.sleep(3)  # the source's background checksums
        moves, nbytes = [], 0
        for trial in range(2 * TRIALS + 1):
            if trial == TRIALS + 1:
                links.append(iperf3_gbits(hosts))
            t0 = time.perf_counter()
            r = http.post("/move", json={"old_position": ["p7-src", LOC],
                                         "new_position": ["p7-dst", LOC],
                                         "tokens": GIB_TOKENS, "copy": True})
            st = http.get(f"/events/{r.json()['event_id']}", params={"wait": 60}).json()
            took = time.perf_counter() - t0
            assert st["status"] == "done" and st["bytes"] == st["total_bytes"], st
            nbytes = st["bytes"]
            if trial:
                moves.append(took)
            assert http.post("/clear", json={"instance_id": "p7-dst"}).status_code == 200
        links.append(iperf3_gbits(hosts))
        link_gbits = median(links)
        move_gbits = nbytes * 8 / median(moves) / 1e9
        # TLS on /lookup: the same request to both controllers, interleaved.
        body = {"tokens": list(range(4096))}
        tls = httpx.Client(base_url=ctl.url, headers=auth, timeout=10, verify=verify)
        clear = httpx.Client(base_url=plain.url, headers=auth, timeout=10)
        lat: dict[str, list[float]] = {"tls": [], "plain": []}
        for i in range(2 * LOOKUPS + 20):
            name, client = (("tls", tls), ("plain", clear))[i % 2]
            t0 = time.perf_counter()
            assert client.post("/lookup", json=body).status_code == 200
            if i >= 20:
                lat[name].append((time.perf_counter() - t0) * 1e3)
        for p in (src, dst):  # the raw READ below gets the hosts to itself
            cluster.stop(p)
        raw_s = nixl_raw_reads(h1, h2, nbytes)
        raw_gbits = nbytes * 8 / median(raw_s) / 1e9
        ratio = move_gbits / link_gbits
        return [
            Result(id="P7", measure="move throughput between two test hosts (NIXL over UCX tcp "
                   "through veths and a bridge), 1 GiB prefix, POST /move → done, verified",
                   value=move_gbits, unit="Gbit/s",
                   baseline={"iperf3_Gbit/s": link_gbits, "bytes": nbytes},
                   ratio=ratio, goal="≥ 0.8× iperf3", met=ratio >= 0.8,
                   trials={"move_s": moves, "iperf3_Gbit/s": links},
                   notes="standalone sidecars on test hosts 1 and 2, controller on host 3 "
                         "(CURVE, HTTPS); iperf3: one TCP stream, 3 s, three runs interleaved with the "
                         "moves, median; UCX tcp segments 256 KiB (8 KiB, UCX's default: 0.42×)"),
            Result(id="P7-nixl-raw", measure="NIXL READ alone between the same two test "
                   f"hosts (no sidecar, store or checksum), {nbytes >> 20} MiB in the fetch's "
                   "pieces", value=raw_gbits, unit="Gbit/s",
                   baseline={"iperf3_Gbit/s": link_gbits, "P7_Gbit/s": move_gbits,
                             "P7_share_of_raw": move_gbits / raw_gbits},
                   ratio=raw_gbits / link_gbits,
                   goal="reported (ratio: the transport alone against iperf3)", met=True,
                   trials={"read_s": raw_s},
                   notes="benchmarks/nixl_peer.py on hosts 1 and 2 (the sidecars stopped): "
                         "NixlTransfer with the sidecars' UCX settings, READs of 32 MiB "
                         "pieces one after another, as a fetch posts them; first read "
                         "discarded"),
            Result(id="P7-tls", measure="POST /lookup (4,096 tokens) over HTTPS, keep-alive httpx",
                   value=median(lat["tls"]), unit="ms",
                   baseline={"plain_http_ms": median(lat["plain"]),
                             "tls_p99_ms": percentile(lat["tls"], 99),
                             "plain_p99_ms": percentile(lat["plain"], 99)},
                   ratio=median(lat["tls"]) / median(lat["plain"]), goal="—", met=True,
                   trials=lat,
                   notes="two controllers on test host 3, one with --tls-cert; requests "
                         "interleaved; the first 20 discarded"),
        ]
    finally:
        cluster.stop_all()
        hosts.close()
