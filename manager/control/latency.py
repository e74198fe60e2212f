"""What a tenant's members waited for, from their usage records: time to first token (streams)
and time queued at the gateway for an engine slot, as p50 and p99 over a window. Pure: the
service hands it the records' figures."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

WINDOW_S = 3600.0
"""The console's and /metrics' window: the last hour."""
QUANTILES = (0.5, 0.99)


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile of sorted ``values`` (at least one)."""
    return values[min(len(values) - 1, max(int(q * len(values) + 0.999999) - 1, 0))]


@dataclass(frozen=True)
class Latency:
    """One member's (or, as ``member`` '', the whole tenant's) figures over the window, in seconds."""

    member: str
    requests: int
    first_token: dict[float, float]
    """quantile -> seconds, over the streamed requests that wrote a token (empty: none did)."""
    queued: dict[float, float]
    """quantile -> seconds, over every request."""


def summarise(records: Iterable[tuple[str, float | None, float]]) -> list[Latency]:
    """``records``: (member, first token ms or None, queue ms). The tenant's figures first ('' as
    its member), then each member's, by name."""
    by: dict[str, tuple[list[float], list[float]]] = {"": ([], [])}
    for member, first_ms, queue_ms in records:
        for who in ("", member):
            firsts, queues = by.setdefault(who, ([], []))
            if first_ms is not None:
                firsts.append(first_ms / 1000)
            queues.append(queue_ms / 1000)
            if not member:
                break
    out = []
    for who in sorted(by):
        firsts, queues = sorted(by[who][0]), sorted(by[who][1])
        out.append(
            Latency(
                member=who,
                requests=len(queues),
                first_token={q: quantile(firsts, q) for q in QUANTILES} if firsts else {},
                queued={q: quantile(queues, q) for q in QUANTILES} if queues else {},
            )
        )
    return out
