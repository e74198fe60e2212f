"""Latency per tenant and member: the figures each usage record carries from its gateway (time
queued for an engine slot, time to first token) through the gateway's spool and the manager's
store, summarised over the last hour on the manager's /metrics and the console's tenant page."""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from manager.api.metrics import Metrics
from manager.control.latency import Latency, quantile, summarise
from manager.control.service import TenantService
from manager.domain import TenantSpec
from manager.gateway.store import GatewayStore, Settle

from .fakes import usage_record


def test_quantiles_are_nearest_rank_and_members_add_up_to_the_tenant() -> None:
    assert quantile([1.0], 0.99) == 1.0
    assert quantile([float(i) for i in range(1, 101)], 0.5) == 50.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0
    figures = summarise([("alice", 100.0, 0.0), ("alice", 300.0, 50.0), ("bob", None, 2000.0), ("bob", 900.0, 0.0)])
    assert [f.member for f in figures] == ["", "alice", "bob"], "the tenant first, then by name"
    tenant, alice, bob = figures
    assert tenant == Latency("", 4, {0.5: 0.3, 0.99: 0.9}, {0.5: 0.0, 0.99: 2.0})
    assert alice.first_token == {0.5: 0.1, 0.99: 0.3} and bob.first_token == {0.5: 0.9, 0.99: 0.9}
    assert summarise([]) == [Latency("", 0, {}, {})]


def test_a_records_latency_goes_from_the_spool_to_the_managers_metrics(svc: TenantService, tmp_path: Path) -> None:
    spool = GatewayStore(tmp_path / "gw.db")
    now = time.time()
    fields = dict(usage_record("r1", member="alice", at=now, queue_ms=250.0, first_token_ms=400.0))
    spool.write([Settle(fields, opened=False)])
    old = dict(usage_record("r0", member="alice", at=now - 7200, queue_ms=9000.0, first_token_ms=9000.0))
    spool.write([Settle(old, opened=False)])  # two hours ago: outside the window
    (back, before) = sorted(spool.after(0).records, key=lambda r: r.request_id, reverse=True)
    assert (back.queue_ms, back.first_token_ms) == (250.0, 400.0)

    svc.create(TenantSpec(name="lab", port=30901, gpu_memory=1536 * 1024**2, model="demo", max_model_len=512), "test")
    svc.store.add_usage("lab", [back, before], 2)
    tenant, alice = svc.latency("lab", now)
    assert alice.member == "alice" and alice.requests == 1 and alice.first_token == {0.5: 0.4, 0.99: 0.4}
    assert tenant.queued == {0.5: 0.25, 0.99: 0.25}

    metrics = Metrics(svc, svc.reconciler, svc.inventory)
    samples = {
        (s.name, s.labels["member"], s.labels["quantile"]): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.labels.get("tenant") == "lab" and "quantile" in s.labels
    }
    assert samples[("gtm_tenant_time_to_first_token_seconds", "alice", "0.99")] == 0.4
    assert samples[("gtm_tenant_queue_seconds", "", "0.5")] == 0.25


def test_the_tenant_page_shows_first_token_times_over_the_last_hour(base_url: str) -> None:
    import httpx

    from .conftest import TOKEN

    admin = {"Authorization": f"Bearer {TOKEN}"}
    created = httpx.post(
        f"{base_url}/api/v1/tenants", headers=admin, json={"name": "timed", "port": 30631, "gpu_memory": "1536M"}
    )
    assert created.status_code == 201, created.text
    console = httpx.Client(base_url=base_url)
    assert console.post("/login", data={"username": "admin", "password": TOKEN}).status_code == 303
    page = console.get("/tenants/timed").text
    assert re.search(r'data-testid="latency">\s*no requests', page)
    assert "each member in turn (fair queuing)" in page
