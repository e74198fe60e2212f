"""Exact quota decisions for one tenant, made in memory on the gateway's event loop.

``admit`` is one synchronous decision (no await inside), so concurrent requests
cannot both take the last unit. Token quotas reserve an upper bound of what a
request can use when it is admitted (``max_tokens`` plus the prompt's size in
bytes, since a byte-level token is at least one byte) and settle to the real
usage afterwards, so concurrency cannot overrun them.

A member's limits nest inside its tenant's (``admit`` with both states): a request must
pass both, and is counted in both or in neither.

Errors follow OpenAI: ``rate_limit_exceeded`` (type ``requests`` or ``tokens``)
for per-minute, per-day and in-flight limits; ``insufficient_quota`` for the
monthly request quota.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from manager.domain import Quotas

Limits = Quotas  # the gateway enforces exactly the quotas the manager stores

WINDOW_S = 60.0


@dataclass
class Ticket:
    """What one admitted request holds in each quota it passed (the member's and the tenant's)."""

    parts: list[tuple[QuotaState, int, str]]
    """(state, tokens reserved in it, the UTC day of the reservation)"""
    at: float = 0.0
    """When it was admitted (its entry in each per-minute window)."""
    settled: bool = False

    def settle(self, used_tokens: int) -> None:
        """Replace the reservations by what the request really used (once)."""
        if self.settled:
            return
        self.settled = True
        for state, reserved, day in self.parts:
            state.release(reserved, day, used_tokens)

    def cancel(self) -> None:
        """The request was never served (the engine did not answer): it counts in no quota, as if
        it had not been admitted (once; a no-op after ``settle``)."""
        if self.settled:
            return
        self.settled = True
        for state, reserved, day in self.parts:
            state.refund(reserved, day, self.at)


@dataclass(frozen=True)
class Refusal:
    type: str
    code: str
    message: str
    retry_after: int
    reason: str  # metrics label: rpm, tokens_per_day, requests_per_month, in_flight
    scope: str = "tenant"  # metrics label and x-ratelimit-scope: member or tenant


@dataclass
class Verdict:
    ticket: Ticket | None
    refusal: Refusal | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Period:
    """The UTC day and month a moment falls in, with when each ends (microseconds, as
    ``datetime`` rounds a moment)."""

    day: str
    month: str
    day_start_us: int
    day_end_us: int
    month_end: float


def _period_of(us: int) -> Period:
    now = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    first = day.replace(day=1)
    day_end = day + timedelta(days=1)
    month_end = (first + timedelta(days=32)).replace(day=1)
    return Period(
        now.strftime("%Y-%m-%d"),
        now.strftime("%Y-%m"),
        int(day.timestamp()) * 1_000_000,
        int(day_end.timestamp()) * 1_000_000,
        month_end.timestamp(),
    )


_current = _period_of(0)


def period(ts: float) -> Period:
    """``ts``'s day and month, computed once per UTC day: every request asks (several times), and
    ``datetime`` with ``strftime`` each time was an eighth of the gateway's own work."""
    global _current
    us = round(ts * 1_000_000)
    cached = _current
    if cached.day_start_us <= us < cached.day_end_us:
        return cached
    found = _period_of(us)
    if found.day_start_us >= cached.day_start_us:  # an old moment (a late settle) does not evict today
        _current = found
    return found


def day_of(ts: float) -> str:
    return period(ts).day


def month_of(ts: float) -> str:
    return period(ts).month


def seconds_to_next_day(ts: float) -> float:
    return period(ts).day_end_us / 1_000_000 - ts


def seconds_to_next_month(ts: float) -> float:
    return period(ts).month_end - ts


def _dur(seconds: float) -> str:
    return f"{max(seconds, 0):.3f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60)}s"


class QuotaState:
    """The counters of one set of limits: a tenant's, or one member's inside it.

    ``who`` names the owner in refusals ("member alice", "tenant lab")."""

    def __init__(
        self, limits: Limits | None = None, clock: Callable[[], float] = time.time, scope: str = "tenant", who: str = ""
    ) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self.scope = scope
        self.who = who or f"this {scope}"
        self.window: deque[float] = deque()
        self.day = day_of(clock())
        self.day_tokens = 0  # settled
        self.day_reserved = 0  # admitted, not yet settled
        self.month = month_of(clock())
        self.month_requests = 0
        self.in_flight = 0
        self._rolled_at: float | None = None  # a second roll to the same instant changes nothing

    def load(self, *, day_tokens: int, month_requests: int, recent: list[float]) -> None:
        """State rebuilt from the usage records after a restart."""
        self.day_tokens, self.month_requests = day_tokens, month_requests
        self.window = deque(sorted(t for t in recent if t > self.clock() - WINDOW_S))
        self._rolled_at = None

    def _roll(self, now: float) -> None:
        if now == self._rolled_at:  # admit's decision, then its headers: one roll a request
            return
        self._rolled_at = now
        while self.window and self.window[0] <= now - WINDOW_S:
            self.window.popleft()
        p = period(now)
        if p.day != self.day:
            self.day, self.day_tokens = p.day, 0
        if p.month != self.month:
            self.month, self.month_requests = p.month, 0

    def remaining_requests(self) -> int | None:
        lim = self.limits.rpm_limit
        return None if lim is None else max(lim - len(self.window), 0)

    def remaining_tokens(self) -> int | None:
        lim = self.limits.tokens_per_day
        return None if lim is None else max(lim - self.day_tokens - self.day_reserved, 0)

    def headers(self, now: float | None = None) -> dict[str, str]:
        now = self.clock() if now is None else now
        self._roll(now)
        out: dict[str, str] = {}
        self._request_headers(now, out)
        self._token_headers(now, out)
        return out

    def _request_headers(self, now: float, out: dict[str, str]) -> None:
        left = self.remaining_requests()
        if left is not None:
            reset = self.window[0] + WINDOW_S - now if self.window else 0.0
            out["x-ratelimit-limit-requests"] = str(self.limits.rpm_limit)
            out["x-ratelimit-remaining-requests"] = str(left)
            out["x-ratelimit-reset-requests"] = _dur(reset)

    def _token_headers(self, now: float, out: dict[str, str]) -> None:
        left = self.remaining_tokens()
        if left is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limits.tokens_per_day)
            out["x-ratelimit-remaining-tokens"] = str(left)
            out["x-ratelimit-reset-tokens"] = _dur(seconds_to_next_day(now))

    def refusal(self, reserve_tokens: int, now: float) -> Refusal | None:
        """Why a request reserving ``reserve_tokens`` cannot pass these limits now; None if it can."""
        self._roll(now)
        lim, who = self.limits, self.who
        if lim.max_in_flight is not None and self.in_flight >= lim.max_in_flight:
            return Refusal(
                "requests",
                "rate_limit_exceeded",
                f"Rate limit reached for {who}: {lim.max_in_flight} requests in flight at once. "
                "Retry when one finishes.",
                1,
                "in_flight",
                self.scope,
            )
        if lim.rpm_limit is not None and len(self.window) >= lim.rpm_limit:
            wait = self.window[0] + WINDOW_S - now
            return Refusal(
                "requests",
                "rate_limit_exceeded",
                f"Rate limit reached for requests per minute (RPM) of {who}: limit {lim.rpm_limit}, "
                f"used {len(self.window)}. Please try again in {_dur(wait)}.",
                max(1, math.ceil(wait)),
                "rpm",
                self.scope,
            )
        if lim.requests_per_month is not None and self.month_requests >= lim.requests_per_month:
            return Refusal(
                "insufficient_quota",
                "insufficient_quota",
                f"You exceeded the monthly quota of {who} of {lim.requests_per_month} requests; "
                "ask the administrator to raise it.",
                max(1, math.ceil(seconds_to_next_month(now))),
                "requests_per_month",
                self.scope,
            )
        if lim.tokens_per_day is not None and (
            self.day_tokens + self.day_reserved + reserve_tokens > lim.tokens_per_day
        ):
            left = max(lim.tokens_per_day - self.day_tokens - self.day_reserved, 0)
            return Refusal(
                "tokens",
                "rate_limit_exceeded",
                f"Rate limit reached for tokens per day (TPD) of {who}: limit {lim.tokens_per_day}, "
                f"remaining {left}, this request may use up to {reserve_tokens}. "
                "Lower max_tokens or wait for the next UTC day.",
                max(1, math.ceil(seconds_to_next_day(now))),
                "tokens_per_day",
                self.scope,
            )
        return None

    def take(self, reserve_tokens: int, now: float) -> tuple[QuotaState, int, str]:
        """Counts an admitted request (after ``refusal`` said None, with no await between)."""
        self.window.append(now)
        self.month_requests += 1
        self.in_flight += 1
        reserved = reserve_tokens if self.limits.tokens_per_day is not None else 0
        self.day_reserved += reserved
        return (self, reserved, self.day)

    def release(self, reserved: int, day: str, used_tokens: int) -> None:
        self.in_flight -= 1
        self._roll(self.clock())
        if day == self.day:
            self.day_reserved -= reserved
            self.day_tokens += used_tokens

    def refund(self, reserved: int, day: str, at: float) -> None:
        """Undoes ``take`` of a request admitted at ``at`` that was never served."""
        self.in_flight -= 1
        self._roll(self.clock())
        if day == self.day:
            self.day_reserved -= reserved
        if at in self.window:
            self.window.remove(at)
        if month_of(at) == self.month:
            self.month_requests -= 1

    def admit(self, reserve_tokens: int) -> Verdict:
        """One decision against these limits alone (see ``admit`` for a member inside a tenant)."""
        return admit([self], reserve_tokens)

    def settle(self, ticket: Ticket, used_tokens: int) -> None:
        ticket.settle(used_tokens)


def tightest_headers(states: list[QuotaState], now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers of the tighter of nested limits: the requests headers of
    the state with the fewest requests left this minute, the tokens headers of the one with the
    fewest tokens left today."""
    out: dict[str, str] = {}
    fewest: tuple[int, QuotaState] | None = None
    for s in states:
        s._roll(now)
        if (left := s.remaining_requests()) is not None and (fewest is None or left < fewest[0]):
            fewest = (left, s)
    if fewest is not None:
        fewest[1]._request_headers(now, out)
    fewest = None
    for s in states:
        if (left := s.remaining_tokens()) is not None and (fewest is None or left < fewest[0]):
            fewest = (left, s)
    if fewest is not None:
        fewest[1]._token_headers(now, out)
    return out


def admit(states: list[QuotaState], reserve_tokens: int) -> Verdict:
    """One synchronous decision across nested limits (a member's, then its tenant's): the request
    passes all of them or is counted in none. The refusal names which one was hit."""
    now = states[0].clock()
    for state in states:
        refusal = state.refusal(reserve_tokens, now)
        if refusal is not None:
            headers = {**tightest_headers(states, now), "retry-after": str(refusal.retry_after)}
            headers["x-ratelimit-scope"] = refusal.scope
            return Verdict(None, refusal, headers)
    ticket = Ticket([state.take(reserve_tokens, now) for state in states], at=now)
    return Verdict(ticket, None, tightest_headers(states, now))
