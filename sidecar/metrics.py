"""Prometheus metrics of the controller and of each sidecar (``GET /metrics`` on both).

Each app has its own registry (so several apps in one process — tests — never clash). Sidecar
metrics are read from the store's and transfer layer's counters at scrape time: nothing is
added to the engine's forward path. Names follow Prometheus conventions: ``kvmove_`` prefix,
``_total`` for counters, base units (``_bytes``, ``_seconds``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from sidecar.controller import Controller, Job
    from sidecar.runtime import Sidecar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def metrics_endpoint(registry: CollectorRegistry) -> Callable:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)
    return metrics


class ControllerMetrics:
    """Counters the controller updates as jobs and lookups happen, plus scrape-time gauges."""

    def __init__(self, controller: "Controller"):
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_started = Counter("kvmove_jobs_started_total", "Jobs started, by kind",
                                    ["kind"], registry=r)
        self.jobs_finished = Counter("kvmove_jobs_finished_total", "Jobs ended, by kind and status",
                                     ["kind", "status"], registry=r)
        self.moved_bytes = Counter("kvmove_moved_bytes_total", "Bytes of KV moved or copied", registry=r)
        self.job_seconds = Histogram("kvmove_job_duration_seconds", "Job duration, creation to end",
                                     ["kind"], buckets=_SECONDS, registry=r)
        self.lookup_seconds = Histogram("kvmove_lookup_duration_seconds",
                                        "Time to answer /lookup from the index", buckets=_SECONDS,
                                        registry=r)
        Gauge("kvmove_instances", "Registered instances", registry=r).set_function(
            lambda: len(controller.instances))
        Gauge("kvmove_instances_up", "Instances with a recent heartbeat", registry=r).set_function(
            lambda: sum(1 for i in controller.instances.values() if controller.is_up(i)))
        Gauge("kvmove_index_chunks", "Distinct chunk keys in the controller's index",
              registry=r).set_function(lambda: len(controller.index))

    def job_started(self, job: "Job") -> None:
        self.jobs_started.labels(job.kind).inc()

    def job_ended(self, job: "Job") -> None:
        self.jobs_finished.labels(job.kind, job.status).inc()
        if job.ended is not None:
            self.job_seconds.labels(job.kind).observe(job.ended - job.created)
        if job.kind in ("move", "copy"):
            self.moved_bytes.inc(job.bytes)


class SidecarCollector(Collector):
    """Reads one sidecar's store and transfer counters when scraped."""

    def __init__(self, sidecar: "Sidecar"):
        self.sidecar = sidecar

    def collect(self) -> Iterable:
        st = self.sidecar.store.stats()
        tr = self.sidecar.stats
        labels = {"instance_id": self.sidecar.config.instance_id}

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            g.add_metric(list(labels.values()), value)
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(name, doc, labels=list(labels))
            c.add_metric(list(labels.values()), value)
            return c

        yield gauge("kvmove_store_used_bytes", "Store pool bytes holding chunks", st["used_bytes"])
        yield gauge("kvmove_store_capacity_bytes", "Store pool size", st["capacity_bytes"])
        yield gauge("kvmove_store_chunks", "Chunks held and visible", st["num_chunks"])
        yield gauge("kvmove_store_tokens", "Tokens of KV held", st["num_tokens"])
        yield gauge("kvmove_store_pinned_chunks", "Chunks pinned by loads or transfers", st["pinned_chunks"])
        yield gauge("kvmove_store_persistent_chunks", "Chunks pinned by an operator (/pin)",
                    st["persistent_chunks"])
        yield counter("kvmove_store_evictions", "Chunks evicted to make room", st["evictions"])
        t = CounterMetricFamily("kvmove_transfer_bytes", "Bytes moved between stores, by direction",
                                labels=["instance_id", "direction"])
        t.add_metric([labels["instance_id"], "in"], tr["bytes_in"])
        t.add_metric([labels["instance_id"], "out"], tr["bytes_out"])
        yield t
        yield counter("kvmove_transfers", "Fetches completed by this sidecar", tr["fetches"])
        yield counter("kvmove_transfer_failures", "Fetches that failed at this sidecar",
                      tr["fetch_failures"])
        yield counter("kvmove_same_host_transfers", "Fetches copied from a same-host peer's "
                      "shared pool (the rest went over NIXL)", tr["same_host_fetches"])


def sidecar_registry(sidecar: "Sidecar") -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SidecarCollector(sidecar))
    return registry
