"""Prometheus metrics of one sidecar (``GET /metrics``): its store and its transfers.

Read from the store's and the transfer counters at scrape time, so nothing is added to the
engine's forward path. Each sidecar app has its own registry (several sidecars in one process
— tests — never clash). Names follow Prometheus conventions: ``kvmove_`` prefix, ``_total``
for counters, base units (``_bytes``).
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.protocol import TransferCounters
from vllm_kvmove.store import ChunkStore


class SidecarCollector(Collector):
    """Reads one sidecar's store and transfer counters when scraped."""

    def __init__(self, instance_id: str, store: ChunkStore, counters: TransferCounters):
        self.instance_id, self.store, self.counters = instance_id, store, counters

    def collect(self) -> Iterable:
        st, tr = self.store.stats(), self.counters
        label = ["instance_id"], [self.instance_id]

        def family(kind, name: str, doc: str, value: float):
            f = kind(name, doc, labels=label[0])
            f.add_metric(label[1], value)
            return f

        yield family(GaugeMetricFamily, "kvmove_store_used_bytes", "Store pool bytes holding chunks",
                     st["used_bytes"])
        yield family(GaugeMetricFamily, "kvmove_store_capacity_bytes", "Store pool size",
                     st["capacity_bytes"])
        yield family(GaugeMetricFamily, "kvmove_store_chunks", "Chunks held and visible",
                     st["num_chunks"])
        yield family(GaugeMetricFamily, "kvmove_store_tokens", "Tokens of KV held", st["num_tokens"])
        yield family(GaugeMetricFamily, "kvmove_store_held_chunks",
                     "Chunks held by a load or a transfer lease", st["held_chunks"])
        yield family(GaugeMetricFamily, "kvmove_store_pinned_chunks",
                     "Chunks pinned by an operator (/pin)", st["pinned_chunks"])
        yield family(CounterMetricFamily, "kvmove_store_evictions", "Chunks evicted to make room",
                     st["evictions"])
        yield family(CounterMetricFamily, "kvmove_engine_loaded_bytes",
                     "Bytes the engine loaded from the store into its KV cache (prefix hits)",
                     st["engine_loaded_bytes"])
        yield family(CounterMetricFamily, "kvmove_engine_load_seconds",
                     "Wall time of those loads, from the step's start to its last copy",
                     st["engine_load_us"] / 1e6)
        t = CounterMetricFamily("kvmove_transfer_bytes", "Bytes moved between stores, by direction",
                                labels=["instance_id", "direction"])
        t.add_metric([self.instance_id, "in"], tr.bytes_in)
        t.add_metric([self.instance_id, "out"], tr.bytes_out)
        yield t
        yield family(CounterMetricFamily, "kvmove_transfers", "Fetches completed by this sidecar",
                     tr.fetches)
        yield family(CounterMetricFamily, "kvmove_transfer_failures",
                     "Fetches that failed at this sidecar", tr.fetch_failures)
        yield family(CounterMetricFamily, "kvmove_same_host_transfers",
                     "Fetches copied from a same-host peer's shared pool (the rest went over "
                     "NIXL)", tr.same_host_fetches)


def sidecar_registry(instance_id: str, store: ChunkStore,
                     counters: TransferCounters) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SidecarCollector(instance_id, store, counters))
    return registry
