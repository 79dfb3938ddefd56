"""The per-engine agent ("sidecar"): runs inside each engine's worker process, started by the
connector (:func:`start_sidecar`, the data plane's one tie to the control plane).

* :mod:`.runtime` — the :class:`Sidecar`: its thread, sockets, registration, events,
  heartbeats.
* :mod:`.commands` — what it does when the controller commands it; transfer leases.
* :mod:`.fetch` — a destination's reserve → read → verify → publish pipeline.
* :mod:`.app` — its HTTP app (endpoint table); :mod:`.metrics` — its Prometheus metrics.

It never imports the controller (the two meet only through :mod:`sidecar.protocol`).
"""

from sidecar.agent.runtime import Sidecar, start_sidecar

__all__ = ["Sidecar", "start_sidecar"]
