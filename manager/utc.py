"""UTC day and month boundaries: quotas, usage totals and the console all count per UTC day
and calendar month."""

from __future__ import annotations

from datetime import UTC, datetime

DAY_S = 86_400
"""A UTC day (UNIX time has no leap seconds): ``start_of_day(t) == t - t % DAY_S``."""


def start_of_day(now: float) -> float:
    return datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def start_of_month(now: float) -> float:
    return datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
