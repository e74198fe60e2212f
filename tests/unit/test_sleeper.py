"""Idle tenants sleep and wake (control.sleeper with the reconciler), against the in-memory
runtime, a fake gateway admin port whose activity the test sets, and a clock the test moves.
The real path (a real engine stopped, a real request waking it) is in
tests/integration/test_text_tenant.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from manager import names
from manager.contract import GatewayActivity
from manager.control.reconciler import DRAIN_POLL_S, Reconciler
from manager.control.sleeper import Turn
from manager.control.sqlite_store import SqliteStore
from manager.domain import TenantStatus
from manager.gpu.cpu import HostMemoryInventory
from manager.runtime.memory import MemoryRuntime
from manager.settings import Settings

from .conftest import write_demo_model
from .fakes import FakeGateway
from .test_reconciler import INSTANCE, add, bring_up, engine, gateway

IDLE = 15.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # the store stamps statuses with the wall clock

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Reconciler, SqliteStore, MemoryRuntime, Clock, FakeGateway]]:
    settings = Settings(
        gpu_mode="cpu", instance=INSTANCE, state_dir=tmp_path, models_dir=tmp_path, wake_timeout_s=20.0, max_waiting=3
    )
    write_demo_model(tmp_path)
    store = SqliteStore(tmp_path / "manager.db")
    runtime, clock, gateways = MemoryRuntime(), Clock(), FakeGateway()
    rec = Reconciler(settings, store, runtime, HostMemoryInventory(), connect=gateways, clock=clock)
    add(store, "lab", 30001)
    with store.transaction() as db:
        store.update_spec(db, store.tenant("lab").spec.with_changes(idle_sleep_s=IDLE))
    bring_up(rec, runtime, "lab")
    assert store.tenant("lab").status == TenantStatus.RUNNING
    clock.now = time.time()  # after it began to run: idle time counts from there at the earliest
    yield rec, store, runtime, clock, gateways
    store.close()


def serving(gateways: FakeGateway, last: float | None, in_flight: int = 0, waiting: int = 0) -> None:
    gateways.activities["token-lab"] = GatewayActivity(
        last_request_at=last, in_flight=in_flight, waiting=waiting, hold=False
    )


def asleep(rec: Reconciler, store: SqliteStore, runtime: MemoryRuntime, clock: Clock, gateways: FakeGateway) -> None:
    serving(gateways, clock.now)
    clock.now += IDLE
    assert rec.sleeper.tick() == [Turn("lab", "sleep")]
    assert rec.reconcile("lab") is None


def test_an_idle_tenant_sleeps_its_engine_is_removed_and_its_gateway_holds(world) -> None:  # type: ignore[no-untyped-def]
    rec, store, runtime, clock, gateways = world
    serving(gateways, clock.now)
    clock.now += IDLE - 1
    assert rec.sleeper.tick() == []  # a second short of its idle time
    clock.now += 1
    assert rec.sleeper.tick() == [Turn("lab", "sleep")]
    row = store.tenant("lab")
    assert row.status == TenantStatus.ASLEEP and row.sleep.sleeps == 1 and row.sleep.last_request_at is not None
    assert rec.reconcile("lab") is None
    held = gateways.configs["token-lab"]
    assert held.hold, "the gateway holds the next request"
    assert (held.hold_timeout_s, held.max_waiting) == (20.0, 3), "for as long and as many as the host says"
    assert runtime.container(engine("lab")) is None and runtime.container(gateway("lab")) is not None
    assert runtime.volumes(names.selector(INSTANCE, tenant="lab")), "its volumes stay (its caches, its spool)"
    assert [a.action for a in store.audit_log(tenant="lab")][:1] == ["sleep"]
    assert rec.sleeper.tick() == [], "asleep with nothing waiting: it stays asleep"
    assert rec.reconcile("lab") is None and runtime.container(engine("lab")) is None, "never started again"


def test_a_tenant_in_use_never_sleeps_and_a_request_taken_before_the_hold_is_answered_first(world) -> None:  # type: ignore[no-untyped-def]
    rec, store, runtime, clock, gateways = world
    serving(gateways, clock.now - 100, in_flight=1)  # a long answer: no new request, one in flight
    clock.now += IDLE * 10
    assert rec.sleeper.tick() == [] and store.tenant("lab").status == TenantStatus.RUNNING
    serving(gateways, clock.now - 100)
    assert rec.sleeper.tick() == [Turn("lab", "sleep")]
    serving(gateways, clock.now, in_flight=1)  # arrived between the look and the hold
    assert rec.reconcile("lab") == DRAIN_POLL_S
    assert runtime.container(engine("lab")) is not None, "its engine answers it first"
    serving(gateways, clock.now)
    assert rec.reconcile("lab") is None and runtime.container(engine("lab")) is None


def test_a_waiting_request_wakes_it_and_its_gateway_lets_go_once_the_engine_serves(world) -> None:  # type: ignore[no-untyped-def]
    rec, store, runtime, clock, gateways = world
    asleep(rec, store, runtime, clock, gateways)
    serving(gateways, clock.now, waiting=2)
    assert rec.sleeper.tick() == [Turn("lab", "wake")]
    woke_at = clock.now
    rec.reconcile("lab")
    row = store.tenant("lab")
    assert row.status == TenantStatus.WAKING and row.sleep.wakes == 1 and row.sleep.wake_started_at == woke_at
    assert runtime.container(engine("lab")) is not None and gateways.configs["token-lab"].hold
    clock.now += 30
    runtime.set_health(engine("lab"), "healthy")
    assert rec.reconcile("lab") is None
    row = store.tenant("lab")
    assert row.status == TenantStatus.RUNNING and row.sleep.last_wake_s == pytest.approx(30.0)
    assert not gateways.configs["token-lab"].hold, "released the moment its engine serves"
    assert rec.wake_times == [pytest.approx(30.0)]
    assert [a.action for a in store.audit_log(tenant="lab")][:3] == ["woke", "wake", "sleep"]


def test_a_wake_goes_through_the_start_gate_as_waking(world) -> None:  # type: ignore[no-untyped-def]
    rec, store, runtime, clock, gateways = world
    asleep(rec, store, runtime, clock, gateways)
    add(store, "other", 30002)
    rec.reconcile("other")  # its engine is starting: it holds the gate
    serving(gateways, clock.now, waiting=1)
    rec.sleeper.tick()
    rec.reconcile("lab")
    row = store.tenant("lab")
    assert row.status == TenantStatus.WAKING and "waiting for other's engine" in row.reason
    assert runtime.container(engine("lab")) is None and gateways.configs["token-lab"].hold


def test_turning_sleep_off_wakes_a_sleeper_and_a_tenant_without_it_is_never_asked(world) -> None:  # type: ignore[no-untyped-def]
    rec, store, runtime, clock, gateways = world
    asleep(rec, store, runtime, clock, gateways)
    with store.transaction() as db:
        store.update_spec(db, store.tenant("lab").spec.with_changes(idle_sleep_s=None))
    assert rec.sleeper.tick() == [Turn("lab", "wake")]
    assert store.tenant("lab").reason == "waking: sleeping was turned off"
    rec.reconcile("lab")
    runtime.set_health(engine("lab"), "healthy")
    rec.reconcile("lab")
    assert store.tenant("lab").status == TenantStatus.RUNNING
    serving(gateways, clock.now - 10 * IDLE)
    clock.now += 10 * IDLE
    assert rec.sleeper.tick() == [], "no idle sleep set: it never sleeps"


def test_metrics_show_who_sleeps_and_how_long_wakes_take(world) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    from manager.api.metrics import Metrics
    from manager.control.service import TenantService

    rec, store, runtime, clock, gateways = world
    inventory = HostMemoryInventory()
    metrics = Metrics(TenantService(rec.settings, store, runtime, inventory, rec), rec, inventory)

    def samples() -> dict[tuple[str, str], float]:
        text = metrics.render().decode()
        return {
            (s.name, s.labels.get("tenant") or s.labels.get("quantile") or s.labels.get("status", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    asleep(rec, store, runtime, clock, gateways)
    now = samples()
    assert now[("gtm_tenant_asleep", "lab")] == 1 and now[("gtm_tenants", "asleep")] == 1
    assert now[("gtm_tenant_sleeps_total", "lab")] == 1 and now[("gtm_tenant_wakes_total", "lab")] == 0
    assert ("gtm_wake_seconds", "0.5") not in now
    serving(gateways, clock.now, waiting=1)
    rec.sleeper.tick()
    rec.reconcile("lab")
    clock.now += 12
    runtime.set_health(engine("lab"), "healthy")
    rec.reconcile("lab")
    now = samples()
    assert now[("gtm_tenant_asleep", "lab")] == 0 and now[("gtm_tenant_wakes_total", "lab")] == 1
    assert now[("gtm_wake_seconds", "0.5")] == pytest.approx(12.0) == now[("gtm_wake_seconds", "0.99")]
    assert now[("gtm_tenant_last_request_timestamp_seconds", "lab")] > 0


def test_a_gateway_not_yet_healthy_is_not_asked(world) -> None:  # type: ignore[no-untyped-def]
    """A gateway starting (Docker's first check not passed yet) refuses connections: the sleeper
    leaves it to the reconciler rather than logging a failure every second."""
    rec, _, runtime, clock, gateways = world
    serving(gateways, clock.now)
    clock.now += IDLE
    runtime.set_health(gateway("lab"), "starting")
    gateways.connected.clear()
    assert rec.sleeper.tick() == [] and gateways.connected == []
    runtime.set_health(gateway("lab"), "healthy")
    assert rec.sleeper.tick() == [Turn("lab", "sleep")]
