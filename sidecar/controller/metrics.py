"""Prometheus metrics of the controller (``GET /metrics``): jobs, bytes moved, durations,
lookups, instances and the index.

Counters are updated as jobs and lookups happen; gauges read the registry and the index at
scrape time. The controller app has its own registry (several apps in one process — tests —
never clash). Names follow Prometheus conventions: ``kvmove_`` prefix, ``_total`` for
counters, base units (``_bytes``, ``_seconds``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.controller.index import ChunkIndex
from sidecar.controller.instances import InstanceRegistry

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ControllerMetrics:
    """The controller's metrics, in their own registry."""

    def __init__(self, instances: InstanceRegistry, index: ChunkIndex):
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_started = Counter("kvmove_jobs_started_total", "Jobs started, by kind",
                                    ["kind"], registry=r)
        self.jobs_finished = Counter("kvmove_jobs_finished_total", "Jobs ended, by kind and status",
                                     ["kind", "status"], registry=r)
        self.moved_bytes = Counter("kvmove_moved_bytes_total", "Bytes of KV moved or copied", registry=r)
        self.job_seconds = Histogram("kvmove_job_duration_seconds", "Job duration, creation to end",
                                     ["kind"], buckets=_SECONDS, registry=r)
        self.dropped_messages = Counter(
            "kvmove_dropped_messages_total", "ZMQ messages dropped by a receive loop (wrong "
            "frames, undecodable, invalid, a reply nobody waits for, a refused registration, "
            "a stale incarnation), by socket and reason", ["socket", "reason"], registry=r)
        self.lookup_seconds = Histogram("kvmove_lookup_duration_seconds",
                                        "Time to answer /lookup from the index", buckets=_SECONDS,
                                        registry=r)
        Gauge("kvmove_instances", "Registered instances", registry=r).set_function(
            lambda: len(instances))
        Gauge("kvmove_instances_up", "Instances with a recent heartbeat", registry=r).set_function(
            instances.count_up)
        Gauge("kvmove_index_chunks", "Distinct chunk keys in the controller's index",
              registry=r).set_function(lambda: len(index))

    def job_started(self, kind: str) -> None:
        self.jobs_started.labels(kind).inc()

    def job_ended(self, kind: str, status: str, seconds: float, moved_bytes: int) -> None:
        """A job ended; ``moved_bytes`` counts for moves and copies only (0 for the rest)."""
        self.jobs_finished.labels(kind, status).inc()
        self.job_seconds.labels(kind).observe(seconds)
        if moved_bytes:
            self.moved_bytes.inc(moved_bytes)
