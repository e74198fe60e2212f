"""The usage reads the manager serves from its database, on a month of a busy lab, against the
same questions asked of every usage record (what the manager did before the daily rollup),
measured in one run on this machine.

    .venv/bin/python -m bench.usage_queries                     # 1,000,000 records
    .venv/bin/python -m bench.usage_queries --records 100000

The database is filled the way the collector fills it (``SqliteStore.add_usage``, pages of 1000),
so the first figure is what the rollup's trigger costs the collection: records stored per
second with the trigger against the same pages without it. Each read is then timed both
ways (the median of 5): /metrics (every tenant and member, all time), list-members (today,
this month, last used), the console's 30 daily bars, the month's cost split and the API's
/api/v1/usage (every tenant, all time: whole days from the rollup, today from the records). Targets:
collection at >= 0.5 of its speed without the rollup; every read under 50 ms at a million
records (Prometheus scrapes every 15 s and the store's lock is held while a read runs).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.timing import timed
from manager.contract import UsageRecord
from manager.control.costs import split
from manager.control.sqlite_store import SqliteStore
from manager.domain import TenantSpec
from manager.utc import DAY_S, start_of_day, start_of_month

TENANTS = 10
MEMBERS = 10
PAGE = 1000

BY_MEMBER = (
    "SELECT member, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
    " WHERE tenant=:t AND at >= :since AND at < :end GROUP BY member"
)

TOTALS = (
    "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
    " WHERE tenant=:t AND at >= :since AND at < :end"
)


def raw_reads(day: float, month: float, since: float, end: float) -> dict[str, list[tuple[str, dict[str, object]]]]:
    """The same questions of every record, what the manager asked before the rollup: (SQL,
    parameters) for each statement."""
    t0 = {"t": "t0", "end": end}
    return {
        "/metrics": [
            (
                "SELECT tenant, member, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
                " GROUP BY tenant, member",
                {},
            )
        ],
        "list-members": [
            (BY_MEMBER, {**t0, "since": day}),
            (BY_MEMBER, {**t0, "since": month}),
            ("SELECT member, MAX(at) FROM usage WHERE tenant=:t GROUP BY member", t0),
        ],
        "daily bars": [
            (
                "SELECT date(at, 'unixepoch') AS day, COUNT(*), SUM(prompt_tokens + completion_tokens) FROM usage"
                " WHERE tenant=:t AND at >= :since GROUP BY day",
                {**t0, "since": since},
            )
        ],
        "cost split": [
            ("SELECT DISTINCT tenant FROM usage WHERE at >= :since AND at < :end", {"since": month, "end": end})
        ]
        + [(BY_MEMBER, {"t": f"t{i}", "since": month, "end": end}) for i in range(TENANTS)],
        "/api/v1/usage": [(TOTALS, {"t": f"t{i}", "since": 0.0, "end": end}) for i in range(TENANTS)],
    }


def records(n: int, now: float) -> list[tuple[str, UsageRecord]]:
    rng = random.Random(1)
    start = start_of_month(now) - 30 * DAY_S  # last month and this one
    out = []
    for i in range(n):
        tenant = f"t{i % TENANTS}"
        out.append(
            (
                tenant,
                UsageRecord(
                    request_id=f"req_{i}",
                    key_id="k",
                    member=f"m{rng.randrange(MEMBERS)}",
                    model="demo",
                    path="/v1/chat/completions",
                    prompt_tokens=rng.randint(10, 500),
                    completion_tokens=rng.randint(1, 300),
                    status=200,
                    outcome="ok",
                    latency_ms=100.0,
                    at=start + (now - start) * i / n,
                ),
            )
        )
    return out


def fill(store: SqliteStore, data: list[tuple[str, UsageRecord]]) -> float:
    """Stores the records page by page per tenant, as the collector does; returns records per second."""
    per: dict[str, list[UsageRecord]] = {}
    for tenant, rec in data:
        per.setdefault(tenant, []).append(rec)
    started = time.perf_counter()
    for tenant, recs in per.items():
        for at in range(0, len(recs), PAGE):
            store.add_usage(tenant, recs[at : at + PAGE], cursor=at + PAGE)
    return len(data) / (time.perf_counter() - started)


def raw(db: sqlite3.Connection, statements: list[tuple[str, dict[str, object]]]) -> Callable[[], object]:
    def run() -> object:
        return [db.execute(sql, params).fetchall() for sql, params in statements]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    now = time.time()
    data = records(args.records, now)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "manager.db")
        with store.transaction() as db:
            for i in range(TENANTS):
                spec = TenantSpec(name=f"t{i}", port=30001 + i, gpu_memory=2**30, model="demo", max_model_len=512)
                store.insert_tenant(db, spec)
        plain = SqliteStore(Path(tmp) / "plain.db")
        plain._db.execute("DROP TRIGGER usage_days_add")  # the same pages, no rollup
        first = len(data) // 5  # the same records into two empty databases
        without = fill(plain, data[:first])
        plain.close()
        with_rollup = fill(store, data[:first])
        fill(store, data[first:])
        print(f"records: {args.records:,}, {TENANTS} tenants x {MEMBERS} members over two months")
        print(
            f"collection: {with_rollup:,.0f} records/s with the rollup, {without:,.0f} without "
            f"(ratio {with_rollup / without:.2f})"
        )
        db = sqlite3.connect(Path(tmp) / "manager.db")
        month, day = start_of_month(now), start_of_day(now)
        since = day - 29 * DAY_S
        end = now + DAY_S
        reads: dict[str, Callable[[], object]] = {
            "/metrics": store.usage_counters,
            "list-members": lambda: store.member_usage("t0", day, month),
            "daily bars": lambda: store.usage_daily("t0", since),
            "cost split": lambda: split(time.strftime("%Y-%m", time.gmtime(now)), 1000.0, store, now),
            "/api/v1/usage": lambda: [store.usage_totals(f"t{i}", 0.0, end) for i in range(TENANTS)],
        }
        slow_reads = raw_reads(day, month, since, end)
        print(f"{'read':<14} {'rollup ms':>10} {'every record ms':>16} {'ratio':>8}")
        for name, fn in reads.items():
            fast, slow = timed(fn), timed(raw(db, slow_reads[name]))
            print(f"{name:<14} {fast * 1000:>10.2f} {slow * 1000:>16.1f} {fast / slow:>8.3f}")
        db.close()
        store.close()


if __name__ == "__main__":
    main()
