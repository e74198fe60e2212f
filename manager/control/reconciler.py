"""The reconciler: level-triggered, one tenant at a time, converging Docker to SQLite.

For a tenant key it reads the desired state (the tenant's row) and the actual
state (containers, network, volume found by label), diffs and acts. It runs on
start-up, after every change (``enqueue``) and on a periodic resync, which also
removes labelled orphans once they have been seen for ``orphan_grace_s``.

Engines start one at a time (the *start gate*): vLLM measures free memory when
it starts, and two engines profiling at once can both fail. The next engine
waits until the previous one is healthy, has failed, or timed out.

Status writes never enqueue work, so the reconciler never re-triggers itself.
A failing engine is restarted with exponential backoff (10 s doubling to 5 min);
an error talking to Docker backs the key off (1 s doubling to 60 s).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

from manager import names
from manager.control.gateway_client import sync_gateway
from manager.control.plan import control_network_name, control_network_plan, tenant_plan
from manager.control.store import Store, TenantRow
from manager.control.workqueue import WorkQueue
from manager.domain import TenantStatus, can_transition
from manager.errors import GtmError, RuntimeUnavailable
from manager.gpu import Inventory
from manager.names import Role
from manager.runtime.protocol import Runtime
from manager.runtime.types import ContainerPlan, ContainerState
from manager.settings import Settings

log = logging.getLogger(__name__)
POLL_STARTING_S = 2.0
FAILURE_PATTERNS = [
    re.compile(r"Free memory on device.*", re.IGNORECASE),
    re.compile(r"(?:CUDA )?out of memory.*", re.IGNORECASE),
    re.compile(r"\b\w*(?:Error|Exception): .*"),
]


def failure_reason(state: ContainerState, logs: str) -> str:
    """The engine's own words for why it stopped, or the best description Docker gives."""
    if state.oom_killed:
        return ("engine killed by the out-of-memory killer: the reservation is too small for this "
                "model and options; raise --gpu-memory or lower --max-model-len")
    lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
    for pattern in FAILURE_PATTERNS:
        for i in range(len(lines) - 1, -1, -1):
            found = pattern.search(lines[i])
            if found:
                text = found.group(0)
                if "validation error" in text and i + 1 < len(lines):  # pydantic: the detail is below
                    text += ": " + lines[i + 1].split(" [type=")[0]
                return text[:500]
    if state.error:
        return f"Docker could not run the engine: {state.error}"[:500]
    return f"engine exited with code {state.exit_code}"


def backoff(failures: int, base: float, cap: float) -> float:
    return float(min(cap, base * 2 ** max(0, failures - 1)))


@dataclass
class _Failures:
    count: int = 0
    last_finished_at: str = ""
    retry_at: float = 0.0


class Reconciler:
    def __init__(self, settings: Settings, store: Store, runtime: Runtime, inventory: Inventory) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.inventory = inventory
        self.queue = WorkQueue()
        self._gate: tuple[str, float] | None = None
        self._failures: dict[str, _Failures] = {}
        self._errors: dict[str, int] = {}
        self._orphans_seen: dict[str, float] = {}
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._work, name="reconcile-worker", daemon=True),
            threading.Thread(target=self._resync_loop, name="reconcile-resync", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.close()
        for t in self._threads:
            t.join(timeout=10)

    def enqueue(self, tenant: str, delay: float = 0.0) -> None:
        self.queue.add(tenant, delay)

    def resync(self) -> None:
        """Queue every tenant that is desired or actually present; sweep orphans."""
        desired = {row.spec.name for row in self.store.tenants()}
        actual = self._actual_tenants()
        for name in desired | actual:
            self.queue.add(name)
        self._sweep_orphans(actual - desired)

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
                delay = self._error_backoff(key, f"internal error: {exc!r}")
            if delay is not None:
                self.queue.add(key, delay)

    def _error_backoff(self, key: str, message: str) -> float:
        n = self._errors[key] = self._errors.get(key, 0) + 1
        log.warning("reconcile of %s failed (%d): %s", key, n, message)
        return backoff(n, 1.0, 60.0)

    def _resync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.resync()
            except GtmError as exc:
                log.warning("resync failed: %s", exc.message)
            self._stop.wait(self.settings.reconcile_interval_s)

    # ---------------------------------------------------------------- one tenant
    def reconcile(self, name: str) -> float | None:
        """Converge one tenant; returns when to look again (None: only on change/resync)."""
        row = self.store.find_tenant(name)
        containers = self.runtime.containers(names.selector(self.settings.instance, tenant=name))
        if row is None:
            return None  # not ours (any more): the orphan sweep removes it after the grace period
        if row.status == TenantStatus.REMOVING:
            # collect the last usage records before the gateway and its volume go
            if any(c.role == Role.GATEWAY and c.status == "running" for c in containers):
                self._sync_gateway(name, row.gateway_token)
            self._teardown(name, containers)
            self.store.delete_tenant(name)
            return None
        device = self.inventory.devices()[0]
        plan = tenant_plan(row.spec, self.settings, device.total,
                           device.uuid if device.kind != "host-memory" else None, gateway_token=row.gateway_token)
        self.runtime.ensure_network(control_network_plan(self.settings))
        self.runtime.ensure_network(plan.network)
        self.runtime.ensure_volume(plan.volume)
        self.runtime.ensure_volume(plan.gateway_volume)

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
            else:  # an older spec, or a stray duplicate: replace it
                self.runtime.remove_container(c.name)
                if c.role == Role.ENGINE:
                    self._release_gate(name)
                    self._failures.pop(name, None)

        try:
            gateway_ready = self._ensure_gateway(row, plan.gateway, gateway)
        except GtmError as exc:  # e.g. the port is taken by a process Docker does not know
            self._set_status(row, TenantStatus.FAILED, f"gateway could not start: {exc.message}; if the port "
                             "is taken, move the tenant with update-tenant --port")
            raise
        if engine is None:
            return self._start_engine(row, plan.engine)
        if engine.status == "running":
            if engine.health == "healthy":
                self._release_gate(name)
                self._failures.pop(name, None)
                if not gateway_ready:
                    self._set_status(row, TenantStatus.STARTING, "engine ready; gateway starting")
                    return POLL_STARTING_S
                self._set_status(row, TenantStatus.RUNNING)
                return self.settings.usage_interval_s
            if engine.health == "unhealthy":
                return self._engine_failed(row, engine, "engine stopped answering its health check")
            return self._engine_starting(row, engine)
        if engine.status in ("exited", "dead"):
            self._engine_failed(row, engine, None)  # records the failure once, sets when to retry
            return self._start_engine(row, plan.engine)  # waits out the backoff, then replaces it
        return POLL_STARTING_S  # created, restarting, paused, removing: look again soon

    def _ensure_gateway(self, row: TenantRow, plan: ContainerPlan, gateway: ContainerState | None) -> bool:
        """Runs the tenant's gateway (it serves 503 until the engine is up) and, once healthy,
        pushes its config and collects its usage. True when it is serving with the current config."""
        if gateway is None or gateway.status in ("exited", "dead"):
            self.runtime.run(plan)
            return False
        if gateway.status != "running" or gateway.health != "healthy":
            return False
        return self._sync_gateway(row.spec.name, row.gateway_token)

    def _sync_gateway(self, name: str, token: str) -> bool:
        ip = self.runtime.container_ip(names.gateway(self.settings.instance, name), control_network_name(self.settings))
        if ip is None:
            return False
        try:
            sync_gateway(self.store, name, ip, token)
        except RuntimeUnavailable as exc:
            log.warning("gateway of %s: %s", name, exc.message)
            return False
        return True

    def _start_engine(self, row: TenantRow, plan: ContainerPlan) -> float | None:
        name = row.spec.name
        fail = self._failures.get(name)
        if fail and fail.retry_at > time.time():
            return fail.retry_at - time.time()
        if self._gate and self._gate[0] != name:
            holder = self._gate[0]
            if self.store.find_tenant(holder) is None:
                self._gate = None
            else:
                self._set_status(row, TenantStatus.PENDING, f"waiting for {holder}'s engine to finish starting")
                return POLL_STARTING_S
        self.runtime.run(plan)
        self._gate = (name, time.time())
        self._set_status(row, TenantStatus.STARTING)
        return POLL_STARTING_S

    def _engine_starting(self, row: TenantRow, engine: ContainerState) -> float | None:
        name = row.spec.name
        if self._gate is None:
            self._gate = (name, time.time())  # after a manager restart: it holds the gate again
        if self._gate[0] == name and time.time() - self._gate[1] > self.settings.engine_start_timeout_s:
            return self._engine_failed(
                row, engine, f"engine not healthy after {self.settings.engine_start_timeout_s:.0f} s"
            )
        self._set_status(row, TenantStatus.STARTING)
        return POLL_STARTING_S

    def _engine_failed(self, row: TenantRow, engine: ContainerState, reason: str | None) -> float:
        name = row.spec.name
        fail = self._failures.setdefault(name, _Failures())
        marker = engine.finished_at if engine.status in ("exited", "dead") else f"unhealthy@{engine.started_at}"
        if fail.last_finished_at != marker:
            fail.count += 1
            fail.last_finished_at = marker
            fail.retry_at = time.time() + backoff(fail.count, 10.0, 300.0)
            text = reason or failure_reason(engine, self.runtime.logs_tail(engine.name, 80))
            if engine.status == "running":  # unhealthy or timed out: stop it, keep its logs until restart
                self.runtime.stop_container(engine.name)
            self._release_gate(name)
            log.warning("engine of %s failed (%d): %s", name, fail.count, text)
            self._set_status(row, TenantStatus.FAILED, text)
        return max(fail.retry_at - time.time(), 0.5)

    def _teardown(self, name: str, containers: list[ContainerState]) -> None:
        for c in containers:
            self.runtime.remove_container(c.name)
        sel = names.selector(self.settings.instance, tenant=name)
        for net in self.runtime.networks(sel):
            self.runtime.remove_network(net.name)
        for vol in self.runtime.volumes(sel):
            self.runtime.remove_volume(vol.name)
        self._release_gate(name)
        self._failures.pop(name, None)

    def _release_gate(self, name: str) -> None:
        if self._gate and self._gate[0] == name:
            self._gate = None

    def _set_status(self, row: TenantRow, status: TenantStatus, reason: str = "") -> None:
        current = self.store.find_tenant(row.spec.name)
        if current is None or (current.status == status and current.reason == reason):
            return
        if current.status == TenantStatus.REMOVING or not can_transition(current.status, status):
            return
        self.store.set_status(row.spec.name, status, reason)

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
        return found

    def _sweep_orphans(self, orphans: set[str]) -> None:
        now = time.time()
        for name in list(self._orphans_seen):
            if name not in orphans:
                del self._orphans_seen[name]
        for name in orphans:
            first = self._orphans_seen.setdefault(name, now)
            if now - first >= self.settings.orphan_grace_s:
                log.warning("removing orphaned resources of %s (no such tenant for %.0f s)", name, now - first)
                sel = names.selector(self.settings.instance, tenant=name)
                self._teardown(name, self.runtime.containers(sel))
                del self._orphans_seen[name]
