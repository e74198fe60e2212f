"""The manager's side of the gateway admin API: push config, read usage by cursor.

The manager calls the gateways; the gateways never need the manager."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import ValidationError

from manager import names
from manager.contract import (
    HOLD_TIMEOUT_S,
    MAX_WAITING,
    Contract,
    EngineSleep,
    GatewayActivity,
    GatewayConfig,
    GatewayStatus,
    KeyConfig,
    MemberConfig,
    UsagePage,
)
from manager.control.plan import GATEWAY_ADMIN_PORT, control_network_name
from manager.control.store import TenantStore
from manager.domain import TenantStatus
from manager.errors import RuntimeUnavailable
from manager.runtime.protocol import Runtime
from manager.settings import Settings

ContractT = TypeVar("ContractT", bound=Contract)
HOLDING = frozenset({TenantStatus.ASLEEP, TenantStatus.WAKING})
"""The statuses whose gateway holds requests until the engine serves again."""
ENGINE_CALL_S = 330.0
"""A sleep or wake in place waits for the engine (the gateway gives it 300 s)."""


def gateway_ip(runtime: Runtime, settings: Settings, tenant: str) -> str | None:
    """The address of a tenant's gateway on the control network; None while it has none."""
    return runtime.container_ip(names.gateway(settings.instance, tenant), control_network_name(settings))


def desired_config(
    store: TenantStore,
    tenant: str,
    hold_timeout_s: float = HOLD_TIMEOUT_S,
    max_waiting: int = MAX_WAITING,
    concurrency: int | None = None,
) -> GatewayConfig:
    """Key hashes (active or in their grace period) with their members, the tenant's and each
    member's limits, and the engine's context length (a request's prompt plus completion never
    exceeds it: the token reservation's upper bound), and whether requests are held (the tenant is
    asleep or waking); ``version`` is their hash."""
    row = store.tenant(tenant)
    now = time.time()
    body = GatewayConfig(
        version="",
        keys=[
            KeyConfig(id=k.id, hash=k.hash, member=k.member, expires_at=k.expires_at)
            for k in store.keys(tenant)
            if k.active(now)
        ],
        limits=row.spec.quotas,
        members=[MemberConfig(name=m.name, limits=m.quotas, weight=m.weight) for m in store.members(tenant)],
        max_model_len=row.spec.max_model_len,
        max_body=row.spec.max_body,
        max_images=row.spec.max_images,
        max_image_pixels=row.spec.max_image_pixels,
        hold=row.status in HOLDING,
        hold_refusal=row.sleep.wake_refusal if row.status == TenantStatus.ASLEEP else "",
        hold_timeout_s=hold_timeout_s,
        max_waiting=max_waiting,
        concurrency=concurrency,
        fair_queue=row.spec.fair_queue,
    )
    version = hashlib.sha256(body.model_dump_json(exclude={"version"}).encode()).hexdigest()[:16]
    return body.model_copy(update={"version": version})


class GatewayAdmin(Protocol):
    """The manager's view of one gateway's admin port (``GatewayClient`` over HTTP; tests use a fake)."""

    def __enter__(self) -> GatewayAdmin: ...

    def __exit__(self, *exc: object) -> None: ...

    def version(self) -> str: ...

    def push(self, config: GatewayConfig) -> None: ...

    def usage(self, after: int, limit: int = 1000) -> UsagePage: ...

    def activity(self) -> GatewayActivity: ...

    def engine_sleeping(self) -> bool: ...

    def engine_sleep(self) -> bool: ...

    def engine_wake(self) -> bool: ...


Connect = Callable[[str, str], GatewayAdmin]
"""Opens a gateway's admin port from its address and token."""


class GatewayClient:
    def __init__(self, ip: str, token: str, timeout: float = 10.0) -> None:
        self._client = httpx.Client(
            base_url=f"http://{ip}:{GATEWAY_ADMIN_PORT}", timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise RuntimeUnavailable(f"gateway admin {method} {path} failed: {exc}") from exc
        return response.json()

    def version(self) -> str:
        return self._page(GatewayStatus, self._call("GET", "/admin/config")).version

    def push(self, config: GatewayConfig) -> None:
        self._call(
            "PUT", "/admin/config", content=config.model_dump_json(), headers={"content-type": "application/json"}
        )

    def usage(self, after: int, limit: int = 1000) -> UsagePage:
        return self._page(UsagePage, self._call("GET", "/admin/usage", params={"after": after, "limit": limit}))

    def activity(self) -> GatewayActivity:
        return self._page(GatewayActivity, self._call("GET", "/admin/activity"))

    def engine_sleeping(self) -> bool:
        """Whether the tenant's engine sleeps in place (vLLM's sleep mode)."""
        return self._page(EngineSleep, self._call("GET", "/admin/engine/sleeping")).sleeping

    def engine_sleep(self) -> bool:
        return self._page(EngineSleep, self._call("POST", "/admin/engine/sleep", timeout=ENGINE_CALL_S)).sleeping

    def engine_wake(self) -> bool:
        return self._page(EngineSleep, self._call("POST", "/admin/engine/wake", timeout=ENGINE_CALL_S)).sleeping

    @staticmethod
    def _page(model: type[ContractT], body: object) -> ContractT:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise RuntimeUnavailable(f"a gateway's admin port answered outside the contract: {exc}") from exc


def push_config(
    store: TenantStore,
    tenant: str,
    gw: GatewayAdmin,
    hold_timeout_s: float = HOLD_TIMEOUT_S,
    max_waiting: int = MAX_WAITING,
    concurrency: int | None = None,
) -> bool:
    """Level-triggered: pushes the desired config when the gateway's version differs. True if pushed."""
    config = desired_config(store, tenant, hold_timeout_s, max_waiting, concurrency)
    if gw.version() == config.version:
        return False
    gw.push(config)
    return True


def collect_usage(store: TenantStore, tenant: str, gw: GatewayAdmin) -> int:
    """Collects every usage record after the stored cursor of the gateway's spool; returns how
    many were new. Idempotent: a record seen twice is stored once, and a cursor only moves forward.
    A gateway whose spool is not the one collected last (a new volume: its tenant placed on another
    node; or an earlier one back) is read from where its own spool stands, its start if new."""
    added = 0
    spool = store.last_spool(tenant)
    page = gw.usage(store.usage_cursor(tenant, spool))
    if page.spool != spool:
        spool = page.spool
        page = gw.usage(store.usage_cursor(tenant, spool))
    while page.records:
        added += store.add_usage(tenant, page.records, page.cursor, spool)
        page = gw.usage(page.cursor)
    return added
