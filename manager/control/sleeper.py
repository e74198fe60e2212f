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

Sleeping stops the engine in every mode today (a cold start on wake); vLLM's sleep mode, which
keeps a GPU engine's process and moves its weights to host memory, is not used yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from manager import names
from manager.contract import GatewayActivity
from manager.control.gateway_client import Connect
from manager.control.plan import control_network_name
from manager.control.records import TenantRow
from manager.control.storage import TenantStore
from manager.domain import TenantStatus
from manager.errors import RuntimeUnavailable
from manager.runtime.protocol import Runtime
from manager.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Turn:
    tenant: str
    action: str
    """``sleep`` or ``wake``."""


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings, self.store, self.runtime, self.connect = settings, store, runtime, connect
        self.enqueue, self.clock = enqueue, clock

    def tick(self) -> list[Turn]:
        """One look at every tenant that may sleep or wake; returns what it decided."""
        turns: list[Turn] = []
        for row in self.store.tenants():
            may_sleep = row.status == TenantStatus.RUNNING and row.spec.idle_sleep_s is not None
            if not (may_sleep or row.status == TenantStatus.ASLEEP):
                continue
            activity = self.activity(row)
            if activity is None:
                continue  # its gateway is not up: the reconciler sees to it
            name, now = row.spec.name, self.clock()
            if activity.last_request_at is not None and activity.last_request_at != row.sleep.last_request_at:
                self.store.note_last_request(name, activity.last_request_at)
            if may_sleep:
                idle = idle_for(row, activity, now)
                assert row.spec.idle_sleep_s is not None
                if idle >= row.spec.idle_sleep_s and not activity.in_flight and not activity.waiting:
                    detail = {"idle_s": round(idle, 1), "idle_sleep_s": row.spec.idle_sleep_s}
                    if self.store.sleep_tenant(name, now, detail):
                        log.info("tenant %s is going to sleep after %.0f s without a request", name, idle)
                        turns.append(Turn(name, "sleep"))
                        self.enqueue(name)
            elif activity.waiting or row.spec.idle_sleep_s is None:
                reason = "waking: a request is waiting" if activity.waiting else "waking: sleeping was turned off"
                if self.store.wake_tenant(name, now, reason, {"waiting": activity.waiting}):
                    log.info("tenant %s is waking (%d requests waiting)", name, activity.waiting)
                    turns.append(Turn(name, "wake"))
                    self.enqueue(name)
        return turns

    def activity(self, row: TenantRow) -> GatewayActivity | None:
        """What the tenant's gateway serves now; None when it cannot be asked."""
        ip = self.runtime.container_ip(
            names.gateway(self.settings.instance, row.spec.name), control_network_name(self.settings)
        )
        if ip is None:
            return None
        try:
            with self.connect(ip, row.gateway_token) as gw:
                return gw.activity()
        except RuntimeUnavailable as exc:
            log.warning("gateway of %s: %s", row.spec.name, exc.message)
            return None
