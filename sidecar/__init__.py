"""vllm-kvmove's control plane: the per-engine agent, the controller, and what they share.

* :mod:`sidecar.protocol` — every wire and HTTP type, limit and state (imports nothing else of
  the control plane);
* :mod:`sidecar.httpkit` — error map and envelope, body reading, endpoint tables (routes and
  OpenAPI from one declaration, auth as one wrapper); :mod:`sidecar.zmqio` — ZMQ sockets on an
  asyncio loop;
* :mod:`sidecar.agent` — the sidecar inside each engine's worker process;
* :mod:`sidecar.controller` — the controller (``kvmove-controller``);
* :mod:`sidecar.cli` — the operator's command line (``kvmove``), an HTTP client only.

Calls flow one way: control plane → data plane (:mod:`vllm_kvmove`). The data plane never
imports this package, except the connector starting the agent
(:func:`sidecar.agent.start_sidecar`). The agent and the controller never import each other.
``lint-imports`` (contracts in ``pyproject.toml``) checks all of this in CI.
"""
