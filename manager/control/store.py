"""What the control plane asks of its database: the store's protocol. ``manager.control.sqlite_store``
is its SQLite implementation; another database (PostgreSQL) would implement this and pass the
same store tests (``tests/unit/test_store.py`` runs them for every implementation it lists). The
service, the reconciler and the other jobs are typed against this protocol, not the SQLite class."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from manager.contract import UsageRecord
from manager.control.records import (
    AuditRow,
    EngineFailure,
    KeyRow,
    MemberRow,
    MemberUsage,
    ReservationEvent,
    ReservationRow,
    TenantRow,
    UsageTotals,
    VolumeKeyRow,
)
from manager.domain import Quotas, TenantSpec, TenantStatus


class Tx:
    """One open transaction of a store, handed to its write methods so that the writes of one
    business action (and its audit row) commit together, all or none. Opaque: each store's own
    subclass carries what it needs (the SQLite store: its connection, which never leaves it)."""

    __slots__ = ()


class TenantStore(Protocol):
    def close(self) -> None: ...
    def transaction(self) -> AbstractContextManager[Tx]:
        """A business action's writes, all or none (``BEGIN IMMEDIATE``: no other writer between)."""
        ...

    def tenants(self) -> list[TenantRow]: ...
    def tenant(self, name: str) -> TenantRow: ...
    def find_tenant(self, name: str) -> TenantRow | None: ...
    def insert_tenant(
        self,
        tx: Tx,
        spec: TenantSpec,
        gateway_token: str = "",
        device: str = "",
        status: TenantStatus = TenantStatus.PENDING,
        reason: str = "",
    ) -> None: ...
    def update_spec(self, tx: Tx, spec: TenantSpec, device: str | None = None) -> None:
        """The new spec (and, when given, the device the tenant moves to)."""
        ...

    def set_status(self, tx: Tx, name: str, status: TenantStatus, reason: str = "") -> bool:
        """The tenant's status, where the diagram (``domain.ALLOWED_TRANSITIONS``) allows it from
        its current one; False (nothing written) where it does not, or the tenant is gone. Every
        status write of a store, its sleeps and wakes included, is checked the same way. Status
        writes never enqueue reconcile work: they only describe what was seen."""
        ...

    def note_last_request(self, name: str, at: float) -> None: ...
    def sleep_tenant(
        self, name: str, at: float, detail: dict[str, Any], reason: str = ..., action: str = "sleep"
    ) -> bool:
        """running -> asleep, counted and audited in one transaction; False when it was not running."""
        ...

    def refuse_wake(self, name: str, refusal: str, detail: dict[str, Any]) -> bool:
        """Why an asleep tenant cannot wake now ('' when it can again); True when it changed."""
        ...

    def wake_tenant(self, name: str, at: float, reason: str, detail: dict[str, Any]) -> bool:
        """asleep -> waking, counted and audited in one transaction; False when it was not asleep."""
        ...

    def woke(self, name: str, at: float) -> float | None:
        """waking -> running; returns how long the wake took (None when it was not waking)."""
        ...

    def set_kept_asleep(self, name: str, kept: int) -> None:
        """Records what the tenant's engine kept of its device, measured after it slept in place."""
        ...

    def engine_overhead(self, model: str, images: bool) -> int | None:
        """What the model's GPU engine last needed beyond its weights, images, sequences and KV
        cache (with or without images), as its start-up logged it; None: never started here."""
        ...

    def record_engine_overhead(self, model: str, images: bool, overhead: int, at: float) -> None:
        """Records it (the latest start's figure replaces the one before)."""
        ...

    def volume_key(self, tenant: str) -> VolumeKeyRow | None: ...
    def volume_keys(self) -> list[VolumeKeyRow]: ...
    def put_volume_key(self, key: VolumeKeyRow) -> None:
        """Inserts or replaces a tenant's wrapped data key."""
        ...

    def delete_volume_key(self, tenant: str) -> None:
        """Deletes it so that no copy of the database file holds it."""
        ...

    def delete_tenant(self, name: str) -> None:
        """Removes the tenant and its keys; its usage records stay for cost sharing."""
        ...

    def engine_failure(self, tenant: str) -> EngineFailure | None: ...
    def save_engine_failure(self, tenant: str, failure: EngineFailure) -> None: ...
    def clear_engine_failure(self, tenant: str) -> None: ...
    def usage_cursor(self, tenant: str, spool: str = "") -> int:
        """Where collection from the tenant's gateway ``spool`` stands (0: nothing collected)."""
        ...

    def spool_cursors(self, tenant: str) -> dict[str, int]:
        """Every cursor of the tenant's spools, by spool."""
        ...

    def add_spool_drain(self, tx: Tx, tenant: str, node: str, since: float) -> None:
        """The tenant's gateway spool is left on swarm ``node`` (lost since ``since``): it is read
        there once the node is back (``control.drains``)."""
        ...

    def spool_drains(self) -> list[tuple[str, str, float]]:
        """(tenant, node, since) of every spool waiting to be read, oldest first. A removed
        tenant's stay: its usage is kept for cost sharing."""
        ...

    def drop_spool_drain(self, tenant: str, node: str) -> None: ...
    def last_spool(self, tenant: str) -> str:
        """The spool the tenant's usage was last collected from ('' before any, or before identities)."""
        ...

    def add_usage(self, tenant: str, records: Sequence[UsageRecord], cursor: int, spool: str = "") -> int:
        """Stores records collected from a gateway's ``spool`` and advances its cursor, in one
        transaction. A record seen twice (same request id) is stored once; one written before
        members (no member) is the key's member's. Returns how many were new."""
        ...

    def last_used(self) -> dict[str, float]:
        """Each tenant's latest usage record (UNIX seconds), from the daily rollup."""
        ...

    def usage_totals(self, tenant: str, since: float, until: float | None = None) -> UsageTotals:
        """The tenant's totals over any bounds (see ``usage_by_member``)."""
        ...

    def usage_by_member(self, tenant: str, since: float, until: float | None = None) -> dict[str, UsageTotals]:
        """Each member's totals over any bounds (also members removed since: their usage stays for
        cost sharing): the whole UTC days between them from the daily rollup, only the partial days
        at either end from the records themselves."""
        ...

    def usage_counters(self) -> list[tuple[str, str, UsageTotals]]:
        """(tenant, member, totals) over all time: the manager's Prometheus counters."""
        ...

    def latencies(self, tenant: str, since: float) -> list[tuple[str, float | None, float]]:
        """(member, first token ms or None, queue ms) of each of the tenant's requests since ``since``."""
        ...

    def member_usage(self, tenant: str, day_start: float, month_start: float) -> dict[str, MemberUsage]: ...
    def usage_tenants(self, since: float, until: float) -> list[str]:
        """The tenants with usage between two UTC day starts."""
        ...

    def usage_daily(self, tenant: str, since: float) -> list[tuple[str, int, int]]:
        """(UTC day, requests, tokens) per day from the day of ``since``."""
        ...

    def usage_records(self, tenant: str, limit: int = 1000) -> list[dict[str, Any]]: ...
    def insert_member(
        self, tx: Tx, tenant: str, name: str, quotas: Quotas, now: float, weight: float = 1.0
    ) -> None: ...
    def members(self, tenant: str) -> list[MemberRow]: ...
    def member(self, tenant: str, name: str) -> MemberRow: ...
    def update_member(self, tx: Tx, tenant: str, name: str, quotas: Quotas, weight: float = 1.0) -> None: ...
    def delete_member(self, tx: Tx, tenant: str, name: str) -> None:
        """Removes the member and its keys; its usage records stay for cost sharing."""
        ...

    def insert_key(self, tx: Tx, key: KeyRow) -> None: ...
    def expire_keys(self, tx: Tx, tenant: str, member: str, at: float) -> None:
        """Ends a member's keys at ``at`` (those that would last longer)."""
        ...

    def expire_key(self, tx: Tx, tenant: str, key_id: str, at: float) -> None: ...
    def keys(self, tenant: str, member: str | None = None) -> list[KeyRow]:
        """The tenant's keys (or one member's), oldest first."""
        ...

    def audit(
        self,
        actor: str,
        action: str,
        tenant: str | None,
        result: str,
        detail: dict[str, Any] | None = None,
        tx: Tx | None = None,
    ) -> None: ...
    def audit_actions(self) -> list[str]: ...
    def insert_reservation(self, tx: Tx, tenant: str, event: ReservationEvent, gpu_memory: int, at: float) -> None:
        """In the transaction of the change it records."""
        ...

    def reservations(self) -> list[ReservationRow]:
        """Every reservation change, oldest first (a few per tenant's life, however busy it was)."""
        ...

    def audit_log(
        self, tenant: str | None = None, action: str | None = None, limit: int = 200, before: int | None = None
    ) -> list[AuditRow]:
        """Newest first; ``before``: only entries older than that id (the next page)."""
        ...
