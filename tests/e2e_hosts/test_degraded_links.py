"""Moves over degraded links: two standalone sidecars on test hosts 3 and 4 whose data path
(``p2p_host``) is an impaired link between the two hosts (tests/harness/wire.py: this kernel has
no netem) while their control plane stays on the bridge. With 50 ms of delay each way (a
100 ms round trip), and then with 1 % of frames lost, a copy of 128 MiB of KV completes,
byte-exact (every chunk checksummed by the destination before it is published, and compared
here with what the source holds); its throughput is printed beside iperf3's over the same
impaired link in the same run."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from tests.e2e_hosts.conftest import SECRET
from tests.harness.api import LOC, wait_job, wait_lookup
from tests.harness.hosts import iperf3_bits_per_s
from tests.harness.stores import BIG_LAYOUT, synthetic_chunk
from tests.harness.wire import ImpairedLink
from vllm_kvmove.hashing import chunk_spans

TOKENS = list(range(7_000_000, 7_000_000 + 8 * BIG_LAYOUT.chunk_size))  # 8 × 16 MiB
MiB = 1 << 20


@pytest.fixture(scope="module")
def impaired(cross, hosts):
    """The link (no impairment yet) and the two sidecars, ``dl-a`` holding TOKENS."""
    h3, h4 = hosts.hosts[2], hosts.hosts[3]
    link = ImpairedLink(h3, h4, prefix=f"10.214.{hosts.prefix.rsplit('.', 1)[1]}",
                        tag=hosts.tag)
    procs = []
    try:
        for n, (iid, host, address) in enumerate((("dl-a", h3, link.address_a),
                                                  ("dl-b", h4, link.address_b))):
            config = {"instance_id": iid, "api_token": SECRET,
                      "controller_pull_url": f"{h3.address}:8300",
                      "controller_reply_url": f"{h3.address}:8400",
                      "sidecar_host": host.address, "sidecar_port": 8800 + n,
                      "p2p_host": address, "p2p_init_port": 8900 + n,
                      "chunk_size": BIG_LAYOUT.chunk_size, "max_local_cpu_size": 0.15,
                      "heartbeat_interval_s": 0.5, "command_timeout_s": 60,
                      "tls_cert": cross.tls["cert"], "tls_key": cross.tls["key"]}
            fill = [f"31:{TOKENS[0]}:{len(TOKENS)}"] if iid == "dl-a" else []
            procs.append(cross.local.start_sidecar_process(config, BIG_LAYOUT.to_dict(), fill,
                                                           host=host))
        for p in procs:
            cross.local.wait_ready(p, timeout=120, verify=cross.verify)
        cross.wait_up({"dl-a", "dl-b"})
        assert wait_lookup(cross.http, TOKENS, {"dl-a": len(TOKENS)}, timeout=30)
        yield link
    finally:
        for p in procs:
            cross.local.stop(p)
        link.close()


def iperf3_mbytes(hosts, link: ImpairedLink) -> float | None:
    """One TCP stream over the link, host 3 → host 4, 4 s: MiB/s received (None without
    iperf3)."""
    if shutil.which("iperf3") is None:
        return None
    return iperf3_bits_per_s(hosts.hosts[2], hosts.hosts[3], link.address_b, 4) / 8 / MiB


@pytest.mark.timeout(600)
@pytest.mark.parametrize("delay_s, loss", [(0.05, 0.0), (0.0, 0.01)], ids=["50ms-each-way", "1pct-loss"])
def test_a_copy_over_a_degraded_link_completes_byte_exact(cross, hosts, impaired, delay_s, loss):
    link = impaired
    link.set(delay_s, loss)
    try:
        # The data path goes over the link (its device, from its own address).
        route = hosts.hosts[2].ip("route", "get", link.address_b)
        assert f"src {link.address_a}" in route.stdout, route.stdout
        frames0, dropped0 = link.frames, link.dropped
        t0 = time.monotonic()
        r = cross.http.post("/move", json={"old_position": ["dl-a", LOC], "new_position": ["dl-b", LOC],
                                           "tokens": TOKENS, "copy": True})
        assert r.status_code == 200, r.text
        st = wait_job(cross.http, r.json()["event_id"], timeout=300)
        took = time.monotonic() - t0
        assert st["status"] == "done" and st["bytes"] == st["total_bytes"] == 8 * BIG_LAYOUT.chunk_bytes, st
        carried, dropped = link.frames - frames0, link.dropped - dropped0
        # Byte-exact at the destination, chunk by chunk.
        sidecar = f"https://{hosts.hosts[3].address}:8801"
        auth = {"Authorization": f"Bearer {SECRET}"}
        for i, span in enumerate(chunk_spans(TOKENS, BIG_LAYOUT.chunk_size, BIG_LAYOUT.fingerprint())):
            got = httpx.get(f"{sidecar}/chunks/{span.key.hex()}", headers=auth, timeout=60,
                            verify=cross.verify).content
            assert got == synthetic_chunk(BIG_LAYOUT, span.num_tokens, 31 + i).numpy().tobytes()
        link_mib = iperf3_mbytes(hosts, link)
        mib_s = st["bytes"] / MiB / took
        print(f"\n[hosts] degraded link ({delay_s * 1e3:.0f} ms each way, {loss:.0%} loss): "
              f"copy of {st['bytes'] >> 20} MiB done in {took:.2f} s ({mib_s:.1f} MiB/s; iperf3 over "
              f"the same link: {link_mib if link_mib is None else f'{link_mib:.1f}'} MiB/s); "
              f"{carried} frames carried, {dropped} dropped")
        if loss:
            assert dropped > 0  # the loss was real
        else:
            assert took > 2 * delay_s  # ...and so was the delay: at least one round trip
    finally:
        link.set(0.0, 0.0)
        r = cross.http.post("/clear", json={"instance_id": "dl-b", "location": LOC})
        assert r.status_code == 200, r.text
