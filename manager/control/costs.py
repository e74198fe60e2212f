"""Cost sharing: a month's host cost split by reserved memory-hours and, side by side, by tokens;
then, inside each tenant, the tenant's cost (by memory: what its reservation costs) split between
its members by their tokens and, side by side, by their requests.

Reservations over time come from the store's typed reservation rows (written with each
add-tenant, each update-tenant that changes the size and each remove-tenant, in the same
transaction), so a tenant that was resized or removed mid-month pays for what it held, when it
held it. A name removed and added again is two tenants (two incarnations), each with its own row.

A tenant asleep (``TenantSpec.idle_sleep_s``, or put to sleep by overcommit) frees its
reservation: its asleep memory-hours are priced apart, at ``asleep_rate`` times an awake one's
(the admin sets it). The default prices what a sleeper keeps of the device (``Platform.kept_asleep``): its
engine's CUDA context on a GPU, where the engine sleeps in place; nothing in cpu mode, where it is
stopped. The same reservation rows say when it slept and woke.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, datetime

from manager.control.records import ReservationEvent, ReservationRow, UsageTotals
from manager.control.store import TenantStore
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
    """What the memory share is of: awake GiB-hours plus asleep ones at the asleep rate."""
    tokens: int
    requests: int
    share_by_memory: float
    cost_by_memory: float
    share_by_tokens: float
    cost_by_tokens: float
    members: list[MemberShare] = field(default_factory=list)
    added_at: float | None = None
    """When this tenant was added; a name removed and added again is two rows, one per life."""
    removed_at: float | None = None
    gib_hours_awake: float = 0.0
    gib_hours_asleep: float = 0.0
    """Reserved GiB-hours while asleep, before the asleep rate (or what a sleeper keeps) prices them."""


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


@dataclass
class Incarnation:
    """One life of a tenant name, from its add to its removal: a name removed and added again is
    two tenants, each with its own reservation and its own usage."""

    tenant: str
    added_at: float | None  # None: usage with no add in the audit trail (a database older than it)
    removed_at: float | None = None
    spans: list[tuple[float, float, int, bool]] = field(default_factory=list)  # (start, end, bytes, asleep)


def incarnations(reservations: list[ReservationRow], now: float) -> list[Incarnation]:
    """Every tenant's lives, oldest first, each with a span per constant size and state (awake or asleep)."""
    out: list[Incarnation] = []
    current: dict[str, tuple[Incarnation, float, int, bool]] = {}
    for row in reservations:  # oldest first
        held = current.get(row.tenant)
        if row.event == ReservationEvent.ADD:
            if held:  # an add while alive cannot happen; if it did, the older life ends here
                held[0].spans.append((held[1], row.at, held[2], held[3]))
            life = Incarnation(row.tenant, row.at)
            out.append(life)
            current[row.tenant] = (life, row.at, row.gpu_memory, False)
        elif held and row.event in (ReservationEvent.RESIZE, ReservationEvent.SLEEP, ReservationEvent.WAKE):
            life, start, _, asleep = held
            life.spans.append((start, row.at, held[2], asleep))
            if row.event != ReservationEvent.RESIZE:
                asleep = row.event == ReservationEvent.SLEEP
            current[row.tenant] = (life, row.at, row.gpu_memory, asleep)
        elif row.event == ReservationEvent.REMOVE and held:
            held[0].spans.append((held[1], row.at, held[2], held[3]))
            held[0].removed_at = row.at
            del current[row.tenant]
    for life, start, size, asleep in current.values():
        life.spans.append((start, now, size, asleep))
    return out


def _usage_windows(lives: list[Incarnation]) -> list[tuple[Incarnation, float, float | None]]:
    """The usage each life of one name owns: from its add to the next add of the name (a removal's
    last collection lands after the removal), the first life also anything before it."""
    windows = []
    for i, life in enumerate(lives):
        since = 0.0 if i == 0 else float(life.added_at or 0.0)
        until = lives[i + 1].added_at if i + 1 < len(lives) else None
        windows.append((life, since, until))
    return windows


def split(
    month: str,
    total_cost: float,
    store: TenantStore,
    now: float,
    asleep_rate: float | None = None,
    kept_asleep: int = 0,
) -> list[Share]:
    """``asleep_rate``: what an asleep GiB-hour costs, as a fraction of an awake one (0 to 1);
    None: the memory a sleeper keeps (``kept_asleep`` bytes, at most its reservation) is priced
    as awake memory, the rest of its reservation not at all."""
    if total_cost < 0:
        raise InvalidInput("the month's cost must be 0 or more")
    if asleep_rate is not None and not 0.0 <= asleep_rate <= 1.0:
        raise InvalidInput(f"the asleep rate is a fraction of the awake one, from 0 to 1; got {asleep_rate:g}")
    start, end = month_bounds(month)
    lives: dict[str, list[Incarnation]] = {}
    for life in incarnations(store.reservations(), now):
        lives.setdefault(life.tenant, []).append(life)
    for tenant in store.usage_tenants(start, end):
        lives.setdefault(tenant, [Incarnation(tenant, None)])
    rows: list[tuple[Incarnation, tuple[float, float, float], dict[str, UsageTotals]]] = []
    for tenant in sorted(lives):
        for life, since, until in _usage_windows(lives[tenant]):
            awake = asleep = priced = 0.0  # GiB-hours
            for a, b, size, sleeping in life.spans:
                hours = max(min(b, end) - max(a, start), 0.0) / 3600
                if not sleeping:
                    awake += hours * size / GIB
                    priced += hours * size / GIB
                    continue
                asleep += hours * size / GIB
                kept = size * asleep_rate if asleep_rate is not None else min(kept_asleep, size)
                priced += hours * kept / GIB
            lo, hi = max(since, start), end if until is None else min(until, end)
            by_member = store.usage_by_member(tenant, lo, hi) if hi > lo else {}
            if awake + asleep > 0 or by_member:
                rows.append((life, (awake, asleep, priced), by_member))
    total_hours = sum(hours[2] for _, hours, _ in rows)
    total_tokens = sum(u.tokens for _, _, m in rows for u in m.values())
    shares = []
    for life, (awake, asleep, hours), by_member in rows:
        usage = sum(by_member.values(), UsageTotals(0, 0, 0))
        mem = hours / total_hours if total_hours else 0.0
        tok = usage.tokens / total_tokens if total_tokens else 0.0
        shares.append(
            Share(
                life.tenant,
                round(hours, 4),
                usage.tokens,
                usage.requests,
                round(mem, 6),
                round(mem * total_cost, 2),
                round(tok, 6),
                round(tok * total_cost, 2),
                member_shares(by_member, round(mem * total_cost, 2)),
                life.added_at,
                life.removed_at,
                round(awake, 4),
                round(asleep, 4),
            )
        )
    return shares
