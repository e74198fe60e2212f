"""The gateway's own SQLite on its volume: the last config the manager pushed, and
one usage record per forwarded request.

WAL with ``synchronous=NORMAL``: a committed record survives the gateway being
killed (SIGKILL), which is what the product promises; only a power loss in the
last moments before the OS flushes could lose the newest records.
Records are read by cursor (``seq``), so the manager's collection is idempotent.

A streamed request is *begun* (``open_requests``) when it is admitted, its progress (the
engine's running count) saved about once a second while it streams, and *settled* by its record,
in one transaction with the open row's removal. A gateway killed with streams in flight settles
them at its next start as ``interrupted`` records with what it had saved: nothing served goes
unmetered, nothing is metered twice. A plain answer is served whole, at its last byte, and its
record is committed before that byte leaves: a gateway killed before then served nothing of it,
and meters nothing (as for a request the engine never took).

Writes come in groups (``write``): the gateway gathers the writes of one event-loop turn, every
request that began or ended in it, into one transaction, so a commit is paid once per turn, not
once per request.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from manager.contract import GatewayConfig, UsagePage, UsageRecord
from manager.migrations import Step, migrate

log = logging.getLogger(__name__)

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
    [  # 2: members: a record carries the member whose key was used ('' in older records: the key's member)
        "ALTER TABLE usage ADD COLUMN member TEXT NOT NULL DEFAULT ''",
    ],
    [  # 3: requests begun and not yet settled: a gateway killed mid-request settles them at its next start
        """CREATE TABLE IF NOT EXISTS open_requests (
    request_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    member TEXT NOT NULL,
    model TEXT NOT NULL,
    path TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status INTEGER NOT NULL,
    at REAL NOT NULL
)""",
    ],
    [  # 4: latency per request: its wait for an engine slot, and its first token (streams)
        "ALTER TABLE usage ADD COLUMN queue_ms REAL NOT NULL DEFAULT 0",
        "ALTER TABLE usage ADD COLUMN first_token_ms REAL",
    ],
    [  # 5: the spool's identity (``UsagePage.spool``), random, made once with it
        "CREATE TABLE IF NOT EXISTS spool (id TEXT NOT NULL)",
        "INSERT INTO spool (id) SELECT lower(hex(randomblob(16))) WHERE NOT EXISTS (SELECT 1 FROM spool)",
    ],
]
"""The spool's schema, step by step (see manager.migrations); append only."""
_BEGIN = (
    "INSERT OR REPLACE INTO open_requests (request_id, key_id, member, model, path, prompt_tokens,"
    " completion_tokens, status, at) VALUES (:request_id, :key_id, :member, :model, :path, :prompt_tokens,"
    " :completion_tokens, :status, :at)"
)
_PROGRESS = "UPDATE open_requests SET prompt_tokens=?, completion_tokens=?, status=? WHERE request_id=?"
USAGE_FIELDS = tuple(UsageRecord.model_fields)
"""The usage table's columns (but ``seq``): a record's fields, in their order."""
_RECORD = (  # the column names are the contract's, never input
    f"INSERT OR IGNORE INTO usage ({', '.join(USAGE_FIELDS)}) VALUES ({', '.join('?' * len(USAGE_FIELDS))})"  # noqa: S608
)
_DROP = "DELETE FROM open_requests WHERE request_id = ?"
_OPEN_FIELDS = ("request_id", "key_id", "member", "model", "path", "prompt_tokens", "completion_tokens", "status", "at")


@dataclass(frozen=True)
class Totals:
    """What one key used, to rebuild the quota state after a restart: tokens today, requests this
    month and the times of its requests in the current rate window."""

    key_id: str
    member: str
    day_tokens: int
    month_requests: int
    recent: list[float]


@dataclass(frozen=True, slots=True)
class Begin:
    """A request admitted: what is known of it so far (``UsageRecord``'s fields but latency)."""

    fields: dict[str, object]


@dataclass(frozen=True, slots=True)
class Progress:
    """What a request in flight has used so far (the engine's running count)."""

    request_id: str
    prompt_tokens: int
    completion_tokens: int
    status: int


@dataclass(frozen=True, slots=True)
class Settle:
    """The request's record (a ``UsageRecord``'s fields by name), and the end of its open row
    (``opened``: a streamed request's)."""

    record: Mapping[str, object]
    opened: bool = True


@dataclass(frozen=True, slots=True)
class Drop:
    """A request the engine never took: no record, no open row."""

    request_id: str


Write = Begin | Progress | Settle | Drop


CHECKPOINT_S = 1.0
"""How often the spool's write-ahead log is copied into the database, off the event loop."""


SPOOL_FILE = "gateway.db"
"""The spool's file in the gateway's data directory (its own volume)."""


class GatewayStore:
    """The spool. Its WAL is checkpointed by a thread of its own (``CHECKPOINT_S``), not by the
    commit that happens to fill it: a checkpoint syncs the database file, milliseconds that would
    otherwise stall the event loop every thousand pages (the gateway's p99)."""

    def __init__(self, path: Path, checkpoint_s: float | None = CHECKPOINT_S) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        migrate(self._db, MIGRATIONS, f"the gateway's spool {path}")
        self.spool_id = str(self._db.execute("SELECT id FROM spool").fetchone()["id"])
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if checkpoint_s is not None:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = threading.Thread(
                target=self._checkpoints, args=(path, checkpoint_s), name="spool-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _checkpoints(self, path: Path, every_s: float) -> None:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            while not self._stop.wait(every_s):
                try:  # PASSIVE: never waits for, nor blocks, the writers
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # a full volume: the writes report it; retried
                    log.warning("checkpointing the usage spool failed: %s", exc)
        finally:
            db.close()

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(5)
        self._db.close()

    def config(self) -> GatewayConfig | None:
        """The last config the manager pushed (also one written by an older release)."""
        row = self._db.execute("SELECT body FROM config WHERE id = 1").fetchone()
        return GatewayConfig.model_validate_json(row["body"]) if row else None

    def save_config(self, config: GatewayConfig) -> None:
        self._db.execute(
            "INSERT INTO config (id, body) VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET body=excluded.body",
            (config.model_dump_json(),),
        )

    def write(self, writes: Sequence[Write]) -> None:
        """Every write in one transaction: all of them or none. They run by kind (begins, progress,
        records, drops), each kind in one statement; for any one request that is its own order (a
        request's begin is committed before anything else of it is written)."""
        begins: list[dict[str, object]] = []
        progress: list[tuple[int, int, int, str]] = []
        records: list[tuple[object, ...]] = []
        ended: list[tuple[str]] = []
        for w in writes:
            match w:
                case Begin(fields):
                    begins.append({k: fields[k] for k in _OPEN_FIELDS})
                case Progress(request_id, prompt_tokens, completion_tokens, status):
                    progress.append((prompt_tokens, completion_tokens, status, request_id))
                case Settle(fields, opened):
                    records.append(tuple(fields[f] for f in USAGE_FIELDS))
                    if opened:
                        ended.append((str(fields["request_id"]),))
                case Drop(request_id):
                    ended.append((request_id,))
        with self._transaction():
            if begins:
                self._db.executemany(_BEGIN, begins)
            if progress:
                self._db.executemany(_PROGRESS, progress)
            if records:
                self._db.executemany(_RECORD, records)
            if ended:
                self._db.executemany(_DROP, ended)

    def settle_interrupted(self, now: float) -> int:
        """Every request left open by a gateway that died: a record ``interrupted`` with what was saved
        of it (its latency up to ``now``). Returns how many."""
        with self._transaction():
            rows = self._db.execute("SELECT * FROM open_requests ORDER BY at").fetchall()
            for r in rows:
                self._db.execute(
                    _RECORD,
                    (
                        r["request_id"],
                        r["key_id"],
                        r["member"],
                        r["model"],
                        r["path"],
                        r["prompt_tokens"],
                        r["completion_tokens"],
                        r["status"],
                        "interrupted",
                        round(max(now - float(r["at"]), 0.0) * 1000, 3),
                        r["at"],
                        0.0,
                        None,
                    ),
                )
            self._db.execute("DELETE FROM open_requests")
        return len(rows)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def last_record_at(self) -> float | None:
        """When the newest record was written (records are written in order); None: there is none."""
        row = self._db.execute("SELECT at FROM usage ORDER BY seq DESC LIMIT 1").fetchone()
        return float(row["at"]) if row else None

    def after(self, cursor: int, limit: int = 1000) -> UsagePage:
        rows = self._db.execute("SELECT * FROM usage WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, limit)).fetchall()
        records = [UsageRecord.model_validate(dict(r)) for r in rows]
        return UsagePage(records=records, cursor=int(rows[-1]["seq"]) if rows else cursor, spool=self.spool_id)

    def totals_by_key(self, day_start: float, month_start: float, window_start: float) -> list[Totals]:
        """Per key (and member): tokens since ``day_start``, requests since ``month_start`` and the
        request times since ``window_start``."""
        recent: dict[tuple[str, str], list[float]] = {}
        for r in self._db.execute("SELECT key_id, member, at FROM usage WHERE at >= ?", (window_start,)):
            recent.setdefault((r["key_id"], r["member"]), []).append(float(r["at"]))
        rows = self._db.execute(
            "SELECT key_id, member, COUNT(*) AS n,"
            " COALESCE(SUM(CASE WHEN at >= ? THEN prompt_tokens + completion_tokens END), 0) AS t"
            " FROM usage WHERE at >= ? GROUP BY key_id, member",
            (day_start, month_start),
        )
        return [
            Totals(r["key_id"], r["member"], int(r["t"]), int(r["n"]), recent.get((r["key_id"], r["member"]), []))
            for r in rows
        ]
