"""Prometheus /metrics of the controller and a sidecar, scraped and parsed."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.api import LOC
from tests.harness.stores import fill


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_controller_and_sidecar_metrics_follow_a_move(fleet):
    a, b = fleet.add_sidecar("met-a"), fleet.add_sidecar("met-b")
    before = scrape(fleet.http.base_url.__str__().rstrip("/"))
    tokens = list(range(6000, 6070))
    written = fill(a, tokens, seed=5)
    fleet.wait_lookup(tokens, {"met-a": 70})
    fleet.http.post("/lookup", json={"tokens": tokens})
    r = fleet.http.post("/move", json={"old_position": ["met-a", LOC], "new_position": ["met-b", LOC],
                                       "tokens": tokens})
    st = fleet.wait_job(r.json()["event_id"])
    moved = sum(len(v) for v in written.values())
    assert st["bytes"] == moved
    after = scrape(str(fleet.http.base_url).rstrip("/"))
    assert value(after, "kvmove_jobs_started_total", kind="move") - value(before, "kvmove_jobs_started_total", kind="move") == 1
    assert value(after, "kvmove_jobs_finished_total", kind="move", status="done") - \
        value(before, "kvmove_jobs_finished_total", kind="move", status="done") == 1
    assert value(after, "kvmove_moved_bytes_total") - value(before, "kvmove_moved_bytes_total") == moved
    assert value(after, "kvmove_job_duration_seconds_count", kind="move") >= 1
    assert value(after, "kvmove_lookup_duration_seconds_count") >= 1
    assert value(after, "kvmove_instances") >= 2 and value(after, "kvmove_instances_up") >= 2

    src, dst = scrape(a.sidecar_url), scrape(b.sidecar_url)
    assert value(dst, "kvmove_transfer_bytes_total", instance_id="met-b", direction="in") == moved
    assert value(src, "kvmove_transfer_bytes_total", instance_id="met-a", direction="out") == moved
    assert value(dst, "kvmove_transfers_total", instance_id="met-b") == 1
    assert value(dst, "kvmove_store_chunks", instance_id="met-b") == len(written)
    assert value(src, "kvmove_store_chunks", instance_id="met-a") == 0
    assert value(dst, "kvmove_store_capacity_bytes", instance_id="met-b") == b.store.pool_bytes
    assert value(dst, "kvmove_store_used_bytes", instance_id="met-b") == len(written) * b.store.slot_bytes
