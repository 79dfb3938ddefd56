"""vllm-kvmove control plane: the per-engine sidecar, the controller, and their wire types.

Calls flow one way: control plane → data plane (:mod:`vllm_kvmove`). The data plane never
imports this package, except the connector starting the sidecar (:func:`sidecar.runtime.start_sidecar`).
"""
