from manager.gateway.quotas import Limits, QuotaState


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
