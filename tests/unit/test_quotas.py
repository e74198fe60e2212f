from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manager.gateway.quotas import (
    Limits,
    QuotaState,
    admit,
    day_of,
    month_of,
    seconds_to_next_day,
    seconds_to_next_month,
)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rpm_admits_exactly_the_limit_and_reports_headers() -> None:
    clock = Clock()
    q = QuotaState(Limits(rpm_limit=3), clock)
    verdicts = [q.admit(0) for _ in range(5)]
    assert [v.refusal is None for v in verdicts] == [True, True, True, False, False]
    refused = verdicts[3]
    assert refused.refusal is not None and refused.refusal.code == "rate_limit_exceeded"
    assert refused.refusal.type == "requests"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["retry-after"] == "60"
    clock.t += 60.001
    assert q.admit(0).refusal is None


def test_tokens_per_day_reserves_then_settles() -> None:
    clock = Clock()
    q = QuotaState(Limits(tokens_per_day=1000), clock)
    a = q.admit(600)
    b = q.admit(600)  # would overrun while a is in flight
    assert a.ticket is not None and b.refusal is not None
    assert b.refusal.type == "tokens"
    assert "remaining 400" in b.refusal.message
    q.settle(a.ticket, 150)
    q.settle(a.ticket, 150)  # settling twice changes nothing
    assert q.day_tokens == 150 and q.day_reserved == 0 and q.in_flight == 0
    assert q.admit(850).refusal is None
    assert q.admit(1).refusal is not None


def test_concurrent_reservations_never_exceed_the_day() -> None:
    q = QuotaState(Limits(tokens_per_day=10_000), Clock())
    tickets = [v.ticket for v in (q.admit(700) for _ in range(50)) if v.ticket]
    assert len(tickets) == 14  # 14 * 700 = 9800 <= 10000 < 15 * 700
    for t in tickets:
        q.settle(t, 700)
    assert q.day_tokens <= 10_000


def test_day_rolls_over_at_utc_midnight() -> None:
    clock = Clock(1_800_000_000.0)
    q = QuotaState(Limits(tokens_per_day=100), clock)
    t = q.admit(100).ticket
    assert t is not None
    q.settle(t, 100)
    assert q.admit(1).refusal is not None
    clock.t += 86_400
    assert q.admit(1).refusal is None


def test_monthly_quota_is_insufficient_quota() -> None:
    q = QuotaState(Limits(requests_per_month=2), Clock())
    q.admit(0)
    q.admit(0)
    refusal = q.admit(0).refusal
    assert refusal is not None and refusal.type == "insufficient_quota" and refusal.code == "insufficient_quota"


def test_in_flight_cap() -> None:
    q = QuotaState(Limits(max_in_flight=1), Clock())
    first = q.admit(0).ticket
    assert first is not None
    assert q.admit(0).refusal is not None
    q.settle(first, 0)
    assert q.admit(0).refusal is None


def test_restart_state_is_rebuilt_from_records() -> None:
    clock = Clock()
    q = QuotaState(Limits(rpm_limit=2, tokens_per_day=100), clock)
    q.load(day_tokens=90, month_requests=5, recent=[clock.t - 10, clock.t - 120])
    assert len(q.window) == 1
    assert q.admit(20).refusal is not None  # 90 + 20 > 100
    assert q.admit(5).refusal is None
    assert q.admit(5).refusal is not None  # rpm: one from before the restart + this one


# ---------------------------------------------------------------- members nested in the tenant
def nested(tenant: Limits, **members: Limits) -> tuple[QuotaState, dict[str, QuotaState], Clock]:
    clock = Clock()
    t = QuotaState(tenant, clock, scope="tenant", who="tenant lab")
    return t, {n: QuotaState(lim, clock, scope="member", who=f"member {n}") for n, lim in members.items()}, clock


def test_each_members_rpm_is_exact_and_the_tenant_caps_their_sum() -> None:
    tenant, m, _ = nested(Limits(rpm_limit=5), alice=Limits(rpm_limit=2), bob=Limits(rpm_limit=4))
    alice = [admit([m["alice"], tenant], 0) for _ in range(4)]
    assert [v.refusal is None for v in alice] == [True, True, False, False]
    refused = alice[2].refusal
    assert refused is not None and refused.scope == "member" and "member alice" in refused.message
    assert alice[2].headers["x-ratelimit-scope"] == "member"
    bob = [admit([m["bob"], tenant], 0) for _ in range(4)]
    # the tenant has 3 left of its 5: bob's own limit (4) is not reached, the tenant's is
    assert [v.refusal is None for v in bob] == [True, True, True, False]
    last = bob[3].refusal
    assert last is not None and last.scope == "tenant" and "tenant lab" in last.message
    assert tenant.window.__len__() == 5 and len(m["alice"].window) == 2 and len(m["bob"].window) == 3


def test_a_refused_request_is_counted_in_neither_limit() -> None:
    tenant, m, _ = nested(Limits(tokens_per_day=1000), alice=Limits(tokens_per_day=300))
    assert admit([m["alice"], tenant], 400).refusal is not None  # alice's own day: refused
    assert (tenant.day_reserved, tenant.in_flight, tenant.month_requests) == (0, 0, 0)
    ok = admit([m["alice"], tenant], 300)
    assert ok.ticket is not None
    assert (tenant.day_reserved, m["alice"].day_reserved) == (300, 300)
    ok.ticket.settle(120)
    ok.ticket.settle(120)  # once only
    assert (tenant.day_tokens, m["alice"].day_tokens, tenant.in_flight, m["alice"].in_flight) == (120, 120, 0, 0)


def test_tokens_per_day_is_never_exceeded_by_a_burst_from_every_member() -> None:
    tenant, m, _ = nested(
        Limits(tokens_per_day=10_000), a=Limits(tokens_per_day=4_000), b=Limits(tokens_per_day=4_000), c=Limits()
    )
    tickets = []
    for i in range(90):
        who = m["abc"[i % 3]]
        v = admit([who, tenant], 500)
        if v.ticket:
            tickets.append((who, v.ticket))
    for _, t in tickets:
        t.settle(500)
    assert tenant.day_tokens <= 10_000
    assert m["a"].day_tokens <= 4_000 and m["b"].day_tokens <= 4_000
    assert tenant.day_tokens == sum(s.day_tokens for s in m.values())


def test_the_headers_describe_the_tighter_of_the_two() -> None:
    tenant, m, _ = nested(Limits(rpm_limit=100, tokens_per_day=1_000), alice=Limits(rpm_limit=3, tokens_per_day=50_000))
    v = admit([m["alice"], tenant], 10)
    assert v.ticket is not None
    # requests: alice has 2 of 3 left (the tenant 99 of 100); tokens: the tenant has 990 left (alice 49,990)
    assert v.headers["x-ratelimit-limit-requests"] == "3"
    assert v.headers["x-ratelimit-remaining-requests"] == "2"
    assert v.headers["x-ratelimit-limit-tokens"] == "1000"
    assert v.headers["x-ratelimit-remaining-tokens"] == "990"


def test_in_flight_and_monthly_limits_of_a_member() -> None:
    tenant, m, _ = nested(Limits(), alice=Limits(max_in_flight=1, requests_per_month=2))
    first = admit([m["alice"], tenant], 0)
    busy = admit([m["alice"], tenant], 0)
    assert busy.refusal is not None and busy.refusal.reason == "in_flight" and busy.refusal.scope == "member"
    assert first.ticket is not None
    first.ticket.settle(0)
    second = admit([m["alice"], tenant], 0)
    assert second.ticket is not None
    second.ticket.settle(0)
    over = admit([m["alice"], tenant], 0)
    assert over.refusal is not None and over.refusal.code == "insufficient_quota"
    assert admit([tenant], 0).refusal is None  # a key without a member: the tenant's limits only


@given(st.lists(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False), min_size=1, max_size=50))
def test_day_and_month_boundaries_from_the_cache_are_what_datetime_says(moments: list[float]) -> None:
    """Computed once per UTC day, in whatever order moments come (a late settle asks about an old
    one): always what ``datetime`` says for that moment."""
    for ts in moments + [m + 86_400 * k for m in moments[:3] for k in (-1, 1, 31)] + [86_400 * 20_000 - 1e-3]:
        if ts < 0:
            continue
        now = datetime.fromtimestamp(ts, UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        month_end = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
        assert day_of(ts) == now.strftime("%Y-%m-%d") and month_of(ts) == now.strftime("%Y-%m")
        assert seconds_to_next_day(ts) == pytest.approx((day + timedelta(days=1)).timestamp() - ts, abs=1e-6)
        assert seconds_to_next_month(ts) == pytest.approx(month_end.timestamp() - ts, abs=1e-6)
