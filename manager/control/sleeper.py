"""Idle tenants sleep, and wake on their next request (``TenantSpec.idle_sleep_s``).

Every ``sleep_check_s`` the sleeper reads the activity of each gateway whose tenant may sleep or
sleeps (``GET /admin/activity``: when it last took a request, what is in flight, what it holds):

- a running tenant idle for its ``idle_sleep_s``, with nothing in flight and nothing held, goes
  to sleep: asleep in the store (counted and audited in one transaction). In the reconciler's turn
  its gateway is told to hold requests, and its engine is removed once nothing is in flight;
- an asleep tenant whose gateway holds a request wakes (also one whose admin turned sleeping
  off): waking in the store. The reconciler starts its engine as any other, through the start
  gate; once it serves, the gateway is told to stop holding and releases what it held, in order.

The sleeper decides and writes the store; every change to containers stays the reconciler's, in
the tenant's turn. A request that arrives between the decision and the hold is served by the
engine, which is removed only after it (the reconciler asks the gateway first).

With ``GTM_OVERCOMMIT`` the host admits more tenants than fit awake. A wake that does not fit
beside the awake tenants first puts the least recently used idle ones to sleep (``evict``, in the
store at once; the reconciler starts the waking engine only once their engines are gone); when
nothing can be put to sleep, the tenant's ``wake_refusal`` says why, with the numbers, and its
gateway answers with it; when only tenants busy serving or starting stand in the way, the request
waits for them (its reason says so). An always-on tenant never sleeps, and wakes at once when it finds itself
asleep (admitted by overcommit, or made always-on while asleep).

How an engine sleeps is the reconciler's: on a GPU in place (vLLM's sleep mode, level 1: its
weights go to host memory, its KV cache is freed, its process and CUDA context stay; a wake copies
the weights back), in cpu mode by stopping it (a cold start on wake).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from manager import names
from manager.contract import GatewayActivity
from manager.control.gateway_client import Connect, gateway_ip
from manager.control.overcommit import Room, WakePlan, plan_wake, resident
from manager.control.records import TenantRow
from manager.control.store import TenantStore
from manager.domain import TenantStatus
from manager.errors import RuntimeUnavailable
from manager.gpu import Inventory, placed_on
from manager.names import Role
from manager.runtime.protocol import Runtime
from manager.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    tenant: str
    action: str
    """``sleep`` (idle), ``evict`` (put to sleep for another's wake) or ``wake``."""


Ask = Callable[[TenantRow], GatewayActivity | None]
"""What a tenant's gateway serves now (None: it cannot be asked); ``Sleeper.asking`` asks once a tick."""


def may_sleep(row: TenantRow) -> bool:
    """A running tenant that sleeps when idle (an always-on one never does)."""
    return row.status == TenantStatus.RUNNING and row.spec.idle_sleep_s is not None and not row.spec.always_on


def idle_for(row: TenantRow, activity: GatewayActivity, now: float) -> float:
    """How long a running tenant has gone without a request (counted from when it last began to
    run, for one that took none since)."""
    return now - max(activity.last_request_at or 0.0, row.status_since)


class Sleeper:
    def __init__(
        self,
        settings: Settings,
        store: TenantStore,
        runtime: Runtime,
        connect: Connect,
        enqueue: Callable[[str], None],
        inventory: Inventory,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.store, self.runtime, self.connect = settings, store, runtime, connect
        self.enqueue, self.inventory, self.clock = enqueue, inventory, clock

    def tick(self) -> list[Turn]:
        """One look at every tenant that may sleep or wake; returns what it decided."""
        turns: list[Turn] = []
        ask = self.asking(self.healthy_gateways())
        # the tenants to look at with what their gateways serve; the asleep ones whose requests have
        # waited longest first: with overcommit, room that comes free goes to them
        looks: list[tuple[TenantRow, GatewayActivity]] = []
        for row in self.store.tenants():
            activity = ask(row) if may_sleep(row) or row.status == TenantStatus.ASLEEP else None
            if activity is not None:  # None: its gateway is not up, and the reconciler sees to it
                looks.append((row, activity))
        looks.sort(key=lambda look: look[1].waiting_since or float("inf"))
        for row, activity in looks:
            name, now = row.spec.name, self.clock()
            new_request = activity.last_request_at is not None and activity.last_request_at != row.sleep.last_request_at
            if new_request:
                assert activity.last_request_at is not None
                self.store.note_last_request(name, activity.last_request_at)
            if may_sleep(row):
                idle = idle_for(row, activity, now)
                assert row.spec.idle_sleep_s is not None
                if idle >= row.spec.idle_sleep_s and not activity.in_flight and not activity.waiting:
                    detail = {"idle_s": round(idle, 1), "idle_sleep_s": row.spec.idle_sleep_s}
                    if self.store.sleep_tenant(name, now, detail):
                        log.info("tenant %s is going to sleep after %.0f s without a request", name, idle)
                        turns.append(Turn(name, "sleep"))
                        self.enqueue(name)
                continue
            # asleep: a request is waiting (or, refused a moment ago, came again); it is always on;
            # or its admin turned sleeping off (with overcommit, it stays asleep until a request)
            wanted = (
                activity.waiting > 0
                or row.spec.always_on
                or (row.spec.idle_sleep_s is None and not self.settings.overcommit)
                or (bool(row.sleep.wake_refusal) and new_request)
            )
            if wanted:
                turns += self._wake(row, activity, now, ask)
            elif row.sleep.wake_refusal and self._could_wake(row, ask) and self.store.refuse_wake(name, "", {}):
                self.enqueue(name)  # room again: its next request is held, and wakes it
        return turns

    def asking(self, healthy: set[str]) -> Ask:
        """What each tenant's gateway serves, asked once in a tick however often it is needed (only
        the ``healthy`` gateways are asked)."""
        seen: dict[str, GatewayActivity | None] = {}

        def ask(row: TenantRow) -> GatewayActivity | None:
            if row.spec.name not in seen:
                seen[row.spec.name] = self.activity(row, healthy)
            return seen[row.spec.name]

        return ask

    def _wake(self, row: TenantRow, activity: GatewayActivity, now: float, ask: Ask) -> list[Turn]:
        """Wakes the tenant; with overcommit, after putting to sleep whom ``plan_wake`` chose, or
        not at all (the refusal goes to its gateway, whose requests then get a 503 with it)."""
        name = row.spec.name
        detail: dict[str, Any]
        if activity.waiting:
            reason, detail = "waking: a request is waiting", {"waiting": activity.waiting}
        elif row.spec.always_on:
            reason, detail = "waking: it is always on", {}
        else:
            reason, detail = "waking: sleeping was turned off", {}
        turns: list[Turn] = []
        if self.settings.overcommit:
            plan = self.plan(row, ask)
            if not plan.fits and plan.wait:  # room comes once busy tenants are idle: the request waits
                why = f"waking once there is room: {plan.message}"
                if row.reason != why:
                    with self.store.transaction() as tx:
                        self.store.set_status(tx, name, TenantStatus.ASLEEP, why)
                if self.store.refuse_wake(name, "", {}):
                    self.enqueue(name)  # refused a moment ago, waits now
                return turns
            if not plan.fits:
                if self.store.refuse_wake(name, plan.message, plan.numbers):
                    log.warning("tenant %s cannot wake: %s", name, plan.message)
                    self.enqueue(name)
                return turns
            for victim in plan.evict:
                why = f"put to sleep to make room for {name}'s wake (the least recently used idle tenant)"
                if not self.store.sleep_tenant(victim, now, {"for": name, **plan.numbers}, reason=why, action="evict"):
                    return turns  # it changed meanwhile (a request, an update): the next tick looks again
                log.info("tenant %s is put to sleep to make room for %s", victim, name)
                turns.append(Turn(victim, "evict"))
                self.enqueue(victim)
            detail = {**detail, "evicted": list(plan.evict), **plan.numbers}
        if self.store.wake_tenant(name, now, reason, detail):
            log.info("tenant %s is waking (%d requests waiting)", name, activity.waiting)
            turns.append(Turn(name, "wake"))
            self.enqueue(name)
        return turns

    def _could_wake(self, row: TenantRow, ask: Ask) -> bool:
        plan = self.plan(row, ask)
        return plan.fits or plan.wait

    def plan(self, row: TenantRow, ask: Ask | None = None) -> WakePlan:
        """Overcommit: whether the asleep tenant fits beside the awake ones on its device, and whom
        it puts to sleep first (each candidate's gateway is asked what it serves now)."""
        devices = self.inventory.devices()
        device = placed_on(row.device, devices)
        if device is None:
            return WakePlan(False, (), f"its device {row.device} is not on this host any more")
        platform, context = self.settings.platform, self.settings.process_overhead
        kept = self.settings.effective_kept_asleep
        others = []
        for other in self.store.tenants():
            placed = placed_on(other.device, devices)
            if other.spec.name == row.spec.name or placed is None or placed.uuid != device.uuid:
                continue
            idle, last_used = False, other.status_since
            if other.status == TenantStatus.RUNNING and not other.spec.always_on:
                activity = (ask or self.activity)(other)
                idle = activity is not None and not activity.in_flight and not activity.waiting
                if activity is not None and activity.last_request_at:
                    last_used = max(last_used, activity.last_request_at)
            others.append(resident(other, idle, last_used, kept))
        room = Room(device.usable, self.settings.headroom, platform.process_overhead(context))
        return plan_wake(row.spec.gpu_memory, others, room)

    def healthy_gateways(self) -> set[str]:
        """The tenants whose gateway passes its health check: the others are starting (or failing,
        which the reconciler sees to), and are not asked."""
        gateways = self.runtime.containers(names.selector(self.settings.instance, role=Role.GATEWAY.value))
        return {c.tenant for c in gateways if c.tenant and c.status == "running" and c.health == "healthy"}

    def activity(self, row: TenantRow, healthy: set[str] | None = None) -> GatewayActivity | None:
        """What the tenant's gateway serves now; None when it cannot be asked (or, given the
        tenants whose gateway is ``healthy``, when it is not one of them)."""
        if healthy is not None and row.spec.name not in healthy:
            return None
        ip = gateway_ip(self.runtime, self.settings, row.spec.name)
        if ip is None:
            return None
        try:
            with self.connect(ip, row.gateway_token) as gw:
                return gw.activity()
        except RuntimeUnavailable as exc:
            log.warning("gateway of %s: %s", row.spec.name, exc.message)
            return None
