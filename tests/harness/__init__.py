"""Test and benchmark helpers (not shipped): processes, fleets of sidecars, engines, stores,
and the controller API as tests call it.

* :mod:`.processes` — start and stop real processes (engines, controller, standalone
  sidecars) by PID; free ports.
* :mod:`.standalone` — a sidecar in a process of its own, with synthetic KV.
* :mod:`.stores` — tiny layouts, chunks written into stores, synthetic chunk bytes.
* :mod:`.api` — the controller's HTTP API as tests use it: moves, waits that raise on timeout.
* :mod:`.fleet` — a controller process and sidecars (in-process or standalone), no vLLM.
* :mod:`.engines` — real vLLM engines with the connector, and the seed's cluster.
* :mod:`.hosts` — test hosts: network and pid namespaces on a bridge (``scripts/test-hosts.sh``).
"""
