"""What a gateway knows: the keys and limits the manager pushed, its quota state,
its store and its metrics. Shared by the public proxy and the admin app."""

from __future__ import annotations

import hmac
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from manager.control.keys import hash_key, key_id
from manager.gateway.quotas import Limits, QuotaState
from manager.gateway.store import GatewayStore, UsageRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyEntry:
    id: str
    hash: str
    expires_at: float | None


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("gtm_gateway_requests", "Requests by path and status", ["path", "status"], registry=r)
        self.tokens = Counter("gtm_gateway_tokens", "Tokens metered", ["kind"], registry=r)
        self.limited = Counter("gtm_gateway_rate_limited", "429s by reason", ["reason"], registry=r)
        self.upstream_errors = Counter("gtm_gateway_upstream_errors", "Engine unreachable or failing", registry=r)
        self.spool_errors = Counter(
            "gtm_gateway_spool_errors",
            "Usage records the spool could not take at once (kept in memory and written first once it can)",
            registry=r,
        )
        self.latency = Histogram(
            "gtm_gateway_request_seconds",
            "Request latency through the gateway",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )


class GatewayState:
    def __init__(self, store: GatewayStore) -> None:
        self.store = store
        self.keys: dict[str, KeyEntry] = {}
        self.version = ""
        self.quotas = QuotaState()
        self.metrics = GatewayMetrics()
        self.max_model_len: int | None = None
        """The engine's context length: no request uses more tokens (prompt plus completion)."""
        self.max_body: int | None = None
        """The tenant's request body limit (bytes); the gateway's setting when the manager sent none."""
        self.unwritten: list[UsageRecord] = []
        """Records the spool could not take (its volume full): written first, in order, once it can."""
        self.spool_error: str | None = None
        saved = store.config()
        if saved:
            self.apply(saved, persist=False)
        now = time.time()
        day_start = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        month_start = (
            datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
        )
        _, day_tokens = store.totals_since(day_start)
        month_requests, _ = store.totals_since(month_start)
        self.quotas.load(day_tokens=day_tokens, month_requests=month_requests, recent=store.recent_times(60))

    def apply(self, body: dict[str, Any], persist: bool = True) -> None:
        """Install a config pushed by the manager; limits change without a restart."""
        keys = {k["id"]: KeyEntry(k["id"], k["hash"], k.get("expires_at")) for k in body.get("keys", [])}
        limits = Limits(**{k: body.get("limits", {}).get(k) for k in Limits.__dataclass_fields__})
        if persist:
            self.store.save_config(body)
        self.keys = keys
        self.quotas.limits = limits
        length = body.get("max_model_len")
        self.max_model_len = int(length) if isinstance(length, int) and length > 0 else None
        limit = body.get("max_body")
        self.max_body = int(limit) if isinstance(limit, int) and limit > 0 else None
        self.version = str(body.get("version", ""))

    def record(self, rec: UsageRecord) -> bool:
        """Commits a usage record; when the spool cannot take it, keeps it in memory (never lost
        while the gateway lives) and returns False."""
        self.unwritten.append(rec)
        return self.flush()

    def flush(self) -> bool:
        """Writes the records kept in memory; True when the spool takes records again."""
        while self.unwritten:
            try:
                self.store.record(self.unwritten[0])
            except (sqlite3.Error, OSError) as exc:
                if self.spool_error is None:
                    log.error("usage spool cannot be written (%s): refusing requests until it can", exc)
                self.spool_error = str(exc)
                self.metrics.spool_errors.inc()
                return False
            self.unwritten.pop(0)
        if self.spool_error is not None:
            log.warning("usage spool writable again; every record kept in memory is written")
            self.spool_error = None
        return True

    def authenticate(self, presented: str) -> KeyEntry | None:
        kid = key_id(presented)
        entry = self.keys.get(kid) if kid else None
        if entry is None:
            return None
        if not hmac.compare_digest(hash_key(presented), entry.hash):
            return None
        if entry.expires_at is not None and entry.expires_at <= time.time():
            return None
        return entry
