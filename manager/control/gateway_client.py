"""The manager's side of the gateway admin API: push config, read usage by cursor.

The manager calls the gateways; the gateways never need the manager."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx

from manager.control.plan import GATEWAY_ADMIN_PORT
from manager.control.store import Store
from manager.errors import RuntimeUnavailable


def desired_config(store: Store, tenant: str) -> dict[str, Any]:
    """Key hashes (active or in their grace period) and limits; ``version`` is their hash."""
    row = store.tenant(tenant)
    now = time.time()
    keys = [{"id": k.id, "hash": k.hash, "expires_at": k.expires_at} for k in store.keys(tenant) if k.active(now)]
    limits = dict(row.spec.quotas.__dict__)
    body = {"keys": keys, "limits": limits}
    version = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": version, **body}


class GatewayClient:
    def __init__(self, ip: str, token: str, timeout: float = 10.0) -> None:
        self._client = httpx.Client(base_url=f"http://{ip}:{GATEWAY_ADMIN_PORT}", timeout=timeout,
                                    headers={"Authorization": f"Bearer {token}"})

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


def sync_gateway(store: Store, tenant: str, ip: str, token: str) -> int:
    """Level-triggered: push the config if the gateway's differs, then collect every new usage
    record. Returns how many records were new."""
    config = desired_config(store, tenant)
    added = 0
    with GatewayClient(ip, token) as gw:
        if gw.version() != config["version"]:
            gw.push(config)
        cursor = store.usage_cursor(tenant)
        while True:
            records, next_cursor = gw.usage(cursor)
            if not records:
                return added
            added += store.add_usage(tenant, records, next_cursor)
            cursor = next_cursor
