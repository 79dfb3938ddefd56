"""What crosses the test hosts' bridge during a full run (prompts, moves by tokens and by
prompt, lookups, listings, sidecar reads, a link's worth of KV): never the fleet secret in
clear. The control messages run CURVE, the controller's and the sidecars' HTTP run TLS; the
capture does see plaintext where there is some (vLLM's own HTTP), so it would see a secret."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from tests.e2e_hosts.conftest import SECRET
from tests.harness.api import wait_job, wait_lookup

LOC = "LocalCPUBackend"


def test_no_secret_crosses_the_network_in_clear(cross, hosts, tmp_path):
    if shutil.which("tcpdump") is None:
        pytest.fail("tcpdump is missing: run `bash scripts/setup-debian.sh`", pytrace=False)
    pcap = tmp_path / "bridge.pcap"
    # Every port of the bridge (the root namespace's veth ends and the bridge itself).
    capture = subprocess.Popen(["tcpdump", "-i", "any", "-U", "-s", "0", "-w", str(pcap),
                                "net", f"{hosts.prefix}.0/24"], stderr=subprocess.PIPE)
    time.sleep(1.5)  # listening
    e1, e2 = cross.engines["e1"], cross.engines["e2"]
    try:
        prompt = " ".join(f"wire{i} secret-free words" for i in range(150))
        e1.complete(prompt)
        tokens = e1.tokenize(prompt)
        assert wait_lookup(cross.http, tokens, {"e1": len(tokens)}) == {"e1": len(tokens)}
        for path in ("/instances", "/events", "/metrics", "/health"):
            assert cross.http.get(path).status_code == 200
        r = cross.http.post("/move", json={"old_position": ["e1", LOC], "new_position": ["e2", LOC],
                                           "prompt": prompt, "copy": True})
        assert wait_job(cross.http, r.json()["event_id"])["status"] == "done"
        r = cross.http.post("/move", json={"old_position": ["e2", LOC], "new_position": ["e1", LOC],
                                           "tokens": tokens})
        assert wait_job(cross.http, r.json()["event_id"])["status"] == "done"
        assert e2.sidecar("/store").status_code == 200 and e1.sidecar("/metrics").status_code == 200
        time.sleep(1.0)  # heartbeats and their acks, too
    finally:
        capture.send_signal(signal.SIGINT)
        _, err = capture.communicate(timeout=10)
    data = pcap.read_bytes()
    print(f"\n[hosts] captured {len(data)} bytes on the bridge: {err.decode().strip().splitlines()[-1:]}")
    assert b"POST /v1/completions" in data  # the capture sees plaintext where there is some
    assert len(data) > 500_000  # and the KV bytes of the moves
    assert SECRET.encode() not in data


def test_the_cli_speaks_https_and_verifies_the_controllers_certificate(cross, capsys):
    from sidecar.cli import main

    url = str(cross.http.base_url).rstrip("/")
    assert url.startswith("https://")
    assert main(["--controller", url, "--token", SECRET, "--cacert", cross.tls["ca"],
                 "instances"]) == 0
    assert "e1" in capsys.readouterr().out
    assert main(["--controller", url, "--token", SECRET, "instances"]) == 3  # not our CA: refused
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
