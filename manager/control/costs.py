"""Cost sharing: a month's host cost split by reserved memory-hours and, side by side, by tokens;
then, inside each tenant, the tenant's cost (by memory: what its reservation costs) split between
its members by their tokens and, side by side, by their requests.

Reservations over time come from the audit trail (add-tenant, successful
update-tenant with a new size, remove-tenant), so a tenant that was resized or
removed mid-month pays for what it held, when it held it.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, datetime

from manager.control.store import AuditRow, Store, UsageTotals
from manager.errors import InvalidInput

GIB = 1024**3


@dataclass(frozen=True)
class MemberShare:
    """A member's part of its tenant: shares are of the tenant's tokens and requests; costs are
    those shares of the tenant's cost by memory."""

    member: str
    tokens: int
    requests: int
    share_by_tokens: float
    cost_by_tokens: float
    share_by_requests: float
    cost_by_requests: float


@dataclass(frozen=True)
class Share:
    tenant: str
    gib_hours: float
    tokens: int
    requests: int
    share_by_memory: float
    cost_by_memory: float
    share_by_tokens: float
    cost_by_tokens: float
    members: list[MemberShare] = field(default_factory=list)


def member_shares(usage: dict[str, UsageTotals], tenant_cost: float) -> list[MemberShare]:
    tokens = sum(u.tokens for u in usage.values())
    requests = sum(u.requests for u in usage.values())
    out = []
    for member, u in sorted(usage.items()):
        by_tokens = u.tokens / tokens if tokens else 0.0
        by_requests = u.requests / requests if requests else 0.0
        out.append(
            MemberShare(
                member or "(unattributed)",
                u.tokens,
                u.requests,
                round(by_tokens, 6),
                round(by_tokens * tenant_cost, 2),
                round(by_requests, 6),
                round(by_requests * tenant_cost, 2),
            )
        )
    return out


def month_bounds(month: str) -> tuple[float, float]:
    try:
        year, mon = (int(x) for x in month.split("-"))
        start = datetime(year, mon, 1, tzinfo=UTC)
    except ValueError as exc:
        raise InvalidInput(f"invalid month {month!r}: use YYYY-MM, e.g. 2026-11") from exc
    days = calendar.monthrange(year, mon)[1]
    return start.timestamp(), start.timestamp() + days * 86400


def reservation_intervals(audit: list[AuditRow], now: float) -> dict[str, list[tuple[float, float, int]]]:
    """Per tenant: (start, end, bytes) for every period with a constant reservation."""
    out: dict[str, list[tuple[float, float, int]]] = {}
    current: dict[str, tuple[float, int]] = {}
    for row in sorted(audit, key=lambda r: r.id):
        if row.result != "ok" or not row.tenant:
            continue
        held = current.get(row.tenant)
        size = row.detail.get("gpu_memory")
        if row.action == "add-tenant" and isinstance(size, int):
            current[row.tenant] = (row.at, size)
        elif row.action == "update-tenant" and isinstance(size, int) and held:
            out.setdefault(row.tenant, []).append((held[0], row.at, held[1]))
            current[row.tenant] = (row.at, size)
        elif row.action == "remove-tenant" and held:
            out.setdefault(row.tenant, []).append((held[0], row.at, held[1]))
            del current[row.tenant]
    for tenant, (start, size) in current.items():
        out.setdefault(tenant, []).append((start, now, size))
    return out


def split(month: str, total_cost: float, store: Store, now: float) -> list[Share]:
    if total_cost < 0:
        raise InvalidInput("the month's cost must be 0 or more")
    start, end = month_bounds(month)
    intervals = reservation_intervals(store.audit_log(limit=1_000_000), now)
    hours: dict[str, float] = {}
    for tenant, spans in intervals.items():
        for a, b, size in spans:
            overlap = min(b, end) - max(a, start)
            if overlap > 0:
                hours[tenant] = hours.get(tenant, 0.0) + overlap / 3600 * size / GIB
    tenants = sorted(set(hours) | {t for t in store.usage_tenants(start, end)})
    by_member = {t: store.usage_by_member(t, start, end) for t in tenants}
    usage = {
        t: UsageTotals(
            sum(u.requests for u in m.values()),
            sum(u.prompt_tokens for u in m.values()),
            sum(u.completion_tokens for u in m.values()),
        )
        for t, m in by_member.items()
    }
    total_hours = sum(hours.values())
    total_tokens = sum(u.tokens for u in usage.values())
    shares = []
    for t in tenants:
        mem = hours.get(t, 0.0) / total_hours if total_hours else 0.0
        tok = usage[t].tokens / total_tokens if total_tokens else 0.0
        members = member_shares(by_member[t], round(mem * total_cost, 2))
        shares.append(
            Share(
                t,
                round(hours.get(t, 0.0), 4),
                usage[t].tokens,
                usage[t].requests,
                round(mem, 6),
                round(mem * total_cost, 2),
                round(tok, 6),
                round(tok * total_cost, 2),
                members,
            )
        )
    return shares
