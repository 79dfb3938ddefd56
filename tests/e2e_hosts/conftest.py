"""Engines on separate test hosts (tests/harness/hosts.py): engine 1 on host 1, engine 2 on
host 2, the controller on host 3 (host 4 for more sidecars), each in network and pid
namespaces of its own, configured only through the documented keys and flags, with a fleet
secret (every listener binds to its host's address, so one is required) and HTTPS on the
controller's and the sidecars' HTTP apps (a test CA made at start: so no secret crosses the
bridge in clear). Started once for the package; skipped, with the reason, where test hosts
cannot be made."""

from __future__ import annotations

import time

import httpx
import pytest

from sidecar.httpkit import verify_with
from tests.harness.engines import Engine, model_dir
from tests.harness.hosts import HostsUnavailable, TestHosts
from tests.harness.processes import LocalCluster
from tests.harness.tls import make_certs

SECRET = "cross-host-fleet-secret-42"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class CrossHostCluster:
    """The controller on hosts[2], engines e1 and e2 on hosts[0] and hosts[1]."""

    def __init__(self, hosts: TestHosts, workdir):
        self.hosts = hosts
        h1, h2, h3 = hosts.hosts[:3]
        self.tls = make_certs(workdir / "tls", [h.address for h in hosts.hosts])
        self.verify = verify_with(self.tls["ca"])  # what clients check the servers with
        self.local = LocalCluster(model_dir(), workdir)
        try:
            ctl = self.local.start_controller(9000, 8300, 8400, host=h3, extra_args=[
                "--api-token", SECRET, "--tls-cert", self.tls["cert"], "--tls-key", self.tls["key"]])
            self.engines: dict[str, Engine] = {}
            for i, h in ((1, h1), (2, h2)):
                extra = {"instance_id": f"e{i}", "api_token": SECRET,
                         "controller_pull_url": f"{h3.address}:8300",
                         "controller_reply_url": f"{h3.address}:8400",
                         "sidecar_host": h.address, "sidecar_port": 8500,
                         "p2p_host": h.address, "p2p_init_port": 8200,
                         "engine_url": f"http://{h.address}:8000", "max_local_cpu_size": 0.25,
                         "command_timeout_s": 10, "heartbeat_interval_s": 0.5,
                         "tls_cert": self.tls["cert"], "tls_key": self.tls["key"]}
                proc = self.local.start_engine(f"e{i}", 8000, extra_config=extra, cpu=i - 1,
                                               host=h, env={"VLLM_SERVER_DEV_MODE": "1"})  # for
                # /reset_prefix_cache: a request then gets only what the store can give
                self.engines[f"e{i}"] = Engine(f"e{i}", proc, f"https://{h.address}:8500",
                                               str(self.local.model_dir), token=SECRET,
                                               ca=self.verify)
            self.local.wait_ready(ctl, timeout=60, verify=self.verify)
            for e in self.engines.values():
                self.local.wait_ready(e.proc, timeout=300)  # vLLM's own server: plain HTTP
            self.http = httpx.Client(base_url=ctl.url, headers=AUTH, timeout=60,
                                     verify=self.verify)
            self.wait_up({"e1", "e2"})
        except BaseException:
            self.local.stop_all()
            raise

    def up(self) -> set[str]:
        return {i["instance_id"] for i in self.http.get("/instances").json()["instances"] if i["up"]}

    def wait_up(self, ids: set[str], timeout: float = 30) -> float:
        t0 = time.monotonic()
        while not ids <= self.up():
            assert time.monotonic() - t0 < timeout, f"not up: {ids - self.up()}"
            time.sleep(0.2)
        return time.monotonic() - t0

    def close(self) -> None:
        self.local.stop_all()


@pytest.fixture(scope="package")
def hosts():
    try:
        h = TestHosts.create(4)
    except HostsUnavailable as e:
        pytest.skip(str(e))
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="package")
def cross(hosts, tmp_path_factory):
    c = CrossHostCluster(hosts, tmp_path_factory.mktemp("hosts"))
    try:
        yield c
    finally:
        c.close()
