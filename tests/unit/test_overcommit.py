"""Overcommit: the pure decisions (control.overcommit), then the sleeper and the reconciler taking
turns on a host with room for two awake tenants (the in-memory runtime, fake gateways whose
activity the test sets, a clock the test moves, host memory read from a file the test writes), and
admission saying whether a new tenant fits awake or only by overcommit. The real path is in
tests/integration/test_text_tenant.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from manager import names
from manager.contract import GatewayActivity
from manager.control.overcommit import Resident, Room, counted_beside, plan_wake
from manager.control.reconciler import Reconciler
from manager.control.service import TenantService
from manager.control.sleeper import Turn
from manager.control.sqlite_store import SqliteStore
from manager.domain import Quotas, TenantSpec, TenantStatus
from manager.errors import AdmissionRefused
from manager.gpu.cpu import HostMemoryInventory
from manager.runtime.memory import MemoryRuntime
from manager.settings import Settings

from .conftest import walk_to, write_demo_model
from .fakes import FakeGateway
from .test_reconciler import INSTANCE, add, bring_up, engine

GIB = 1024**3
ROOM = Room(usable=8 * GIB, headroom=1 * GIB, process_overhead=0)


def awake(name: str, last_used: float, idle: bool = True, always_on: bool = False, gib: int = 3) -> Resident:
    return Resident(name, gib * GIB, True, always_on, idle, last_used)


# ------------------------------------------------------------------ the pure decisions


def test_a_wake_that_fits_beside_the_awake_puts_nobody_to_sleep() -> None:
    plan = plan_wake(3 * GIB, [awake("a", 1.0), Resident("c", 3 * GIB, False)], ROOM)
    assert plan.fits and plan.evict == ()
    assert plan.numbers["free"] == 4 * GIB and plan.numbers["needed"] == 3 * GIB, "an asleep one counts nothing"


def test_a_wake_puts_the_least_recently_used_idle_tenants_to_sleep_and_only_as_many_as_it_needs() -> None:
    others = [awake("a", 30.0), awake("b", 10.0)]
    plan = plan_wake(3 * GIB, others, ROOM)
    assert plan.fits and plan.evict == ("b",), "b was used longest ago; one is enough"
    assert "putting b to sleep (least recently used) frees 3.0 GiB" in plan.message
    plan = plan_wake(6 * GIB, others, ROOM)
    assert plan.evict == ("b", "a"), "both, the least recently used first"


def test_a_tenant_with_a_request_in_flight_or_always_on_is_never_put_to_sleep() -> None:
    busy, pinned = awake("a", 1.0, idle=False), awake("b", 2.0, always_on=True)
    plan = plan_wake(3 * GIB, [busy, pinned, awake("c", 9.0)], Room(11 * GIB, GIB, 0))
    assert plan.fits and plan.evict == ("c",), "the most recent, since the older two cannot sleep"
    waits = plan_wake(3 * GIB, [busy, pinned], ROOM)
    assert not waits.fits and waits.evict == () and waits.wait, "a serves now, and may sleep once idle"
    assert waits.message == (
        "it needs 3.0 GiB but 1.0 GiB of 7.0 GiB is free beside the 2 tenants awake "
        "(6.0 GiB reserved), and putting every idle one that may sleep to sleep frees only 0 B; "
        "serving requests now: a; always on: b."
    )
    assert waits.numbers == {
        "needed": 3 * GIB,
        "capacity": 7 * GIB,
        "awake_tenants": 2,
        "awake_reserved": 6 * GIB,
        "kept_by_sleepers": 0,
        "free": 1 * GIB,
        "freed_by_sleeping": 0,
        "freed_once_idle": 3 * GIB,
    }
    starting = Resident("s", 3 * GIB, True, idle=False, last_used=0.0, running=False)
    assert "starting or waking: s" in plan_wake(3 * GIB, [starting, pinned], ROOM).message


def test_a_wake_that_can_never_fit_is_refused_with_the_numbers() -> None:
    """Only always-on tenants stand in the way (the host's room shrank beneath them, a larger
    GTM_HEADROOM): no waiting makes room."""
    pinned = [awake("p", 1.0, always_on=True), awake("q", 2.0, always_on=True)]
    refused = plan_wake(3 * GIB, pinned, ROOM)
    assert not refused.fits and not refused.wait and refused.message.endswith("always on: p, q.")


def test_each_engine_holds_its_process_overhead_beside_its_reservation() -> None:
    room = Room(usable=8 * GIB, headroom=GIB, process_overhead=GIB // 2)
    plan = plan_wake(3 * GIB, [awake("a", 1.0)], room)  # 3.5 taken, 3.5 needed, 3.5 free
    assert plan.fits and plan.evict == ()
    assert not plan_wake(3 * GIB + 1, [awake("a", 1.0, idle=False)], room).fits


def test_admission_counts_only_the_always_on_and_for_a_new_always_on_the_largest_sleeper() -> None:
    others = [Resident("a", 3 * GIB, True), Resident("b", 5 * GIB, False), Resident("p", 2 * GIB, True, True)]
    assert counted_beside(others, always_on=False) == (2 * GIB, 1)
    assert counted_beside(others, always_on=True) == (7 * GIB, 2), "b's wake must still fit beside it"
    assert counted_beside([], always_on=True) == (0, 0)


def test_sleepers_in_place_count_what_each_keeps_its_own_figure_once_measured() -> None:
    """nvml: a sleeper keeps its process, CUDA context and graph pools: what NVML measured after
    its last sleep, else the default. The wake counts them; evicting one frees only the rest of it."""
    mib, overhead = 1024**2, 512 * 1024**2
    room = Room(usable=80 * GIB, headroom=1 * GIB, process_overhead=overhead)
    measured, default = 1700 * mib, 2 * GIB
    others = [
        Resident("a", 30 * GIB, True, idle=True, last_used=1.0, kept=default),
        Resident("b", 30 * GIB, True, idle=False, last_used=2.0, kept=default),
        Resident("c", 24 * GIB, False, kept=measured),  # slept in place before: measured
        Resident("d", 24 * GIB, False, kept=default),  # never slept in place yet: the default
    ]
    plan = plan_wake(24 * GIB, others, room)
    assert plan.numbers["kept_by_sleepers"] == measured + default
    assert plan.numbers["free"] == 79 * GIB - 2 * (30 * GIB + overhead) - measured - default
    assert plan.evict == ("a",) and plan.numbers["freed_by_sleeping"] == 30 * GIB + overhead - default
    # admission under overcommit: each that may sleep counts what it keeps; a new always-on one
    # also counts the largest wake (its reservation and process, less what it keeps already)
    assert counted_beside(others, always_on=False, overhead=overhead) == (3 * default + measured, 0)
    largest_wake = 30 * GIB + overhead - default  # a's or b's
    assert counted_beside(others, always_on=True, overhead=overhead) == (3 * default + measured + largest_wake, 0)


# ------------------------------------------------------------------ the sleeper and the reconciler


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Host:
    rec: Reconciler
    store: SqliteStore
    runtime: MemoryRuntime
    clock: Clock
    gateways: FakeGateway
    service: TenantService

    def serving(self, name: str, last: float | None, in_flight: int = 0, waiting: int = 0) -> None:
        self.gateways.activities[f"token-{name}"] = GatewayActivity(
            last_request_at=last, in_flight=in_flight, waiting=waiting, hold=False
        )

    def status(self, name: str) -> TenantStatus:
        return self.store.tenant(name).status


def meminfo(path: Path, total: int) -> Path:
    path.write_text(f"MemTotal: {total // 1024} kB\nMemAvailable: {total // 1024} kB\n")
    return path


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """8 GiB, 1 GiB of headroom: room for two awake tenants of 3 GiB (cpu mode: no per-process overhead)."""
    settings = Settings(
        gpu_mode="cpu", instance=INSTANCE, state_dir=tmp_path, models_dir=tmp_path, overcommit=True, headroom=GIB
    )
    write_demo_model(tmp_path)
    store = SqliteStore(tmp_path / "manager.db")
    runtime, clock, gateways = MemoryRuntime(), Clock(), FakeGateway()
    inventory = HostMemoryInventory(meminfo(tmp_path / "meminfo", 8 * GIB))
    rec = Reconciler(settings, store, runtime, inventory, connect=gateways, clock=clock)
    service = TenantService(settings, store, runtime, inventory, rec, clock=clock)
    world = Host(rec, store, runtime, clock, gateways, service)
    for i, name in enumerate(("a", "b")):
        add(store, name, 30001 + i, 3 * GIB)
        bring_up(rec, runtime, name)
        world.serving(name, clock.now + i)  # b was used last
    add(store, "c", 30003, 3 * GIB)
    walk_to(store, "c", TenantStatus.ASLEEP, "admitted by overcommit")
    rec.reconcile("c")  # its gateway, holding
    runtime.set_health(names.gateway(INSTANCE, "c"), "healthy")
    rec.reconcile("c")
    yield world
    store.close()


def test_a_wake_that_does_not_fit_puts_the_lru_idle_tenant_to_sleep_and_starts_once_its_engine_is_gone(
    host: Host,
) -> None:
    rec, store, runtime = host.rec, host.store, host.runtime
    assert runtime.container(engine("c")) is None, "admitted asleep: no engine until its first request"
    host.serving("c", host.clock.now, waiting=1)
    assert rec.sleeper.tick() == [Turn("a", "evict"), Turn("c", "wake")]
    assert host.status("a") == TenantStatus.ASLEEP and "make room for c's wake" in store.tenant("a").reason
    assert host.status("c") == TenantStatus.WAKING
    assert rec.reconcile("c") is not None and runtime.container(engine("c")) is None
    assert "waiting for the engine of a, put to sleep, to stop" in store.tenant("c").reason
    assert host.status("c") == TenantStatus.WAKING, "still waking, as it waits"
    rec.reconcile("a")  # its gateway holds now, nothing in flight: its engine goes
    assert runtime.container(engine("a")) is None
    bring_up(rec, runtime, "c")
    assert host.status("c") == TenantStatus.RUNNING and runtime.container(engine("c")) is not None
    actions = {(a.tenant, a.action) for a in store.audit_log()}
    assert {("a", "evict"), ("c", "wake"), ("c", "woke")} <= actions
    wake = next(a for a in store.audit_log(tenant="c") if a.action == "wake")
    assert wake.detail["evicted"] == ["a"] and wake.detail["free"] == GIB


def test_the_lru_tenant_is_passed_over_while_it_serves_a_request(host: Host) -> None:
    rec = host.rec
    host.serving("a", host.clock.now - 100, in_flight=1)  # used longest ago, but answering one now
    host.serving("c", host.clock.now, waiting=1)
    assert rec.sleeper.tick() == [Turn("b", "evict"), Turn("c", "wake")]
    assert host.status("a") == TenantStatus.RUNNING


def test_a_wake_waits_for_busy_tenants_and_is_refused_with_the_numbers_when_nothing_may_sleep(host: Host) -> None:
    rec, store, gateways = host.rec, host.store, host.gateways
    host.serving("a", host.clock.now, in_flight=1)
    host.serving("b", host.clock.now, in_flight=2)
    host.serving("c", host.clock.now, waiting=1)
    assert rec.sleeper.tick() == [], "both serve: c's request waits"
    row = store.tenant("c")
    assert row.status == TenantStatus.ASLEEP and row.sleep.wake_refusal == ""
    assert (
        row.reason.startswith("waking once there is room: it needs 3.0 GiB")
        and "serving requests now: a, b" in row.reason
    )
    host.serving("b", host.clock.now, in_flight=0)  # b's requests are answered: it is put to sleep for c
    assert rec.sleeper.tick() == [Turn("b", "evict"), Turn("c", "wake")]
    assert host.status("a") == TenantStatus.RUNNING
    # a and c always on (the store says so: admission refuses to pin what breaks a wake), b's
    # request: nothing may sleep, ever, so it is refused at once with the numbers
    rec.reconcile("b")
    bring_up(rec, host.runtime, "c")
    for name in ("a", "c"):
        with store.transaction() as db:
            store.update_spec(db, store.tenant(name).spec.with_changes(always_on=True))
    host.serving("b", host.clock.now, waiting=1)
    assert rec.sleeper.tick() == []
    refusal = store.tenant("b").sleep.wake_refusal
    assert refusal.startswith("it needs 3.0 GiB but 1.0 GiB of 7.0 GiB") and refusal.endswith("always on: a, c.")
    rec.reconcile("b")
    assert gateways.configs["token-b"].hold_refusal == refusal, "its held requests get it in a 503"
    refused = [a for a in store.audit_log(tenant="b") if a.action == "wake"]
    assert refused[0].result == "refused" and refused[0].detail["free"] == GIB
    # the request got its 503 and left; once a may sleep again, the refusal is lifted
    host.serving("b", host.clock.now, waiting=0)
    assert rec.sleeper.tick() == [] and store.tenant("b").sleep.wake_refusal
    with store.transaction() as db:
        store.update_spec(db, store.tenant("a").spec.with_changes(always_on=False))
    assert rec.sleeper.tick() == [] and store.tenant("b").sleep.wake_refusal == "", "room again"
    rec.reconcile("b")
    assert gateways.configs["token-b"].hold_refusal == "" and gateways.configs["token-b"].hold
    assert host.status("b") == TenantStatus.ASLEEP, "it wakes at its next request, not before"


def test_an_always_on_tenant_found_asleep_wakes_at_once_and_is_never_put_to_sleep(host: Host) -> None:
    rec, store = host.rec, host.store
    host.service.update("c", "admin", always_on=True)
    assert rec.sleeper.tick() == [Turn("a", "evict"), Turn("c", "wake")]
    rec.reconcile("a")
    bring_up(rec, host.runtime, "c")
    host.serving("c", host.clock.now - 1000)  # c idle the longest: a's wake must pass it over
    host.serving("a", host.clock.now, waiting=1)
    assert rec.sleeper.tick() == [Turn("b", "evict"), Turn("a", "wake")]
    assert store.tenant("c").status == TenantStatus.RUNNING


# ------------------------------------------------------------------ admission


def spec(name: str, port: int, gib: int, **more: object) -> TenantSpec:
    return TenantSpec(name=name, port=port, gpu_memory=gib * GIB, model="demo", max_model_len=512, **more)  # type: ignore[arg-type]


def test_admission_says_whether_a_tenant_fits_awake_now_or_only_by_overcommit(host: Host) -> None:
    svc, store = host.service, host.store
    created = svc.create(spec("dee", 30004, 3), "admin")
    assert created.decision.by_overcommit and created.decision.messages[0].startswith("fits only by overcommit")
    assert created.tenant.status == TenantStatus.ASLEEP, "it starts on its first request"
    assert [r.event.value for r in store.reservations() if r.tenant == "dee"] == ["add", "sleep"]
    pinned = svc.create(spec("pin", 30005, 3, always_on=True), "admin")
    assert pinned.decision.by_overcommit, "3G pinned beside the largest sleeper's 3G of 7G"
    with pytest.raises(AdmissionRefused) as refused:
        svc.create(spec("que", 30006, 2, always_on=True), "admin")
    message = refused.value.message
    assert "even with every tenant that may sleep asleep (overcommit):" in message
    assert "reserved by others 6.0 GiB" in message, "pin's 3 GiB and the largest sleeper's 3 GiB"
    assert store.sleep_tenant("b", host.clock.now, {})  # b goes to sleep when idle: 3 GiB free awake
    awake_now = svc.create(spec("eve", 30007, 3, quotas=Quotas(rpm_limit=5)), "admin")
    assert awake_now.decision.messages[0] == "fits awake now" and not awake_now.decision.by_overcommit
    assert awake_now.tenant.status == TenantStatus.PENDING, "it starts now"


def test_without_overcommit_every_reservation_counts_as_before(tmp_path: Path) -> None:
    settings = Settings(gpu_mode="cpu", instance=INSTANCE, state_dir=tmp_path, models_dir=tmp_path, headroom=GIB)
    write_demo_model(tmp_path)
    store = SqliteStore(tmp_path / "manager.db")
    runtime = MemoryRuntime()
    inventory = HostMemoryInventory(meminfo(tmp_path / "meminfo", 8 * GIB))
    rec = Reconciler(settings, store, runtime, inventory, connect=FakeGateway())
    svc = TenantService(settings, store, runtime, inventory, rec)
    try:
        svc.create(spec("aa", 30001, 3), "admin")
        svc.create(spec("bb", 30002, 3, idle_sleep_s=60.0), "admin")
        with pytest.raises(AdmissionRefused):
            svc.create(spec("cc", 30003, 3), "admin")
    finally:
        store.close()


def test_room_that_comes_free_goes_to_the_tenant_whose_request_waited_longest(host: Host) -> None:
    """Two sleepers wait behind busy tenants; when one awake tenant is idle again, the sleeper whose
    request came first wakes, whatever their names."""
    rec, store = host.rec, host.store
    add(store, "d", 30004, 3 * GIB)
    walk_to(store, "d", TenantStatus.ASLEEP, "admitted by overcommit")
    rec.reconcile("d")
    host.runtime.set_health(names.gateway(INSTANCE, "d"), "healthy")
    rec.reconcile("d")
    host.serving("a", host.clock.now, in_flight=1)
    host.serving("b", host.clock.now, in_flight=1)
    now = host.clock.now
    for name, since in (("c", now - 5), ("d", now - 20)):  # d's request came first
        host.gateways.activities[f"token-{name}"] = GatewayActivity(
            last_request_at=since, in_flight=0, waiting=1, hold=True, waiting_since=since
        )
    assert rec.sleeper.tick() == [], "both wait"
    host.serving("b", now, in_flight=0)
    assert rec.sleeper.tick() == [Turn("b", "evict"), Turn("d", "wake")]
    assert store.tenant("c").status == TenantStatus.ASLEEP and "waking once there is room" in store.tenant("c").reason
