"""Usage collection: every tenant's gateway is asked for the records it spooled since the
store's cursor (``gateway_client.collect_usage``), whatever its engine is doing. The reconciler
runs it on its usage loop, and once more before a removed tenant's gateway goes."""

from __future__ import annotations

import logging

from manager import names
from manager.control.gateway_client import Connect, collect_usage, gateway_ip
from manager.control.store import TenantStore
from manager.domain import TenantStatus
from manager.errors import RuntimeUnavailable
from manager.names import Role
from manager.runtime.protocol import Runtime
from manager.settings import Settings

log = logging.getLogger(__name__)


class UsageCollector:
    def __init__(self, settings: Settings, store: TenantStore, runtime: Runtime, connect: Connect) -> None:
        self.settings, self.store, self.runtime, self.connect = settings, store, runtime, connect

    def collect_all(self) -> None:
        """Usage from every tenant's gateway, whatever its engine is doing: a gateway keeps the
        records of what it served before its engine failed or was replaced, and they are
        collected now, not once the engine is back (a tenant being removed is collected by its
        removal). One gateway's failure does not stop the others."""
        # a gateway whose health check has not passed yet (just started, or restarted) is left for
        # the next round rather than warned about: its records wait in its spool, on its volume
        gateways = self.runtime.containers(names.selector(self.settings.instance, role=Role.GATEWAY.value))
        starting = {c.tenant for c in gateways if c.health == "starting"}
        for row in self.store.tenants():
            if row.status != TenantStatus.REMOVING and row.spec.name not in starting:
                self.collect(row.spec.name, row.gateway_token)

    def collect(self, name: str, token: str) -> bool:
        ip = gateway_ip(self.runtime, self.settings, name)
        if ip is None:
            return False
        try:
            with self.connect(ip, token) as gw:
                collect_usage(self.store, name, gw)
        except RuntimeUnavailable as exc:
            log.warning("usage of %s not collected: %s", name, exc.message)
            return False
        return True
