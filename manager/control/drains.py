"""Usage left on a lost swarm node, collected once the node is back.

A tenant placed on another node after its node was lost (``TenantService.place_again``) gets a new
gateway there, on a new volume with a spool of its own. Its old gateway's spool stays on the lost
node's volume, holding what it served after the manager last collected: at most one collection
interval (``GTM_USAGE_INTERVAL_S``) of traffic, plus what it served while cut off from the manager
but not from its clients. ``place_again`` records the node (``TenantStore.add_spool_drain``). Once
that node's agent reports again and neither the tenant's gateway nor its engine runs there any
more (Swarm stops the old ones when the node returns), a one-off on that node reads the spool
(``manager drain-spool``) after the manager's cursors, and its records are stored: each once
(records are keyed by request id), none invented (only what that spool holds). A tenant placed
back on that node is collected there by its gateway instead. Once read, the tenant's old volumes
there are removed by that node's agent (``remove_volume``), in the tenant's reconcile turn (so
never while its containers are made) and only while it is placed elsewhere: placed back on that
node meanwhile, they are its volumes again. One that stays is named in the audit with why. A node
that leaves the swarm for good takes its spool with it: that is audited with the node, as lost."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

from manager import names
from manager.contract import DRAINED_PAGE, UsagePage
from manager.control.plan import drain_plan
from manager.control.store import TenantStore
from manager.errors import GtmError
from manager.gpu import Inventory
from manager.node_report import NodeReport
from manager.runtime.protocol import Runtime
from manager.settings import Settings

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0
ACTOR = "manager"


def drained_pages(out: str) -> list[UsagePage]:
    """The pages ``manager drain-spool`` printed, in order, from its logs (whatever a log line
    carries before them)."""
    pages = []
    for line in out.splitlines():
        at = line.find(DRAINED_PAGE)
        if at >= 0:
            pages.append(UsagePage.model_validate_json(line[at + len(DRAINED_PAGE) :]))
    return pages


class SpoolDrainer:
    """Runs on the usage loop, after the gateways' collection (``Reconciler``); swarm only."""

    def __init__(
        self,
        settings: Settings,
        store: TenantStore,
        runtime: Runtime,
        inventory: Inventory,
        reports: Callable[[], Mapping[str, NodeReport]],
        swarm_nodes: Callable[[], Mapping[str, str]],
        remove_volume: Callable[[str, str], str | None],
        tenant_turn: Callable[[str], AbstractContextManager[None]],
    ) -> None:
        self.settings, self.store, self.runtime, self.inventory = settings, store, runtime, inventory
        self.reports, self.swarm_nodes, self.remove_volume = reports, swarm_nodes, remove_volume
        self.tenant_turn = tenant_turn
        self._failed: dict[tuple[str, str], str] = {}

    def tick(self) -> None:
        pending = self.store.spool_drains()
        if not pending:
            return
        reports, members = self.reports(), self.swarm_nodes()
        on = {d.uuid: d.node for d in self.inventory.devices()}
        for tenant, node, since in pending:
            if node not in members:
                self.store.drop_spool_drain(tenant, node)
                detail = {"node": node, "since": since, "reason": "the node left the swarm, its volume with it"}
                self.store.audit(ACTOR, "drain-spool", tenant, "lost", detail)
                log.warning("usage spooled on node %s for %s is lost: the node left the swarm", node, tenant)
                continue
            report = reports.get(node)
            if report is None:
                continue  # not back yet
            if self._placed_on(tenant, node, on):
                self.store.drop_spool_drain(tenant, node)  # placed back there: its gateway is collected
                continue
            old = {names.gateway(self.settings.instance, tenant), names.engine(self.settings.instance, tenant)}
            if any(c.name in old for c in report.containers):
                continue  # its old gateway or engine still runs there: Swarm stops them, then it is read
            self.drain(tenant, node)

    def drain(self, tenant: str, node: str) -> int | None:
        """Reads the spool on ``node`` and stores its records; returns how many were new (None:
        not read this time, tried again on the next round)."""
        plan = drain_plan(self.settings, tenant, node, self.store.spool_cursors(tenant))
        try:
            code, out = self.runtime.run_to_completion(plan, DRAIN_TIMEOUT_S, log_lines=None)
            pages = drained_pages(out) if code == 0 else []
        except (GtmError, ValueError) as exc:
            code, out, pages = -1, str(exc), []
        if code != 0:
            problem = out.strip()[-500:] or f"exit code {code}"
            if self._failed.get((tenant, node)) != problem:
                self._failed[(tenant, node)] = problem
                self.store.audit(ACTOR, "drain-spool", tenant, "failed", {"node": node, "error": problem})
            log.warning("usage spooled on node %s for %s not read yet: %s", node, tenant, problem)
            return None
        self._failed.pop((tenant, node), None)
        added = 0
        for page in pages:
            added += self.store.add_usage(tenant, page.records, page.cursor, page.spool)
        read = sum(len(p.records) for p in pages)
        spool = pages[0].spool if pages else None
        kept = self._remove_volumes(tenant, node)
        self.store.drop_spool_drain(tenant, node)
        detail = {"node": node, "spool": spool, "read": read, "new": added, "volumes_kept": kept}
        self.store.audit(ACTOR, "drain-spool", tenant, "ok", detail)
        if added:
            log.warning("%d usage records of %s collected from node %s, where it was lost", added, tenant, node)
        return added

    def _placed_on(self, tenant: str, node: str, on: Mapping[str, str] | None = None) -> bool:
        """Whether the tenant's device is on ``node`` now (``on``: each device's node, read anew
        when not given)."""
        row = self.store.find_tenant(tenant)
        if row is None:
            return False
        if on is None:
            on = {d.uuid: d.node for d in self.inventory.devices()}
        return on.get(row.device) == node

    def _remove_volumes(self, tenant: str, node: str) -> dict[str, str]:
        """The tenant's old volumes on ``node``, removed by its agent now that their spool is read;
        those that stay, with why (the admin removes them there with ``docker volume rm``)."""
        volumes = (names.gateway_volume(self.settings.instance, tenant), names.volume(self.settings.instance, tenant))
        with self.tenant_turn(tenant):
            if self._placed_on(tenant, node):
                why = f"{tenant} is placed on node {node} again: they are its volumes there"
                return dict.fromkeys(volumes, why)
            return self._remove_each(tenant, node, volumes)

    def _remove_each(self, tenant: str, node: str, volumes: tuple[str, ...]) -> dict[str, str]:
        kept = {}
        for volume in volumes:
            why = self.remove_volume(node, volume)
            if why is not None:
                kept[volume] = why
                log.warning("volume %s of %s stays on node %s: %s", volume, tenant, node, why)
        return kept
