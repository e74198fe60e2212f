"""The reconciler: level-triggered, one tenant at a time, converging Docker to SQLite.

For a tenant key it reads the desired state (the tenant's row) and the actual
state (containers, network, volume found by label), diffs and acts. It runs on
start-up, after every change (``enqueue``) and on a periodic resync. Every change
to a tenant's containers happens in that tenant's turn on the queue: labelled
resources of no known tenant (orphans) are queued too, and removed in their turn
once they have been seen for ``orphan_grace_s``.

Three threads: the worker (the queue), the resync loop (queues every tenant that
is desired or present), and the usage loop (collects usage from running gateways
every ``usage_interval_s``, so a slow gateway never delays an engine start). The
loops survive any exception; each one is logged and counted (``loop_errors``).
The page-cache warm-up before an engine's first start runs on a short-lived thread
of its own, so a long read never holds up another tenant's key changes.

Engines start one at a time on each device (the *start gate*, one per device):
vLLM measures the free memory of its own device when it starts, and two engines
profiling at once on one device can both fail. The next engine on that device
waits until the previous one is healthy, has failed, or timed out; engines on
other devices start meanwhile. On a GPU, sleeping or waking an engine waits for
its device's gate too, and removing or replacing one waits for every device's
(a replaced or removed engine may run on another device than its tenant's row
names, after a move): vLLM
asserts that free memory did not grow while it profiled, so memory freed
meanwhile fails that start.

Each tenant's engine runs on the device admission placed it on (its row's
``device``); a tenant whose device is gone from the host fails with that reason
until the admin moves it (``update-tenant --gpu``). On a swarm a device that is
gone is usually its node, lost: after ``node_loss_grace_s`` the tenant is placed
again where it fits (``place_again``, the service's admission).

Status writes never enqueue work, so the reconciler never re-triggers itself.
A failing engine is restarted with exponential backoff (10 s doubling to 5 min),
kept in the database so that a restart of the manager does not reset it; an
error talking to Docker backs the key off (1 s doubling to 60 s).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from manager import names
from manager.control.collector import UsageCollector
from manager.control.drains import SpoolDrainer
from manager.control.engine_logs import (
    COLD_CACHE,
    LOG_KEEP_CHARS,
    LOG_TAIL_LINES,
    START_LOG_LINES,
    available_kv_cache,
    failure_reason,
)
from manager.control.gateway_client import Connect, GatewayAdmin, GatewayClient, gateway_ip, push_config
from manager.control.parsers import engine_parsers
from manager.control.plan import (
    ENGINE_UID,
    TenantPlan,
    control_network_plan,
    docker_words,
    move_plan,
    mps_daemon_plan,
    port_taken,
    prepare_plan,
    tenant_plan,
)
from manager.control.records import EngineFailure, TenantRow
from manager.control.sizing import Sizing
from manager.control.sleeper import Sleeper
from manager.control.store import TenantStore
from manager.control.vault import MOVED, Vault, open_volumes
from manager.control.warmup import PageCacheWarmer
from manager.control.workqueue import WorkQueue
from manager.domain import TenantStatus
from manager.errors import AdmissionRefused, GtmError, InvalidInput, RuntimeUnavailable
from manager.gpu import DeviceMemory, Inventory, placed_on
from manager.names import Role
from manager.platform import gpu_memory_utilization
from manager.runtime.protocol import EventStream, Runtime
from manager.runtime.types import ContainerPlan, ContainerState
from manager.settings import Settings
from manager.sizes import format_size
from manager.volumes.protocol import EncryptedVolumes

log = logging.getLogger(__name__)
POLL_STARTING_S = 2.0
NO_ROOM_RETRY_S = 30.0
"""A tenant whose node was lost and that fits on no other node is placed again this often."""
EVENTS_RETRY_S = 1.0
"""Pause before following the runtime's events again after their stream broke."""
FOLLOWED = frozenset({"die", "oom", "health_status"})
"""The container events that may change what a tenant needs (``RuntimeEvent.action``)."""
PREPARE_TIMEOUT_S = 60.0
MOVE_TIMEOUT_S = 3600.0
"""Copying a tenant's Docker volume into its encrypted volume (caches: gigabytes at most)."""
DRAIN_POLL_S = 0.5
"""How often a tenant going to sleep asks its gateway whether a request is still in flight."""
WAKING_STEPS = frozenset({TenantStatus.PENDING, TenantStatus.STARTING})
"""What a waking tenant's engine start goes through: it stays ``waking`` (its gateway holds requests)."""


def backoff(failures: int, base: float, cap: float) -> float:
    return float(min(cap, base * 2 ** max(0, failures - 1)))


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        store: TenantStore,
        runtime: Runtime,
        inventory: Inventory,
        *,
        connect: Connect = GatewayClient,
        clock: Callable[[], float] = time.time,
        volumes: EncryptedVolumes | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.inventory = inventory
        self.sizing = Sizing(settings, store.engine_overhead)
        self.connect = connect
        self.clock = clock
        self.queue = WorkQueue()
        self.loop_errors: Counter[str] = Counter()
        """Exceptions per loop (worker, resync, usage), exported as a metric."""
        self._gates: dict[str, tuple[str, float]] = {}
        """device ('' for the host's first) -> the tenant whose engine holds its start gate, since when."""
        self._gate_waiters: dict[str, set[str]] = {}
        """device -> the tenants that found its start gate held."""
        self._errors: dict[str, int] = {}
        self._orphans_seen: dict[str, float] = {}
        self._lost_since: dict[str, float] = {}
        """On a swarm: tenants whose node went unreported, since when (``_node_lost``)."""
        self.place_again: Callable[[str, str], str] | None = None
        """On a swarm, the service's admission for a tenant whose node was lost: places it where it
        fits (given the lost node its gateway was on, '' when none) and returns where (raises
        ``AdmissionRefused`` when nowhere); None on one host."""
        self.drainer: SpoolDrainer | None = None
        """On a swarm, what reads the spools of gateways left on lost nodes once they are back."""
        self.vault = Vault(settings, store, volumes or open_volumes(settings), clock=clock)
        self.warmer = PageCacheWarmer(settings, runtime)
        self.collector = UsageCollector(settings, store, runtime, connect)
        self.sleeper = Sleeper(settings, store, runtime, connect, self.enqueue, inventory, clock)
        self.wake_times: list[float] = []
        """Seconds each wake of this process took, from the request that found its tenant asleep
        to its engine serving (exported as p50/p99)."""
        self._prepared: dict[str, str] = {}
        """Tenants whose volume this manager process gave to the engine's user (``plan.prepare_plan``),
        with the swarm node it is on ('' on one host)."""
        self._served: set[str] = set()
        """Engine containers (by ID) seen healthy: one that dies after serving is replaced at once."""
        self._events: EventStream | None = None
        self._restarted: dict[str, str] = {}
        """Why a tenant's engine was restarted, shown as its reason until the new one serves."""
        self._turns: dict[str, threading.Lock] = {}
        self._turns_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._stop.clear()
        problem = self.vault.problem()
        if problem is None:
            log.info("encrypted volumes (%s) can be made here", self.vault.volumes.mechanism)
        else:
            log.warning("encrypted volumes cannot be made or opened here: %s", problem)
        self._threads = [
            threading.Thread(target=self._work, name="reconcile-worker", daemon=True),
            threading.Thread(
                target=self._every,
                args=("resync", self.settings.reconcile_interval_s, self.resync),
                name="reconcile-resync",
                daemon=True,
            ),
            threading.Thread(
                target=self._every,
                args=("usage", self.settings.usage_interval_s, self.collect_usage),
                name="usage-collector",
                daemon=True,
            ),
            threading.Thread(
                target=self._every,
                args=("sleep", self.settings.sleep_check_s, self.sleeper.tick),
                name="sleeper",
                daemon=True,
            ),
            threading.Thread(target=self._follow_events, name="runtime-events", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        events = self._events
        if events is not None:
            events.close()
        for t in self._threads:
            t.join(timeout=10)

    def enqueue(self, tenant: str, delay: float = 0.0) -> None:
        self.queue.add(tenant, delay)

    def resync(self) -> None:
        """Queue every tenant that is desired or actually present (orphans are removed in their turn),
        the most recently used first: after a dockerd restart or a host boot every engine needs a
        start, they start one at a time, and the one whose clients were served last goes first."""
        self.sweep_mps_daemons()
        desired = {row.spec.name for row in self.store.tenants()}
        last = self.store.last_used()
        for name in sorted(desired | self._actual_tenants(), key=lambda n: (-last.get(n, 0.0), n)):
            self.queue.add(name)

    def _follow_events(self) -> None:
        """Queues a tenant the moment Docker reports that its engine or gateway died, was OOM-killed
        or changed health, so a dead one is replaced in seconds rather than at the next
        resync (which stays, as the safety net). After the stream breaks (dockerd restarted) it
        opens a new one and resyncs, for what happened in between."""
        selector = names.selector(self.settings.instance)
        while not self._stop.is_set():
            try:
                stream = self.runtime.events(selector)
            except GtmError as exc:
                self.loop_errors["events"] += 1
                log.warning("following the runtime's events: %s", exc.message)
                self._stop.wait(EVENTS_RETRY_S)
                continue
            self._events = stream
            if self._stop.is_set():
                stream.close()
                return
            self.resync()
            try:
                for event in stream:
                    # a tenant whose last turn failed waits out its backoff: its own containers'
                    # events (a start that failed leaves a created one behind) must not spin it
                    followed = event.role in (Role.ENGINE, Role.GATEWAY) and event.action in FOLLOWED
                    if event.tenant and followed and event.tenant not in self._errors:
                        self.queue.add(event.tenant)
            except GtmError as exc:
                self.loop_errors["events"] += 1
                log.warning("the runtime's event stream broke: %s", exc.message)
            finally:
                stream.close()
            self._stop.wait(EVENTS_RETRY_S)

    def _work(self) -> None:
        while not self._stop.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            try:
                delay = self.reconcile(key)
                self._errors.pop(key, None)
            except GtmError as exc:
                delay = self._error_backoff(key, exc.message)
            except Exception as exc:  # a bug must not stop the worker; it is logged with its traceback
                log.exception("reconcile of %s failed unexpectedly", key)
                self.loop_errors["worker"] += 1
                delay = self._error_backoff(key, f"internal error: {exc!r}")
            if delay is not None:
                self.queue.add(key, delay)

    def _error_backoff(self, key: str, message: str) -> float:
        n = self._errors[key] = self._errors.get(key, 0) + 1
        log.warning("reconcile of %s failed (%d): %s", key, n, message)
        return backoff(n, 1.0, 60.0)

    def collect_usage(self) -> None:
        """Every gateway's new records; then, on a swarm, spools left on nodes that are back."""
        self.collector.collect_all()
        if self.drainer is not None:
            self.drainer.tick()

    def _every(self, loop: str, interval: float, step: Callable[[], None]) -> None:
        """Runs ``step`` every ``interval`` seconds until stopped; no exception ends the loop."""
        while not self._stop.is_set():
            try:
                step()
            except GtmError as exc:
                self.loop_errors[loop] += 1
                log.warning("%s failed: %s", loop, exc.message)
            except Exception:
                self.loop_errors[loop] += 1
                log.exception("%s failed unexpectedly", loop)
            self._stop.wait(interval)

    # ---------------------------------------------------------------- one tenant
    @contextmanager
    def tenant_turn(self, name: str) -> Iterator[None]:
        """Held while a tenant is reconciled, the only time its containers are made: what must not
        overlap that (a drain removing the tenant's volumes on the node it left) holds it too."""
        with self._turns_lock:
            lock = self._turns.setdefault(name, threading.Lock())
        with lock:
            yield

    def reconcile(self, name: str) -> float | None:
        """Converge one tenant; returns when to look again (None: only on change/resync)."""
        with self.tenant_turn(name):
            return self._converge(name)

    def _converge(self, name: str) -> float | None:
        row = self.store.find_tenant(name)
        containers = self.runtime.containers(names.selector(self.settings.instance, tenant=name))
        if row is None:
            return self._orphan(name, containers)
        self._orphans_seen.pop(name, None)
        if row.status == TenantStatus.REMOVING:
            return self._remove(row, containers)
        device = placed_on(row.device, self.inventory.devices())
        if device is None and self.place_again is not None:
            return self._node_lost(row, containers)
        if device is None:
            self._set_status(
                row,
                TenantStatus.FAILED,
                f"its device {row.device} is not on this host any more (a GPU removed, or MIG reconfigured); "
                "move the tenant with update-tenant --gpu N (capacity lists the devices)",
            )
            return None
        self._lost_since.pop(name, None)
        try:
            plan = self._plan(row, device)
        except InvalidInput as exc:  # its model's files no longer take its options (parsers, size)
            self._set_status(row, TenantStatus.FAILED, exc.message)
            raise
        stale = [c for c in containers if c.role == Role.ENGINE and c.spec_hash != plan.engine.labels[names.SPEC_HASH]]
        holder = self._profiling_elsewhere(name, stale, None)
        if holder:
            self._set_status(row, TenantStatus.PENDING, f"waiting for {holder}'s engine to finish starting")
            return POLL_STARTING_S
        engine, gateway = self._current(name, containers, plan)
        gateway_ready = self._gateway(row, plan.gateway, gateway)
        if row.status == TenantStatus.ASLEEP:
            return self._asleep(row, engine, gateway_ready)
        if engine is None:
            return self._start_engine(row, device, plan.engine)
        if engine.status == "running":
            if engine.health == "healthy":
                return self._engine_healthy(row, engine, device, plan.gateway, gateway, gateway_ready)
            if engine.health == "unhealthy":
                return self._engine_failed(row, engine, "engine stopped answering its health check")
            return self._engine_starting(row, engine)
        if engine.status in ("exited", "dead"):
            self._engine_failed(row, engine, None)  # records the failure once, sets when to retry
            return self._start_engine(row, device, plan.engine)  # waits out the backoff, then replaces it
        if engine.status == "created" and engine.error:  # on a swarm: pending, Swarm saying why
            self._set_status(row, row.status, f"its engine has not started: {engine.error}")
        return POLL_STARTING_S  # created, restarting, paused, removing: look again soon

    def _remove(self, row: TenantRow, containers: list[ContainerState]) -> float | None:
        """A removed tenant: its last usage collected, then its containers, networks and volumes
        gone, then its row."""
        name = row.spec.name
        # its engine may still run on the device it was moved from: any device's gate
        if self._profiling_elsewhere(name, containers, None):
            return POLL_STARTING_S
        # collect the last usage records before the gateway and its volume go
        if any(c.role == Role.GATEWAY and c.status == "running" for c in containers):
            self.collector.collect(name, row.gateway_token)
        self._teardown(name, containers)
        self.store.delete_tenant(name)
        return None

    def _plan(self, row: TenantRow, device: DeviceMemory) -> TenantPlan:
        """What Docker should run for the tenant, its networks and volumes made sure of."""
        images = (self.settings.engine_image, self.settings.manager_image)
        plan = tenant_plan(
            row.spec,
            self.settings,
            device.usable,
            self.sizing.fit(row.spec),
            device.uuid if device.kind != "host-memory" else None,
            gateway_token=row.gateway_token,
            image_ids={image: self.runtime.image_id(image) or "" for image in images},
            parsers=engine_parsers(
                row.spec.tool_call_parser,
                row.spec.reasoning_parser,
                row.spec.model,
                lambda: self.sizing.model_text(row.spec.model),
            ),
            node=device.node,
        )
        self.runtime.ensure_network(control_network_plan(self.settings))
        self.runtime.ensure_network(plan.network)
        if plan.volume is not None:
            self.runtime.ensure_volume(plan.volume)
        self.runtime.ensure_volume(plan.gateway_volume)
        return plan

    def _current(
        self, name: str, containers: list[ContainerState], plan: TenantPlan
    ) -> tuple[ContainerState | None, ContainerState | None]:
        """The engine and gateway that match the plan; every other container of the tenant (an
        older spec, a stray duplicate) is removed."""
        engine: ContainerState | None = None
        gateway: ContainerState | None = None
        for c in containers:
            if c.role not in (Role.ENGINE, Role.GATEWAY):
                continue
            wanted = plan.engine if c.role == Role.ENGINE else plan.gateway
            current = c.name == wanted.name and c.spec_hash == wanted.labels[names.SPEC_HASH]
            if current and c.role == Role.ENGINE and engine is None:
                engine = c
            elif current and c.role == Role.GATEWAY and gateway is None:
                gateway = c
            else:
                self.runtime.remove_container(c.name)
                self._served.discard(c.id)
                if c.role == Role.ENGINE:
                    self._release_gate(name)
                    self.store.clear_engine_failure(name)
        return engine, gateway

    def _gateway(self, row: TenantRow, plan: ContainerPlan, gateway: ContainerState | None) -> bool:
        """``_ensure_gateway``, its failure told as the tenant's reason before it is raised."""
        try:
            return self._ensure_gateway(row, plan, gateway)
        except GtmError as exc:  # e.g. the port is taken by a process Docker does not know
            if port_taken(exc.message):  # the cause first: list-tenants shows the reason's start
                reason = (
                    f"port {row.spec.port} is in use by another program on the host; "
                    f"move the tenant with update-tenant --port (Docker: {docker_words(exc.message)})"
                )
            else:
                reason = f"gateway could not start: {exc.message}"
            self._set_status(row, TenantStatus.FAILED, reason)
            raise

    def _engine_healthy(
        self,
        row: TenantRow,
        engine: ContainerState,
        device: DeviceMemory,
        plan: ContainerPlan,
        gateway: ContainerState | None,
        gateway_ready: bool,
    ) -> float | None:
        """The engine serves: the tenant runs once its gateway does (a waking one: once its wake is done)."""
        name = row.spec.name
        if engine.id not in self._served and self.settings.platform.gates_starts_on_profile:
            self._learn_overhead(row, engine, device)
        self._served.add(engine.id)
        self._restarted.pop(name, None)
        self._release_gate(name)
        self.store.clear_engine_failure(name)
        if not gateway_ready:
            self._set_status(row, TenantStatus.STARTING, "engine ready; gateway starting")
            return POLL_STARTING_S
        # it was waking: its engine started again, or (a GPU engine, asleep in place) wakes now;
        # then its gateway releases what it held
        if row.status == TenantStatus.WAKING and self.settings.platform.sleeps_in_place:
            later = self._wake_in_place(row, engine)
            if later is not None:
                return later
        took = self.store.woke(name, self.clock()) if row.status == TenantStatus.WAKING else None
        if took is not None:
            self.wake_times.append(took)
            log.info("tenant %s woke in %.1f s", name, took)
            self._ensure_gateway(self.store.tenant(name), plan, gateway)
            return None
        self._set_status(row, TenantStatus.RUNNING)
        return None  # the resync looks again; usage has its own loop

    def _learn_overhead(self, row: TenantRow, engine: ContainerState, device: DeviceMemory) -> None:
        """nvml: what the new engine needed beyond its weights, images, sequences and KV cache, from
        the KV cache its own profile logged ("Available KV cache memory") and its budget (vLLM's
        ``ceil(total x utilization)``), recorded for its model: admission's model-fit minimum, the
        engine's split and list-models use it from then on instead of ``GTM_GPU_ENGINE_OVERHEAD``."""
        try:
            kv = available_kv_cache(self.runtime.logs_tail(engine.name, START_LOG_LINES))
            split = self.sizing.fit(row.spec)
        except GtmError as exc:
            log.warning("the engine overhead of %s was not learned: %s", row.spec.name, exc.message)
            return
        if kv is None:
            return
        budget = math.ceil(device.usable * gpu_memory_utilization(row.spec.gpu_memory, device.usable))
        # plus the most the utilization's four decimals take from any reservation's budget here
        rounding = device.usable // 10_000 + 1
        overhead = budget - kv - split.weights - split.images - split.max_num_seqs * split.per_sequence + rounding
        self.store.record_engine_overhead(row.spec.model, bool(split.images), overhead, self.clock())
        log.info(
            "model %s: its engine needs %s beyond weights, images and KV cache (counted so far: %s)",
            row.spec.model,
            format_size(overhead),
            format_size(split.overhead),
        )

    def _asleep(self, row: TenantRow, engine: ContainerState | None, gateway_ready: bool) -> float | None:
        """Its gateway holds requests (this turn pushed the config that says so); once the gateway
        says nothing is in flight its engine sleeps in place (a GPU engine: vLLM's sleep mode) or is
        removed (cpu). Its volume stays, and so does the reservation: the wake is guaranteed its
        memory (with overcommit, by putting others to sleep first)."""
        name = row.spec.name
        if engine is None:
            self._release_gate(name)
            return None
        if not gateway_ready or self._profiling_elsewhere(name, [engine], row.device):
            return POLL_STARTING_S  # nvml: memory freed under another engine's profiling fails its start
        activity = self.sleeper.activity(row)
        if activity is None or not activity.hold or activity.in_flight:
            return DRAIN_POLL_S  # a request taken before the hold is still being answered
        if self.settings.platform.sleeps_in_place and engine.status == "running" and engine.health != "unhealthy":
            if engine.health != "healthy":
                return POLL_STARTING_S  # started again (a dockerd restart): it sleeps once it serves
            with self._admin(row) as gw:
                if not gw.engine_sleeping():
                    started = self.clock()
                    gw.engine_sleep()
                    log.info("tenant %s is asleep: its engine sleeps in place (%.1f s)", name, self.clock() - started)
                    self._measure_kept(name, engine)
            self._release_gate(name)
            return None
        self.runtime.remove_container(engine.name)
        self._served.discard(engine.id)
        self._release_gate(name)
        log.info("tenant %s is asleep: its engine is stopped", name)
        return None

    def _measure_kept(self, name: str, engine: ContainerState) -> None:
        """What the engine that just slept in place keeps of its device (NVML's per-process figure),
        recorded for the tenant: overcommit and admission count it for this tenant from then on."""
        try:
            pids = self.runtime.container_pids(engine.name)
            used = [p.used for p in self.inventory.processes() if p.pid in pids]
        except GtmError as exc:
            log.warning("what the sleeping engine of %s keeps was not measured: %s", name, exc.message)
            return
        if used and None not in used:  # the driver hides per-process use (MIG, vGPU): the default stays
            self.store.set_kept_asleep(name, sum(u for u in used if u is not None))

    def _wake_in_place(self, row: TenantRow, engine: ContainerState) -> float | None:
        """A waking tenant whose engine sleeps in place: it wakes (vLLM copies its weights back)
        once no other engine profiles and, with overcommit, once those put to sleep for it have
        released their memory, and once the device has the memory the wake maps back. A wake that
        fails (vLLM maps its memory back without rollback, and a half-mapped engine still reports
        sleeping) removes the engine: it starts cold, through the start gate. None when it is
        awake; else when to look again."""
        name = row.spec.name
        holder = self._gate_holder(row.device, name)
        if holder:  # memory taken while another engine profiles sizes its KV cache wrong
            return self._wait_for_gate(row, holder)
        if self._waiting_for_sleepers(row):
            return POLL_STARTING_S
        with self._admin(row) as gw:
            if gw.engine_sleeping():
                short = self._wake_shortfall(row)
                if short:
                    self._set_status(row, TenantStatus.WAKING, short)
                    return POLL_STARTING_S
                started = self.clock()
                self._take_gate(row)  # until it has woken and written a token (the gateway's warm-up)
                try:
                    gw.engine_wake()
                    awake = not gw.engine_sleeping()  # answered, yet asleep: as good as failed
                    why = "" if awake else "it answered, yet still sleeps"
                except RuntimeUnavailable as exc:
                    awake, why = False, exc.message
                if not awake:  # removed while this turn holds the gate: nothing profiles meanwhile
                    log.warning("tenant %s: its engine failed to wake (%s); it starts cold", name, why)
                    self.runtime.remove_container(engine.name)
                    self._served.discard(engine.id)
                    self._release_gate(name)
                    self._set_status(row, TenantStatus.WAKING, f"its engine failed to wake; starting it cold: {why}")
                    return 0.0
                self._release_gate(name)
                log.info("tenant %s: its engine woke in place in %.1f s", name, self.clock() - started)
        return None

    def _wake_shortfall(self, row: TenantRow) -> str:
        """nvml: why the device cannot take back what the wake maps ('' when it can): the tenant's
        reservation less what its sleeping engine keeps, against NVML's free memory now."""
        device = placed_on(row.device, self.inventory.devices())
        if device is None:
            return ""
        kept = row.sleep.kept_asleep if row.sleep.kept_asleep is not None else self.settings.effective_kept_asleep
        wanted = max(
            row.spec.gpu_memory + self.settings.platform.process_overhead(self.settings.process_overhead) - kept, 0
        )
        if device.free >= wanted:
            return ""
        return (
            f"waiting for memory on its device: the wake maps back {format_size(wanted)}, "
            f"{format_size(device.free)} is free now"
        )

    def _admin(self, row: TenantRow) -> GatewayAdmin:
        """The tenant's gateway admin port; RuntimeUnavailable when it has no address now."""
        ip = gateway_ip(self.runtime, self.settings, row.spec.name)
        if ip is None:
            raise RuntimeUnavailable(f"the gateway of {row.spec.name} has no address on the control network yet")
        return self.connect(ip, row.gateway_token)

    def _ensure_gateway(self, row: TenantRow, plan: ContainerPlan, gateway: ContainerState | None) -> bool:
        """Runs the tenant's gateway (it serves 503 until the engine is up) and, once healthy,
        pushes its config. True when it is serving with the current config."""
        if gateway is None or gateway.status in ("exited", "dead"):
            self.runtime.run(plan)
            return False
        if gateway.status != "running" or gateway.health == "unhealthy":
            return False  # "starting": Docker's first check is 5 s away; a push is tried at once
        ip = gateway_ip(self.runtime, self.settings, row.spec.name)
        if ip is None:
            return False
        try:
            with self.connect(ip, row.gateway_token) as gw:
                push_config(
                    self.store,
                    row.spec.name,
                    gw,
                    self.settings.wake_timeout_s,
                    self.settings.max_waiting,
                    self._concurrency(row),
                )
        except RuntimeUnavailable as exc:
            log.warning("gateway of %s: %s", row.spec.name, exc.message)
            return False
        return True

    def _concurrency(self, row: TenantRow) -> int | None:
        """The sequences its engine runs at once (its split's ``--max-num-seqs``)."""
        try:
            return self.sizing.fit(row.spec).max_num_seqs
        except GtmError:
            return None

    def _start_engine(self, row: TenantRow, device: DeviceMemory, plan: ContainerPlan) -> float | None:
        name = row.spec.name
        fail = self.store.engine_failure(name)
        now = self.clock()
        if fail and fail.retry_at > now:
            return fail.retry_at - now
        holder = self._gate_holder(row.device, name)
        if holder:
            return self._wait_for_gate(row, holder)
        if self._waiting_for_sleepers(row):
            return POLL_STARTING_S
        requeue = functools.partial(self.queue.add, name)  # the moment its warm-up ends
        if self.settings.platform.warms_up and not self.warmer.ready(row.spec.model, device.node, then=requeue):
            self._take_gate(row)  # no other engine starts while this cache warms
            self._set_status(row, TenantStatus.STARTING, "reading the engine image and model into the page cache")
            return POLL_STARTING_S
        if not self._mps_ready(row, device):
            return POLL_STARTING_S
        self._open_volume(row)
        self._prepare(row, device.node)
        self.runtime.run(plan)
        self._take_gate(row)
        now_row = self.store.find_tenant(name)
        if fail and now_row and now_row.status == TenantStatus.FAILED and now_row.reason:
            self._restarted[name] = f"engine restarted after it failed: {now_row.reason}"[:500]
        self._set_status(row, TenantStatus.STARTING, self._restarted.get(name, ""))
        return POLL_STARTING_S

    def _mps_ready(self, row: TenantRow, device: DeviceMemory) -> bool:
        """``GTM_GPU_SHARING=mps``: the control daemon of the tenant's device runs and answers
        before an engine starts there (the engine joins its IPC namespace). False while it is
        started, or starts; the tenant says so. One found dead is replaced."""
        if self.settings.gpu_sharing != "mps" or device.kind == "host-memory":
            return True
        plan = mps_daemon_plan(self.settings, device.uuid)
        state = self.runtime.container(plan.name)
        if state is not None and state.status in ("exited", "dead"):
            log.warning(
                "MPS control daemon of %s %s (exit %s); starting it again", device.uuid, state.status, state.exit_code
            )
            self.runtime.remove_container(plan.name)
            state = None
        if state is None:
            self.runtime.run(plan)
            self._set_status(row, TenantStatus.STARTING, f"starting the MPS control daemon of {device.uuid}")
            return False
        if state.status != "running" or state.health != "healthy":
            health = state.health or state.status
            self._set_status(
                row, TenantStatus.STARTING, f"waiting for the MPS control daemon of {device.uuid} ({health})"
            )
            return False
        return True

    def sweep_mps_daemons(self) -> None:
        """MPS control daemons of devices no tenant is placed on are removed (every one of them when
        ``GTM_GPU_SHARING`` is not mps: the engines are replaced without MPS in their own turns)."""
        daemons = self.runtime.containers(names.selector(self.settings.instance, role=Role.MPS.value))
        if not daemons:
            return
        wanted: set[str] = set()
        if self.settings.gpu_sharing == "mps":
            devices = self.inventory.devices()
            wanted = {d.uuid for row in self.store.tenants() if (d := placed_on(row.device, devices)) is not None}
        for daemon in daemons:
            if daemon.labels.get(names.DEVICE) not in wanted:
                log.info("removing the MPS control daemon %s: no tenant on its device", daemon.name)
                self.runtime.remove_container(daemon.name)

    def _waiting_for_sleepers(self, row: TenantRow) -> bool:
        """Overcommit: the room an engine's start or wake was given is free once the engines put to
        sleep for it have let go of their memory; until then it waits (and says for whom)."""
        stopping = self._put_to_sleep(row) if self.settings.overcommit else None
        if stopping:
            self._set_status(row, TenantStatus.PENDING, f"waiting for the engine of {stopping}, put to sleep, to stop")
        return stopping is not None

    def _put_to_sleep(self, row: TenantRow) -> str | None:
        """An asleep tenant on the same device whose engine still holds its memory, if any: one
        still there (cpu), or not yet asleep in place (a GPU engine)."""
        devices = self.inventory.devices()
        here = placed_on(row.device, devices)
        asleep: dict[str, TenantRow] = {}
        for other in self.store.tenants():
            placed = placed_on(other.device, devices)
            if other.status == TenantStatus.ASLEEP and here and placed and placed.uuid == here.uuid:
                asleep[other.spec.name] = other
        if not asleep:
            return None
        engines = self.runtime.containers(names.selector(self.settings.instance, role=Role.ENGINE.value))
        for c in engines:
            if c.tenant not in asleep:
                continue
            if not self.settings.platform.sleeps_in_place or c.status != "running" or c.health != "healthy":
                return c.tenant
            with self._admin(asleep[c.tenant]) as gw:
                if not gw.engine_sleeping():
                    return c.tenant
        return None

    def _open_volume(self, row: TenantRow) -> None:
        """An encrypted tenant's volume open before its engine starts (made first, and a plain
        volume's data moved in, when it has none yet); its failure told as the tenant's reason."""
        if not row.spec.encrypted:
            return
        try:
            made = self.vault.ready(row.spec, ENGINE_UID)
            if made:
                self._prepared.pop(row.spec.name, None)  # a new volume: given to the engine's user again
            self._move_plain_data(row, made)
        except GtmError as exc:
            self._set_status(row, TenantStatus.FAILED, f"encrypted volume: {exc.message}")
            raise

    def _move_plain_data(self, row: TenantRow, made: bool) -> None:
        """update-tenant --volume encrypted:/data: the tenant's Docker volume copied into its new
        encrypted volume (its engine is stopped: the spec change replaced it), then removed. All or
        nothing: a copy that fails or was cut short (no marker) erases the encrypted volume, and
        the next pass starts over from the Docker volume, which is removed only after a full copy."""
        name = row.spec.name
        plain = names.volume(self.settings.instance, name)
        if plain not in {v.name for v in self.runtime.volumes(names.selector(self.settings.instance, tenant=name))}:
            return
        if not self.vault.moved(name):
            if not made:  # a copy cut short by a restart: start again from an empty volume
                self.vault.erase(name)
                self.vault.ready(row.spec, ENGINE_UID)
            self._set_status(row, TenantStatus.STARTING, "moving its data into its encrypted volume")
            code, out = self.runtime.run_to_completion(move_plan(row.spec, self.settings, MOVED), MOVE_TIMEOUT_S)
            if code != 0 or not self.vault.moved(name):
                self.vault.erase(name)
                raise RuntimeUnavailable(
                    f"copying the data of {name} into its encrypted volume failed (exit {code}): "
                    f"{out.strip()[-300:]}; its plain volume is kept, and the copy is tried again"
                )
        self.runtime.remove_volume(plain)
        log.info("moved the data of %s into its encrypted volume", name)

    def _prepare(self, row: TenantRow, node: str) -> None:
        """Gives the tenant's volume (on ``node``, on a swarm) to the engine's user, once per manager
        process and node (it is idempotent; a volume created by Docker on its own, or an older
        release's, is fixed too)."""
        name = row.spec.name
        if self._prepared.get(name) == node:
            return
        code, out = self.runtime.run_to_completion(prepare_plan(row.spec, self.settings, node), PREPARE_TIMEOUT_S)
        if code != 0:
            raise RuntimeUnavailable(
                f"could not give the volume of {name} to the engine's user (exit {code}): {out.strip()[-300:]}"
            )
        self._prepared[name] = node

    def _profiling_elsewhere(self, name: str, containers: list[ContainerState], device: str | None) -> str:
        """nvml: the tenant whose engine holds the start gate of ``device`` (None: of any device)
        while it profiles free memory, when this turn would stop a running engine there, which
        frees memory under it ('' when nothing waits). vLLM then fails that start ("Error in memory
        profiling ... other processes sharing the same container release GPU memory while vLLM is
        profiling", vllm/v1/worker/gpu_worker.py). cpu engines size against their own cgroup, so
        nothing waits there."""
        if not self.settings.platform.gates_starts_on_profile:
            return ""
        if not any(c.role == Role.ENGINE and c.status == "running" for c in containers):
            return ""
        for gated in list(self._gates) if device is None else [device]:
            holder = self._gate_holder(gated, name)
            if holder:
                return holder
        return ""

    def _gate_holder(self, device: str, name: str) -> str:
        """The tenant other than ``name`` whose engine holds ``device``'s start gate ('' when none;
        a holder since removed lets go of it)."""
        held = self._gates.get(device)
        if held is None or held[0] == name:
            return ""
        if self.store.find_tenant(held[0]) is None:
            del self._gates[device]
            return ""
        return held[0]

    def _take_gate(self, row: TenantRow) -> None:
        self._gates[row.device] = (row.spec.name, self.clock())

    def _wait_for_gate(self, row: TenantRow, holder: str) -> float:
        """The tenant waits for ``holder``'s engine: queued again the moment the gate is let go
        (``_release_gate``), and polled meanwhile."""
        self._gate_waiters.setdefault(row.device, set()).add(row.spec.name)
        self._set_status(row, TenantStatus.PENDING, f"waiting for {holder}'s engine to finish starting")
        return POLL_STARTING_S

    def _engine_starting(self, row: TenantRow, engine: ContainerState) -> float | None:
        name = row.spec.name
        if row.device not in self._gates:
            self._take_gate(row)  # after a manager restart: it holds the gate again
        held = self._gates[row.device]
        if held[0] == name and self.clock() - held[1] > self.settings.engine_start_timeout_s:
            return self._engine_failed(
                row, engine, f"engine not healthy after {self.settings.engine_start_timeout_s:.0f} s"
            )
        self._set_status(row, TenantStatus.STARTING, self._restarted.get(name, ""))
        return POLL_STARTING_S

    def _engine_failed(self, row: TenantRow, engine: ContainerState, reason: str | None) -> float:
        """Counts a failure once (by the container's finish time) and sets when to retry."""
        name = row.spec.name
        fail = self.store.engine_failure(name) or EngineFailure(0, "", 0.0)
        marker = engine.finished_at if engine.status in ("exited", "dead") else f"unhealthy@{engine.started_at}"
        if fail.marker != marker:
            count = fail.count + 1
            logs = self.runtime.logs_tail(engine.name, LOG_TAIL_LINES)
            # an engine that served and then died (killed, OOM) is replaced at once; one that never
            # came up waits 10 s, 20 s, ... (a crash loop must not hog the start gate)
            # (served: this process saw it healthy, or the store says it ran: a manager restarted with
            # dockerd, its engines stopped meanwhile, never saw them healthy)
            served = engine.id in self._served or row.status == TenantStatus.RUNNING
            wait = 0.0 if served and count == 1 else backoff(count, 10.0, 300.0)
            self._served.discard(engine.id)
            fail = EngineFailure(count, marker, self.clock() + wait, logs[-LOG_KEEP_CHARS:])
            self.store.save_engine_failure(name, fail)
            text = reason or failure_reason(engine, logs, self.settings.platform.reservation_is_host_memory)
            if engine.status == "running":  # unhealthy or timed out: stop it, keep its logs until restart
                self.runtime.stop_container(engine.name)
            self._release_gate(name)
            if COLD_CACHE.search(text):
                self.warmer.forget(row.spec.model)  # warm again first
            log.warning("engine of %s failed (%d): %s", name, count, text)
            self._set_status(row, TenantStatus.FAILED, text)
        return max(fail.retry_at - self.clock(), 0.5)

    def _teardown(self, name: str, containers: list[ContainerState]) -> None:
        for c in containers:
            self.runtime.remove_container(c.name)
        sel = names.selector(self.settings.instance, tenant=name)
        for net in self.runtime.networks(sel):
            self.runtime.remove_network(net.name)
        for vol in self.runtime.volumes(sel):
            self.runtime.remove_volume(vol.name)
        self.vault.erase(name)
        self._release_gate(name)
        self._prepared.pop(name, None)
        self.store.clear_engine_failure(name)

    def _release_gate(self, name: str) -> None:
        for device, (holder, _) in list(self._gates.items()):
            if holder == name:
                del self._gates[device]
                for waiting in sorted(self._gate_waiters.pop(device, ())):
                    self.queue.add(waiting)

    def _set_status(self, row: TenantRow, status: TenantStatus, reason: str = "") -> None:
        current = self.store.find_tenant(row.spec.name)
        if current is not None and current.status == TenantStatus.WAKING and status in WAKING_STEPS:
            status = TenantStatus.WAKING  # its engine's start, told as steps of its wake
            reason = reason or current.reason
        if current is None or (current.status == status and current.reason == reason):
            return
        with self.store.transaction() as tx:
            moved = self.store.set_status(tx, row.spec.name, status, reason)
        if not moved:
            name, was = row.spec.name, current.status.value
            log.warning("tenant %s: status %s -> %s refused (not in the diagram)", name, was, status.value)

    def _node_lost(self, row: TenantRow, containers: list[ContainerState]) -> float | None:
        """On a swarm, the tenant's node is not reported (down, or cut off from the manager). Its
        containers may still serve there, so for ``node_loss_grace_s`` it only says so; then it is
        placed again where it fits (``place_again``), and its next turn makes its engine and gateway
        there: the old ones' services go, and Swarm stops their containers once the node returns.
        When no node has room it fails, with the numbers, and is tried again."""
        name = row.spec.name
        now = self.clock()
        since = self._lost_since.setdefault(name, now)
        grace = self.settings.node_loss_grace_s
        if now - since < grace:
            self._set_status(
                row, row.status, f"its node ({row.device}) has not reported for {now - since:.0f} s; "
                f"it is placed on another node after {grace:.0f} s unless the node comes back",
            )  # fmt: skip
            return since + grace - now
        assert self.place_again is not None
        gateway_on = {c.labels.get(names.NODE, "") for c in containers if c.role == Role.GATEWAY} - {""}
        try:
            where = self.place_again(name, min(gateway_on, default=""))
        except AdmissionRefused as exc:
            self._set_status(row, TenantStatus.FAILED, f"its node was lost and no other node has room: {exc.message}")
            return NO_ROOM_RETRY_S
        self._lost_since.pop(name, None)
        log.warning("tenant %s placed again on %s: its node (%s) was lost", name, where, row.device)
        return 0.0

    # ---------------------------------------------------------------- orphans
    def _actual_tenants(self) -> set[str]:
        sel = names.selector(self.settings.instance)
        found: set[str] = set()
        for c in self.runtime.containers(sel):
            if c.tenant and c.role in (Role.ENGINE, Role.GATEWAY):
                found.add(c.tenant)
        for res in self.runtime.networks(sel) + self.runtime.volumes(sel):
            if res.tenant and res.labels.get(names.ROLE) in (Role.NETWORK, Role.VOLUME):
                found.add(res.tenant)
        return found | set(self.vault.names())

    def _orphan(self, name: str, containers: list[ContainerState]) -> float | None:
        """Resources labelled with a tenant that does not exist: removed once seen for the grace
        period (a tenant created by another manager of this instance may just not be visible yet)."""
        sel = names.selector(self.settings.instance, tenant=name)
        if not (containers or self.runtime.networks(sel) or self.runtime.volumes(sel) or name in self.vault.names()):
            self._orphans_seen.pop(name, None)
            return None
        now = self.clock()
        first = self._orphans_seen.setdefault(name, now)
        if now - first < self.settings.orphan_grace_s:
            return first + self.settings.orphan_grace_s - now
        if self._profiling_elsewhere(name, containers, None):  # its device is not known: any
            return POLL_STARTING_S
        log.warning("removing orphaned resources of %s (no such tenant for %.0f s)", name, now - first)
        self._teardown(name, containers)
        self._orphans_seen.pop(name, None)
        return None
