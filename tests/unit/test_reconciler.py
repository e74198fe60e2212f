"""The reconciler against the in-memory runtime (the same promises as Docker, checked by
the runtime contract), a fake gateway admin port and a clock the test moves: every case
runs in milliseconds. The same behaviour on real Docker and real engines is covered by
tests/integration/test_control_plane.py and test_dockerd_restart.py."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from manager import keys, names
from manager.control.reconciler import EVENTS_RETRY_S, Reconciler
from manager.control.records import KeyRow
from manager.control.sqlite_store import SqliteStore
from manager.control.store import Tx
from manager.domain import TenantSpec, TenantStatus, can_transition
from manager.gpu.cpu import HostMemoryInventory
from manager.names import Role
from manager.runtime.memory import MemoryRuntime
from manager.runtime.types import NetworkPlan
from manager.settings import Settings

from .conftest import walk_to, write_demo_model
from .fakes import FakeGateway, usage_record

MIB = 1024**2
INSTANCE = "gtmu"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Reconciler, SqliteStore, MemoryRuntime, Clock, FakeGateway]]:
    settings = Settings(
        gpu_mode="cpu",
        instance=INSTANCE,
        state_dir=tmp_path,
        models_dir=tmp_path,
        orphan_grace_s=300.0,
        engine_start_timeout_s=600.0,
    )
    write_demo_model(tmp_path)
    store = SqliteStore(tmp_path / "manager.db")
    runtime, clock, gateways = MemoryRuntime(), Clock(), FakeGateway()
    rec = Reconciler(settings, store, runtime, HostMemoryInventory(), connect=gateways, clock=clock)
    yield rec, store, runtime, clock, gateways
    store.close()


def add(store: SqliteStore, name: str, port: int, gpu_memory: int = 1536 * MIB) -> None:
    spec = TenantSpec(name=name, port=port, gpu_memory=gpu_memory, model="demo", max_model_len=512)
    issued = keys.issue()
    with store.transaction() as db:
        store.insert_tenant(db, spec, gateway_token=f"token-{name}")
        store.insert_key(db, KeyRow(issued.id, name, keys.PREFIX, issued.hash, 0.0, None, None))


def engine(name: str) -> str:
    return names.engine(INSTANCE, name)


def gateway(name: str) -> str:
    return names.gateway(INSTANCE, name)


def bring_up(rec: Reconciler, runtime: MemoryRuntime, name: str) -> None:
    """What Docker does on its own while an engine starts: both health checks pass."""
    rec.reconcile(name)
    runtime.set_health(engine(name), "healthy")
    runtime.set_health(gateway(name), "healthy")
    rec.reconcile(name)


def status(store: SqliteStore, name: str) -> TenantStatus:
    return store.tenant(name).status


def test_a_new_tenant_gets_its_containers_and_runs(world) -> None:
    rec, store, runtime, _, gateways = world
    add(store, "acme", 30001)
    rec.reconcile("acme")
    assert status(store, "acme") == TenantStatus.STARTING
    assert {c.role for c in runtime.containers(names.selector(INSTANCE, tenant="acme"))} == {"engine", "gateway"}
    runtime.set_health(engine("acme"), "healthy")
    runtime.set_health(gateway("acme"), "healthy")
    assert rec.reconcile("acme") is None
    assert status(store, "acme") == TenantStatus.RUNNING
    assert len(gateways.configs["token-acme"].keys) == 1  # the key hash reached the gateway


def test_a_spec_change_replaces_the_engine_and_keeps_the_gateway(world) -> None:
    rec, store, runtime, _, _ = world
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    before_engine, before_gw = runtime.container(engine("acme")), runtime.container(gateway("acme"))
    with store.transaction() as db:
        store.update_spec(db, store.tenant("acme").spec.with_changes(gpu_memory=2048 * MIB))
    rec.reconcile("acme")
    after_engine, after_gw = runtime.container(engine("acme")), runtime.container(gateway("acme"))
    assert after_engine is not None and before_engine is not None and after_gw is not None
    assert after_engine.id != before_engine.id and after_engine.spec_hash != before_engine.spec_hash
    assert before_gw is not None and after_gw.id == before_gw.id
    assert status(store, "acme") == TenantStatus.STARTING


def test_an_exit_backs_off_then_restarts_with_the_engines_own_reason(world) -> None:
    rec, store, runtime, clock, _ = world
    add(store, "acme", 30001)
    rec.reconcile("acme")  # an engine that never came up (one that served is replaced at once)
    runtime.exit(engine("acme"), 1, logs="INFO loading\nValueError: bad config.json\n")
    first_id = runtime.container(engine("acme")).id  # type: ignore[union-attr]
    delay = rec.reconcile("acme")
    row = store.tenant("acme")
    assert row.status == TenantStatus.FAILED and row.reason == "ValueError: bad config.json"
    assert delay == pytest.approx(10.0)
    assert runtime.container(engine("acme")).id == first_id  # type: ignore[union-attr]  # kept for its logs
    clock.now += 5
    rec.reconcile("acme")
    assert runtime.container(engine("acme")).id == first_id  # type: ignore[union-attr]  # still backing off
    clock.now += 5
    rec.reconcile("acme")
    assert runtime.container(engine("acme")).id != first_id  # type: ignore[union-attr]
    assert status(store, "acme") == TenantStatus.STARTING
    assert store.tenant("acme").reason == "engine restarted after it failed: ValueError: bad config.json"
    runtime.exit(engine("acme"), 1, logs="ValueError: bad config.json\n")
    assert rec.reconcile("acme") == pytest.approx(20.0)  # doubled
    assert "ValueError" in store.engine_failure("acme").log  # type: ignore[union-attr]


def test_usage_served_before_an_engine_failed_is_collected_while_it_is_down(world) -> None:
    rec, store, runtime, _, gateways = world
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    gateways.records["token-acme"] = [(1, usage_record("cut", completion_tokens=5, status=200, outcome="cut"))]
    runtime.exit(engine("acme"), 137)
    rec.reconcile("acme")
    assert status(store, "acme") != TenantStatus.RUNNING  # noticed (and replaced) before the collector's next round
    rec.collector.collect_all()
    assert store.usage_totals("acme", 0).tokens == 6


def test_engines_start_one_at_a_time(world) -> None:
    rec, store, runtime, _, _ = world
    add(store, "a", 30001)
    add(store, "b", 30002)
    rec.reconcile("a")
    rec.reconcile("b")
    assert runtime.container(engine("b")) is None
    assert store.tenant("b").status == TenantStatus.PENDING and "waiting for a" in store.tenant("b").reason
    runtime.set_health(engine("a"), "healthy")
    rec.reconcile("a")
    rec.reconcile("b")
    assert runtime.container(engine("b")) is not None
    assert [n for n in runtime.started if n.endswith("-engine")] == [engine("a"), engine("b")]


def test_orphans_survive_their_grace_period_then_go(world) -> None:
    rec, store, runtime, clock, _ = world
    add(store, "ghost", 30001)
    bring_up(rec, runtime, "ghost")
    store.delete_tenant("ghost")  # as if another manager's database forgot it
    delay = rec.reconcile("ghost")
    assert delay == pytest.approx(300.0)
    assert runtime.container(engine("ghost")) is not None
    clock.now += 299
    rec.reconcile("ghost")
    assert runtime.container(engine("ghost")) is not None
    clock.now += 1
    assert rec.reconcile("ghost") is None
    assert runtime.containers(names.selector(INSTANCE, tenant="ghost")) == []
    assert runtime.networks(names.selector(INSTANCE, tenant="ghost")) == []
    assert runtime.volumes(names.selector(INSTANCE, tenant="ghost")) == []


def test_resync_queues_orphans_instead_of_removing_them_itself(world) -> None:
    rec, _, runtime, _, _ = world
    runtime.ensure_network(NetworkPlan(names.network(INSTANCE, "stray"), names.labels(INSTANCE, Role.NETWORK, "stray")))
    rec.resync()
    assert "stray" in rec.queue.pending()
    assert runtime.networks(names.selector(INSTANCE, tenant="stray")) != []


def test_removal_collects_the_last_usage_and_tears_everything_down(world) -> None:
    rec, store, runtime, _, gateways = world
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    gateways.records["token-acme"] = [
        (
            1,
            usage_record("r1", prompt_tokens=3, completion_tokens=4),
        )
    ]
    walk_to(store, "acme", TenantStatus.REMOVING)
    assert rec.reconcile("acme") is None
    assert store.find_tenant("acme") is None
    assert store.usage_totals("acme", 0).tokens == 7
    sel = names.selector(INSTANCE, tenant="acme")
    assert runtime.containers(sel) == [] and runtime.networks(sel) == [] and runtime.volumes(sel) == []


def test_a_manager_restart_in_the_middle_of_a_start_converges(world, tmp_path: Path) -> None:
    rec, store, runtime, clock, gateways = world
    add(store, "a", 30001)
    add(store, "b", 30002)
    rec.reconcile("a")  # a's engine is starting when the manager goes away
    again = Reconciler(rec.settings, store, runtime, rec.inventory, connect=gateways, clock=clock)
    again.reconcile("a")  # takes the start gate back: no second engine for a, none for b yet
    again.reconcile("b")
    assert [n for n in runtime.started if n.endswith("-engine")] == [engine("a")]
    runtime.set_health(engine("a"), "healthy")
    runtime.set_health(gateway("a"), "healthy")
    again.reconcile("a")
    again.reconcile("b")
    assert status(store, "a") == TenantStatus.RUNNING
    assert [n for n in runtime.started if n.endswith("-engine")] == [engine("a"), engine("b")]


def test_backoff_survives_a_manager_restart(world) -> None:
    rec, store, runtime, clock, gateways = world
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    for _ in range(3):  # three failures in a row: the next retry is 40 s away
        runtime.exit(engine("acme"), 1, logs="RuntimeError: boom\n")
        rec.reconcile("acme")
        clock.now += 100
        rec.reconcile("acme")
    runtime.exit(engine("acme"), 1, logs="RuntimeError: boom\n")
    rec.reconcile("acme")
    again = Reconciler(rec.settings, store, runtime, rec.inventory, connect=gateways, clock=clock)
    assert again.reconcile("acme") == pytest.approx(80.0)


def test_status_transitions_follow_the_diagram(world) -> None:
    rec, store, runtime, clock, _ = world
    seen: list[TenantStatus] = []
    original = store.set_status

    def record(tx: Tx, name: str, new: TenantStatus, reason: str = "") -> bool:
        seen.append(new)
        return original(tx, name, new, reason)

    store.set_status = record  # type: ignore[method-assign]
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    runtime.exit(engine("acme"), 1, logs="RuntimeError: boom\n")
    rec.reconcile("acme")
    clock.now += 10
    bring_up(rec, runtime, "acme")
    with store.transaction() as db:
        store.update_spec(db, store.tenant("acme").spec.with_changes(gpu_memory=2048 * MIB))
    bring_up(rec, runtime, "acme")
    path = [TenantStatus.PENDING, *seen]
    assert all(can_transition(a, b) for a, b in itertools.pairwise(path)), path
    assert seen[-1] == TenantStatus.RUNNING and TenantStatus.FAILED in seen


def test_the_loops_survive_any_exception(world) -> None:
    rec, _, _, _, _ = world
    calls = 0
    done = threading.Event()

    def step() -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            done.set()
        raise ValueError("a bug")

    thread = threading.Thread(target=rec._every, args=("resync", 0.01, step), daemon=True)
    thread.start()
    assert done.wait(5)
    rec._stop.set()
    thread.join(5)
    assert rec.loop_errors["resync"] >= 3


def test_the_page_cache_is_warmed_once_before_the_first_engine_and_after_a_cold_start(world) -> None:
    rec, store, runtime, clock, _ = world
    add(store, "a", 30001)
    add(store, "b", 30002)
    bring_up(rec, runtime, "a")
    bring_up(rec, runtime, "b")
    warmup = names.warmup(INSTANCE)
    warmups = lambda: [c for c in runtime.completed if c == warmup]  # noqa: E731
    assert warmups() == [warmup]  # once for the image and model, before a's engine
    assert runtime.started.index(engine("a")) >= 0
    runtime.exit(
        engine("b"),
        1,
        logs="ValueError: Available memory on node 0 (0.1/1.5 GiB) on kv cache "
        "allocation is less than requested memory for kv (0.38 GiB).\n",
    )
    rec.reconcile("b")
    clock.now += 10
    rec.reconcile("b")
    assert warmups() == [warmup, warmup]  # warmed again before the retry


def test_a_long_warm_up_never_holds_up_other_tenants_key_changes(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold 7B model takes tens of seconds to read: meanwhile a revoked key must still reach its
    gateway within seconds, so the read runs off the worker's thread."""
    import manager.control.warmup as warmup_module

    rec, store, runtime, _, gateways = world
    add(store, "a", 30001)
    bring_up(rec, runtime, "a")  # its model is warm
    shutil.copytree(rec.settings.models_dir / "demo", rec.settings.models_dir / "other")
    spec = TenantSpec(name="b", port=30002, gpu_memory=1536 * MIB, model="other", max_model_len=512)
    with store.transaction() as db:
        store.insert_tenant(db, spec, gateway_token="token-b")
    monkeypatch.setattr(warmup_module, "WARMUP_WAIT_S", 0.05)
    release = threading.Event()
    finish = runtime.run_to_completion

    def slow_read(plan, timeout_s):  # type: ignore[no-untyped-def]
        assert release.wait(10)
        return finish(plan, timeout_s)

    monkeypatch.setattr(runtime, "run_to_completion", slow_read)
    rec.reconcile("b")
    assert runtime.container(engine("b")) is None
    assert store.tenant("b").reason == "reading the engine image and model into the page cache"
    monkeypatch.setattr(warmup_module, "WARMUP_WAIT_S", 60.0)
    began = time.monotonic()
    rec.reconcile("b")  # its next turn only looks whether the warm-up has ended
    assert time.monotonic() - began < 30, "a later turn never waits on the warm-up"

    issued = keys.issue()  # a's new key, pushed while b's warm-up still reads
    with store.transaction() as db:
        store.insert_key(db, KeyRow(issued.id, "a", keys.PREFIX, issued.hash, 0.0, None, None))
    rec.reconcile("a")
    assert len(gateways.configs["token-a"].keys) == 2

    assert "b" not in rec.queue.pending()
    release.set()
    rec.warmer.warming[(rec.settings.engine_image, "other", "")].join(5)
    assert "b" in rec.queue.pending(), "queued again the moment its warm-up ended"
    rec.reconcile("b")
    assert runtime.container(engine("b")) is not None
    assert runtime.completed.count(names.warmup(INSTANCE)) == 2  # a's model once, b's once


def test_a_failing_warm_up_never_blocks_a_start(world) -> None:
    rec, store, runtime, _, _ = world
    runtime.fail_next(names.warmup(INSTANCE), "no such image")
    add(store, "a", 30001)
    rec.reconcile("a")
    assert runtime.container(engine("a")) is not None


def test_a_rebuilt_image_replaces_the_containers_made_from_it(world) -> None:
    """A rebuilt manager image (new gateway code, security fixes) under the same tag must reach
    running gateways; a rebuilt engine image, running engines. Nothing else is touched."""
    rec, store, runtime, _, _ = world
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    engine_id = runtime.container(engine("acme")).id  # type: ignore[union-attr]
    gateway_id = runtime.container(gateway("acme")).id  # type: ignore[union-attr]
    rec.reconcile("acme")
    assert runtime.container(gateway("acme")).id == gateway_id  # type: ignore[union-attr]  # same image: kept

    runtime.set_image(rec.settings.manager_image, "sha256:rebuilt-manager")
    rec.reconcile("acme")
    assert runtime.container(gateway("acme")).id != gateway_id  # type: ignore[union-attr]
    assert runtime.container(engine("acme")).id == engine_id  # type: ignore[union-attr]

    runtime.set_image(rec.settings.engine_image, "sha256:rebuilt-engine")
    rec.reconcile("acme")
    assert runtime.container(engine("acme")).id != engine_id  # type: ignore[union-attr]


def test_a_dead_engine_or_gateway_is_replaced_from_the_runtimes_events(world) -> None:
    """With the resync an hour away, the events alone bring a killed engine (that had served) and
    a killed gateway back at once; after the event stream breaks it is followed again."""
    rec, store, runtime, _, _ = world
    rec.settings = rec.settings.model_copy(update={"reconcile_interval_s": 3600.0, "usage_interval_s": 3600.0})
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    assert status(store, "acme") == TenantStatus.RUNNING
    rec.start()
    try:
        engines_before = runtime.started.count(engine("acme"))
        runtime.exit(engine("acme"), 137, oom_killed=True)
        wait_until(lambda: runtime.started.count(engine("acme")) == engines_before + 1, "the engine replaced")
        assert "out-of-memory" in store.tenant("acme").reason  # why it died, from Docker's state
        assert store.tenant("acme").status == TenantStatus.STARTING

        gateways_before = runtime.started.count(gateway("acme"))
        runtime.stop_container(gateway("acme"))  # docker kill: no restart policy brings it back
        wait_until(lambda: runtime.started.count(gateway("acme")) == gateways_before + 1, "the gateway replaced")

        runtime.go_away()  # dockerd restarts: the stream breaks, and is opened again once it answers
        runtime.available = True
        wait_until(lambda: rec.loop_errors["events"] >= 1, "the broken stream noticed")
        time.sleep(EVENTS_RETRY_S + 0.5)
        gateways_before = runtime.started.count(gateway("acme"))
        runtime.stop_container(gateway("acme"))
        wait_until(lambda: runtime.started.count(gateway("acme")) == gateways_before + 1, "the gateway replaced")
    finally:
        rec.stop()


def test_an_engine_that_never_served_still_backs_off(world) -> None:
    rec, store, runtime, _, _ = world
    add(store, "acme", 30001)
    rec.reconcile("acme")
    runtime.exit(engine("acme"), 1, logs="RuntimeError: boom\n")
    assert rec.reconcile("acme") == pytest.approx(10.0)  # a crash at start waits its backoff


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_after_a_resync_the_most_recently_used_tenant_starts_first(world) -> None:
    """Engines start one at a time: after a dockerd restart or a host boot every tenant needs one,
    and the one whose clients were served last gets the start gate first."""
    rec, store, runtime, _, _ = world
    for i, name in enumerate(("idle", "busy", "never")):
        add(store, name, 30001 + i)
    store.add_usage("idle", [usage_record("r1", at=1000.0)], cursor=1)
    store.add_usage("busy", [usage_record("r2", at=5000.0)], cursor=1)
    rec.resync()
    due = rec.queue.pending()
    assert sorted(due, key=lambda n: due[n]) == ["busy", "idle", "never"]
    first = rec.queue.get(timeout=0)
    assert first == "busy"
    rec.reconcile(first)
    assert engine("busy") in runtime.started and engine("idle") not in runtime.started


def test_an_engine_that_ran_is_replaced_at_once_also_by_a_restarted_manager(world) -> None:
    """dockerd restarted with the manager: its engines stopped while no manager watched, and the
    new manager process never saw them healthy; the store says they ran, so they start at once."""
    rec, store, runtime, clock, gateways = world
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    runtime.exit(engine("acme"), 143)
    restarted = Reconciler(rec.settings, store, runtime, HostMemoryInventory(), connect=gateways, clock=clock)
    before = runtime.started.count(engine("acme"))
    restarted.reconcile("acme")
    assert runtime.started.count(engine("acme")) == before + 1  # no 10 s backoff


def test_a_gateway_still_starting_is_collected_in_a_later_round_without_a_warning(world, caplog) -> None:
    """A gateway just started (or restarted) answers nothing until its health check passes; the
    usage loop leaves it for its next round, its records waiting in its spool, and says nothing."""
    rec, store, runtime, _, gateways = world
    add(store, "acme", 30001)
    bring_up(rec, runtime, "acme")
    gateways.records["token-acme"] = [(1, usage_record("r1", completion_tokens=5, status=200))]
    runtime.set_health(names.gateway(INSTANCE, "acme"), "starting")
    with caplog.at_level("WARNING"):
        rec.collector.collect_all()
    assert store.usage_totals("acme", 0).tokens == 0 and "not collected" not in caplog.text
    runtime.set_health(names.gateway(INSTANCE, "acme"), "healthy")
    rec.collector.collect_all()
    assert store.usage_totals("acme", 0).tokens == 6
