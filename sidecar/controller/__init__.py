"""The controller: federates the engines' sidecars, keeps the index of who holds what, and
runs moves as jobs. One process, one asyncio loop.

Its rooms, from the bottom up (each imports only those below it; ``lint-imports`` checks):

* :mod:`.index` — ``ChunkIndex``: which instance holds which chunk;
* :mod:`.settings` — ``ControllerSettings``;
* :mod:`.instances` — ``InstanceRegistry``: registrations, heartbeats, snapshots, events;
* :mod:`.metrics` — its Prometheus metrics;
* :mod:`.jobs` — the job state machine, the job table, a move's steps (``run_transfer``);
* :mod:`.channel` — ``SidecarChannel``: the ZMQ sockets and the command RPC;
* :mod:`.service` — ``Controller``: validation, lookups, starting jobs;
* :mod:`.api` — the endpoint table (routes and OpenAPI document) and the Starlette app;
* :mod:`.main` — ``kvmove-controller``.

It never imports the per-engine agent (the two meet only through :mod:`sidecar.protocol`).
"""
