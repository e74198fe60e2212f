"""Exact quota decisions for one tenant, made in memory on the gateway's event loop.

``admit`` is one synchronous decision (no await inside), so concurrent requests
cannot both take the last unit. Token quotas reserve an upper bound of what a
request can use when it is admitted (``max_tokens`` plus the prompt's size in
bytes, since a byte-level token is at least one byte) and settle to the real
usage afterwards, so concurrency cannot overrun them.

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
    reserved: int
    day: str
    settled: bool = False


@dataclass(frozen=True)
class Refusal:
    type: str
    code: str
    message: str
    retry_after: int
    reason: str  # metrics label: rpm, tokens_per_day, requests_per_month, in_flight


@dataclass
class Verdict:
    ticket: Ticket | None
    refusal: Refusal | None
    headers: dict[str, str] = field(default_factory=dict)


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def month_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def seconds_to_next_day(ts: float) -> float:
    now = datetime.fromtimestamp(ts, UTC)
    nxt = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (nxt - now).total_seconds()


def seconds_to_next_month(ts: float) -> float:
    now = datetime.fromtimestamp(ts, UTC)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = (first + timedelta(days=32)).replace(day=1)
    return (nxt - now).total_seconds()


def _dur(seconds: float) -> str:
    return f"{max(seconds, 0):.3f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60)}s"


class QuotaState:
    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits or Limits()
        self.clock = clock
        self.window: deque[float] = deque()
        self.day = day_of(clock())
        self.day_tokens = 0  # settled
        self.day_reserved = 0  # admitted, not yet settled
        self.month = month_of(clock())
        self.month_requests = 0
        self.in_flight = 0

    def load(self, *, day_tokens: int, month_requests: int, recent: list[float]) -> None:
        """State rebuilt from the usage records after a restart."""
        self.day_tokens, self.month_requests = day_tokens, month_requests
        self.window = deque(sorted(t for t in recent if t > self.clock() - WINDOW_S))

    def _roll(self, now: float) -> None:
        while self.window and self.window[0] <= now - WINDOW_S:
            self.window.popleft()
        if day_of(now) != self.day:
            self.day, self.day_tokens = day_of(now), 0
        if month_of(now) != self.month:
            self.month, self.month_requests = month_of(now), 0

    def headers(self, now: float | None = None) -> dict[str, str]:
        now = self.clock() if now is None else now
        self._roll(now)
        out: dict[str, str] = {}
        lim = self.limits
        if lim.rpm_limit is not None:
            reset = self.window[0] + WINDOW_S - now if self.window else 0.0
            out["x-ratelimit-limit-requests"] = str(lim.rpm_limit)
            out["x-ratelimit-remaining-requests"] = str(max(lim.rpm_limit - len(self.window), 0))
            out["x-ratelimit-reset-requests"] = _dur(reset)
        if lim.tokens_per_day is not None:
            out["x-ratelimit-limit-tokens"] = str(lim.tokens_per_day)
            used = self.day_tokens + self.day_reserved
            out["x-ratelimit-remaining-tokens"] = str(max(lim.tokens_per_day - used, 0))
            out["x-ratelimit-reset-tokens"] = _dur(seconds_to_next_day(now))
        return out

    def admit(self, reserve_tokens: int) -> Verdict:
        now = self.clock()
        self._roll(now)
        lim = self.limits
        refusal: Refusal | None = None
        if lim.max_in_flight is not None and self.in_flight >= lim.max_in_flight:
            refusal = Refusal(
                "requests",
                "rate_limit_exceeded",
                f"Rate limit reached: {lim.max_in_flight} requests in flight at once. Retry when one finishes.",
                1,
                "in_flight",
            )
        elif lim.rpm_limit is not None and len(self.window) >= lim.rpm_limit:
            wait = self.window[0] + WINDOW_S - now
            refusal = Refusal(
                "requests",
                "rate_limit_exceeded",
                f"Rate limit reached for requests per minute (RPM): limit {lim.rpm_limit}, "
                f"used {len(self.window)}. Please try again in {_dur(wait)}.",
                max(1, math.ceil(wait)),
                "rpm",
            )
        elif lim.requests_per_month is not None and self.month_requests >= lim.requests_per_month:
            refusal = Refusal(
                "insufficient_quota",
                "insufficient_quota",
                f"You exceeded your monthly quota of {lim.requests_per_month} requests; "
                "ask the administrator to raise it.",
                max(1, math.ceil(seconds_to_next_month(now))),
                "requests_per_month",
            )
        elif lim.tokens_per_day is not None and (
            self.day_tokens + self.day_reserved + reserve_tokens > lim.tokens_per_day
        ):
            left = max(lim.tokens_per_day - self.day_tokens - self.day_reserved, 0)
            refusal = Refusal(
                "tokens",
                "rate_limit_exceeded",
                f"Rate limit reached for tokens per day (TPD): limit {lim.tokens_per_day}, "
                f"remaining {left}, this request may use up to {reserve_tokens}. "
                "Lower max_tokens or wait for the next UTC day.",
                max(1, math.ceil(seconds_to_next_day(now))),
                "tokens_per_day",
            )
        if refusal is not None:
            return Verdict(None, refusal, {**self.headers(now), "retry-after": str(refusal.retry_after)})
        self.window.append(now)
        self.month_requests += 1
        self.in_flight += 1
        reserved = reserve_tokens if lim.tokens_per_day is not None else 0
        self.day_reserved += reserved
        return Verdict(Ticket(reserved, self.day), None, self.headers(now))

    def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """Replace the reservation by what the request really used (once)."""
        if ticket.settled:
            return
        ticket.settled = True
        self.in_flight -= 1
        self._roll(self.clock())
        if ticket.day == self.day:
            self.day_reserved -= ticket.reserved
            self.day_tokens += used_tokens
