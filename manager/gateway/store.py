"""The gateway's own SQLite on its volume: the last config the manager pushed, and
one usage record per forwarded request.

WAL with ``synchronous=NORMAL``: a committed record survives the gateway being
killed (SIGKILL), which is what the product promises; only a power loss in the
last moments before the OS flushes could lose the newest records.
Records are read by cursor (``seq``), so the manager's collection is idempotent.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from manager.migrations import Step, migrate

MIGRATIONS: list[Step] = [
    [  # 1: the first release
        "CREATE TABLE IF NOT EXISTS config (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS usage (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    path TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    at REAL NOT NULL
)""",
        "CREATE INDEX IF NOT EXISTS usage_at ON usage(at)",
    ],
]
"""The spool's schema, step by step (see manager.migrations); append only."""


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_id: str
    model: str
    path: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    outcome: str  # ok, error, client_disconnected, upstream_unavailable
    latency_ms: float
    at: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GatewayStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        migrate(self._db, MIGRATIONS, f"the gateway's spool {path}")

    def close(self) -> None:
        self._db.close()

    def config(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM config WHERE id = 1").fetchone()
        return json.loads(row["body"]) if row else None

    def save_config(self, body: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT INTO config (id, body) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET body=excluded.body",
            (json.dumps(body),),
        )

    def record(self, rec: UsageRecord) -> None:
        d = asdict(rec)
        self._db.execute(
            "INSERT OR IGNORE INTO usage (request_id, key_id, model, path, prompt_tokens, completion_tokens,"
            " status, outcome, latency_ms, at) VALUES (:request_id, :key_id, :model, :path, :prompt_tokens,"
            " :completion_tokens, :status, :outcome, :latency_ms, :at)",
            d,
        )

    def after(self, cursor: int, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM usage WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, limit))
        return [dict(r) for r in rows]

    def totals_since(self, since: float) -> tuple[int, int]:
        """(requests, tokens) recorded since ``since``: to rebuild quota state after a restart."""
        row = self._db.execute(
            "SELECT COUNT(*) AS n, COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS t FROM usage WHERE at >= ?",
            (since,),
        ).fetchone()
        return int(row["n"]), int(row["t"])

    def recent_times(self, seconds: float) -> list[float]:
        rows = self._db.execute("SELECT at FROM usage WHERE at >= ?", (time.time() - seconds,))
        return [float(r["at"]) for r in rows]
