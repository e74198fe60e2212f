"""Prometheus metrics of the manager, computed from state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from manager.control.reconciler import Reconciler
from manager.control.records import TenantRow
from manager.control.service import TenantService
from manager.domain import TenantStatus
from manager.gpu import Inventory


class StateCollector(Collector):
    def __init__(self, service: TenantService, reconciler: Reconciler, inventory: Inventory) -> None:
        self.service, self.reconciler, self.inventory = service, reconciler, inventory

    def collect(self):  # type: ignore[no-untyped-def]
        rows = self.service.tenants()
        by_status = GaugeMetricFamily("gtm_tenants", "Tenants by status", labels=["status"])
        counts = {s.value: 0 for s in TenantStatus}
        for r in rows:
            counts[r.status.value] += 1
        for s, n in counts.items():
            by_status.add_metric([s], n)
        yield by_status
        reserved = GaugeMetricFamily("gtm_tenant_reserved_bytes", "Reserved memory per tenant", labels=["tenant"])
        for r in rows:
            reserved.add_metric([r.spec.name], r.spec.gpu_memory)
        yield reserved
        measured = GaugeMetricFamily("gtm_tenant_measured_bytes", "Measured memory per tenant", labels=["tenant"])
        over = GaugeMetricFamily(
            "gtm_tenant_over_reservation", "1 when measured use exceeds the reservation", labels=["tenant"]
        )
        use = self.service.meter.measured_use()
        for r in rows:
            value = use.get(r.spec.name)
            if value is not None:
                measured.add_metric([r.spec.name], value)
                over.add_metric([r.spec.name], 1 if value > r.spec.gpu_memory else 0)
        yield measured
        yield over
        yield from self._sleep(rows)
        yield from self._latency(rows)
        requests = CounterMetricFamily(
            "gtm_usage_requests",
            "Requests metered, by tenant and member (collected from the gateways)",
            labels=["tenant", "member"],
        )
        tokens = CounterMetricFamily(
            "gtm_usage_tokens",
            "Tokens metered, by tenant, member and kind (collected from the gateways)",
            labels=["tenant", "member", "kind"],
        )
        for tenant, member, totals in self.service.usage_counters():
            requests.add_metric([tenant, member], totals.requests)
            tokens.add_metric([tenant, member, "prompt"], totals.prompt_tokens)
            tokens.add_metric([tenant, member, "completion"], totals.completion_tokens)
        yield requests
        yield tokens
        errors = CounterMetricFamily(
            "gtm_reconciler_loop_errors", "Exceptions survived by the reconciler's loops", labels=["loop"]
        )
        for loop in ("worker", "resync", "usage", "sleep"):
            errors.add_metric([loop], self.reconciler.loop_errors[loop])
        yield errors
        dev = GaugeMetricFamily("gtm_device_memory_bytes", "Device memory", labels=["device", "uuid", "kind"])
        for device in self.inventory.devices():
            figures = (("total", device.total), ("free", device.free), ("used", device.used))
            for kind, value in (*figures, ("driver_reserved", device.reserved)):
                dev.add_metric([str(device.index), device.uuid, kind], value)
        yield dev

    def _latency(self, rows: list[TenantRow]) -> Iterator[Metric]:
        """Each tenant's and member's time to first token and time queued at its gateway, p50 and
        p99 over the last hour, from the usage records (member '': the whole tenant)."""
        labels = ["tenant", "member", "quantile"]
        first = GaugeMetricFamily(
            "gtm_tenant_time_to_first_token_seconds",
            "Streamed requests: arrival at the gateway to the first token, over the last hour",
            labels=labels,
        )
        queued = GaugeMetricFamily(
            "gtm_tenant_queue_seconds",
            "Time waited at the gateway for an engine slot, over the last hour",
            labels=labels,
        )
        for r in rows:
            for figures in self.service.latency(r.spec.name):
                for q, value in figures.first_token.items():
                    first.add_metric([r.spec.name, figures.member, str(q)], value)
                for q, value in figures.queued.items():
                    queued.add_metric([r.spec.name, figures.member, str(q)], value)
        yield first
        yield queued

    def _sleep(self, rows: list[TenantRow]) -> Iterator[Metric]:
        """Tenants that sleep when idle: asleep or not, when last used, sleeps and wakes, and how
        long this manager's wakes took (p50, p99)."""
        sleepers = [r for r in rows if r.spec.idle_sleep_s is not None or r.sleep.sleeps]
        asleep = GaugeMetricFamily("gtm_tenant_asleep", "1 while the tenant sleeps or wakes", labels=["tenant"])
        last = GaugeMetricFamily(
            "gtm_tenant_last_request_timestamp_seconds", "When its gateway last took a request", labels=["tenant"]
        )
        sleeps = CounterMetricFamily("gtm_tenant_sleeps", "Times the tenant went to sleep", labels=["tenant"])
        wakes = CounterMetricFamily("gtm_tenant_wakes", "Times a request woke the tenant", labels=["tenant"])
        for r in sleepers:
            name = r.spec.name
            asleep.add_metric([name], 1 if r.status in (TenantStatus.ASLEEP, TenantStatus.WAKING) else 0)
            if r.sleep.last_request_at is not None:
                last.add_metric([name], r.sleep.last_request_at)
            sleeps.add_metric([name], r.sleep.sleeps)
            wakes.add_metric([name], r.sleep.wakes)
        yield from (asleep, last, sleeps, wakes)
        took = sorted(self.reconciler.wake_times)
        wake = GaugeMetricFamily(
            "gtm_wake_seconds",
            "Wake time, from the request that found a tenant asleep to its engine serving (this manager's wakes)",
            labels=["quantile"],
        )
        if took:
            for q in (0.5, 0.99):
                wake.add_metric([str(q)], took[min(len(took) - 1, int(q * len(took)))])
        yield wake


class Metrics:
    def __init__(self, service: TenantService, reconciler: Reconciler, inventory: Inventory) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StateCollector(service, reconciler, inventory))
        self.refusals = Counter(
            "gtm_admission_refusals", "Admission refusals by failed check", ["check"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
