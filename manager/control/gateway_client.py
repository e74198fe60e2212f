"""The manager's side of the gateway admin API: push config, read usage by cursor.

The manager calls the gateways; the gateways never need the manager."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from manager.control.plan import GATEWAY_ADMIN_PORT
from manager.control.store import Store
from manager.errors import RuntimeUnavailable


def desired_config(store: Store, tenant: str) -> dict[str, Any]:
    """Key hashes (active or in their grace period), limits, and the engine's context length (a
    request's prompt plus completion never exceeds it: the token reservation's upper bound);
    ``version`` is their hash."""
    row = store.tenant(tenant)
    now = time.time()
    keys = [{"id": k.id, "hash": k.hash, "expires_at": k.expires_at} for k in store.keys(tenant) if k.active(now)]
    limits = dict(row.spec.quotas.__dict__)
    body = {"keys": keys, "limits": limits, "max_model_len": row.spec.max_model_len, "max_body": row.spec.max_body}
    version = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": version, **body}


class GatewayAdmin(Protocol):
    """The manager's view of one gateway's admin port (``GatewayClient`` over HTTP; tests use a fake)."""

    def __enter__(self) -> GatewayAdmin: ...

    def __exit__(self, *exc: object) -> None: ...

    def version(self) -> str: ...

    def push(self, config: dict[str, Any]) -> None: ...

    def usage(self, after: int, limit: int = 1000) -> tuple[list[dict[str, Any]], int]: ...


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
        return str(self._call("GET", "/admin/config")["version"])

    def push(self, config: dict[str, Any]) -> None:
        self._call("PUT", "/admin/config", json=config)

    def usage(self, after: int, limit: int = 1000) -> tuple[list[dict[str, Any]], int]:
        body = self._call("GET", "/admin/usage", params={"after": after, "limit": limit})
        return list(body["records"]), int(body["cursor"])


def push_config(store: Store, tenant: str, gw: GatewayAdmin) -> bool:
    """Level-triggered: pushes the desired config when the gateway's version differs. True if pushed."""
    config = desired_config(store, tenant)
    if gw.version() == config["version"]:
        return False
    gw.push(config)
    return True


def collect_usage(store: Store, tenant: str, gw: GatewayAdmin) -> int:
    """Collects every usage record after the stored cursor; returns how many were new.
    Idempotent: a record seen twice is stored once, and the cursor only moves forward."""
    added = 0
    cursor = store.usage_cursor(tenant)
    while True:
        records, next_cursor = gw.usage(cursor)
        if not records:
            return added
        added += store.add_usage(tenant, records, next_cursor)
        cursor = next_cursor
