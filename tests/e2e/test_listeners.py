"""Every listener of a real engine started the way the README starts one (its environment,
``--host 127.0.0.1``, no UCX_NET_DEVICES) binds to loopback: vLLM's server, the sidecar's HTTP
app, its NIXL metadata server, and UCX's own tcp listener (which follows ``p2p_host``)."""

from __future__ import annotations

from tests.harness.processes import ENGINE_ENV, LOOPBACK_HEX, listening_addresses, process_tree


def test_every_listener_of_the_engines_binds_to_loopback(cluster):
    assert "UCX_NET_DEVICES" not in ENGINE_ENV
    for iid, engine in cluster.engines.items():
        listeners = {pid: listening_addresses(pid) for pid in process_tree(engine.proc.pid)}
        every = set().union(*listeners.values())
        ports = {port for _, port in every}
        # vLLM's port, the sidecar's, the NIXL metadata port, and at least UCX's listener.
        assert {int(engine.url.rsplit(":", 1)[1]), int(engine.sidecar_url.rsplit(":", 1)[1])} <= ports
        assert len(every) >= 4, (iid, listeners)
        assert {addr for addr, _ in every} <= LOOPBACK_HEX, (iid, listeners)
