"""Desired state in SQLite: tenants, their members, API keys (SHA-256 hashes only), the audit trail.

WAL with ``synchronous=FULL``: a committed change survives a crash. Usage records are
append-only: the daily rollup ``usage_days`` (schema step 5) is kept by a trigger on insert. The
interface is narrow (plain methods returning domain objects) so a PostgreSQL
implementation can replace it for a multi-host deployment.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from manager.contract import UsageRecord
from manager.control.records import (
    AuditRow,
    EngineFailure,
    KeyRow,
    MemberRow,
    MemberUsage,
    ReservationEvent,
    ReservationRow,
    SleepState,
    TenantRow,
    UsageTotals,
    VolumeKeyRow,
)
from manager.control.store import Tx
from manager.domain import QUOTA_FIELDS, TENANT_FIELDS, Quotas, TenantSpec, TenantStatus, can_transition
from manager.errors import Conflict, NotFound, StateUnavailable
from manager.migrations import Step, migrate
from manager.utc import DAY_S, start_of_day

IDLE_REASON = "idle: its engine is stopped until the next request"


def whole_days(since: float, until: float | None) -> tuple[float, float]:
    """The bounds of a read of the daily rollup, which counts whole UTC days only."""
    if since % DAY_S or (until is not None and until % DAY_S):
        raise ValueError("the usage rollup counts whole UTC days: since and until must be day starts")
    return since, until if until is not None else 1e18


MIGRATIONS: list[Step] = [
    [  # 1: the first release
        """CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    port INTEGER NOT NULL UNIQUE,
    gpu_memory INTEGER NOT NULL,
    model TEXT NOT NULL,
    max_model_len INTEGER NOT NULL,
    quantization TEXT,
    shm_size INTEGER NOT NULL,
    rpm_limit INTEGER,
    tokens_per_day INTEGER,
    requests_per_month INTEGER,
    max_in_flight INTEGER,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    status_since REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    gateway_token TEXT NOT NULL DEFAULT ''
)""",
        """CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    prefix TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    expires_at REAL,
    last_used_at REAL
)""",
        "CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant)",
        """CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    tenant TEXT,
    result TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
)""",
        "CREATE INDEX IF NOT EXISTS audit_tenant ON audit(tenant, id)",
        """CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL,
    request_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    path TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    latency_ms REAL NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (tenant, request_id)
)""",
        "CREATE INDEX IF NOT EXISTS usage_tenant_at ON usage(tenant, at)",
        "CREATE TABLE IF NOT EXISTS usage_cursors (tenant TEXT PRIMARY KEY, cursor INTEGER NOT NULL)",
    ],
    [  # 2: engine failures (backoff and the log of the last failure) survive a manager restart
        """CREATE TABLE IF NOT EXISTS engine_failures (
    tenant TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    marker TEXT NOT NULL,
    retry_at REAL NOT NULL,
    log TEXT NOT NULL DEFAULT ''
)""",
    ],
    [  # 3: a request body limit per tenant (32 MiB: a 20 MB image as a base64 data: URL fits)
        "ALTER TABLE tenants ADD COLUMN max_body INTEGER NOT NULL DEFAULT 33554432",
    ],
    [  # 4: members inside a tenant; existing keys and usage belong to its first member, named like the tenant
        """CREATE TABLE IF NOT EXISTS members (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    rpm_limit INTEGER,
    tokens_per_day INTEGER,
    requests_per_month INTEGER,
    max_in_flight INTEGER,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
)""",
        "INSERT OR IGNORE INTO members (tenant, name, created_at) SELECT name, name, created_at FROM tenants",
        "ALTER TABLE api_keys ADD COLUMN member TEXT NOT NULL DEFAULT ''",
        "UPDATE api_keys SET member = tenant WHERE member = ''",
        "CREATE INDEX IF NOT EXISTS api_keys_member ON api_keys(tenant, member)",
        "ALTER TABLE usage ADD COLUMN member TEXT NOT NULL DEFAULT ''",
        "UPDATE usage SET member = tenant WHERE member = ''",
        "CREATE INDEX IF NOT EXISTS usage_member_at ON usage(tenant, member, at)",
    ],
    [  # 5: a rollup per tenant, member and UTC day, kept by a trigger: /metrics, list-members, the daily
        # bars and the cost split read days, not every request (1.8 s a scrape at a million records).
        # Usage rows are append-only (never updated or deleted): the rollup counts each one once.
        """CREATE TABLE IF NOT EXISTS usage_days (
    tenant TEXT NOT NULL,
    member TEXT NOT NULL,
    day REAL NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    last_at REAL NOT NULL,
    PRIMARY KEY (tenant, member, day)
)""",
        # day: the UTC day start of ``at`` (manager.utc.start_of_day)
        """INSERT INTO usage_days (tenant, member, day, requests, prompt_tokens, completion_tokens, last_at)
SELECT tenant, member, CAST(at / 86400 AS INTEGER) * 86400 AS day, COUNT(*), SUM(prompt_tokens),
SUM(completion_tokens), MAX(at) FROM usage GROUP BY tenant, member, day""",
        """CREATE TRIGGER IF NOT EXISTS usage_days_add AFTER INSERT ON usage BEGIN
INSERT INTO usage_days (tenant, member, day, requests, prompt_tokens, completion_tokens, last_at)
VALUES (NEW.tenant, NEW.member, CAST(NEW.at / 86400 AS INTEGER) * 86400, 1, NEW.prompt_tokens, NEW.completion_tokens,
NEW.at)
ON CONFLICT (tenant, member, day) DO UPDATE SET requests = requests + 1,
prompt_tokens = prompt_tokens + excluded.prompt_tokens,
completion_tokens = completion_tokens + excluded.completion_tokens, last_at = MAX(last_at, excluded.last_at);
END""",
        "CREATE INDEX IF NOT EXISTS usage_days_day ON usage_days(day)",
    ],
    [  # 6: images and engine options per tenant (the defaults of manager.domain.TenantSpec). A tenant
        # from before takes no images until the admin sets --max-images: its engine is never given
        # image memory (cpu mode) or a per-prompt limit it was not sized for
        "ALTER TABLE tenants ADD COLUMN max_images INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tenants ADD COLUMN max_image_pixels INTEGER NOT NULL DEFAULT 12582912",
        "ALTER TABLE tenants ADD COLUMN enable_prefix_caching INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE tenants ADD COLUMN trust_remote_code INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tenants ADD COLUMN max_num_seqs INTEGER",
    ],
    [  # 7: the device each tenant is placed on (a GPU's or MIG instance's UUID). '' is the host's first
        # device: where every engine of an older release ran (it used GPU 0 alone)
        "ALTER TABLE tenants ADD COLUMN device TEXT NOT NULL DEFAULT ''",
    ],
    [  # 8: reservation changes as typed rows, written in the transaction of the spec change: the cost
        # split reads these instead of parsing the audit trail. Filled from an older release's audit
        # trail, in its order (the add, each successful resize, the removal)
        """CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    event TEXT NOT NULL CHECK (event IN ('add', 'resize', 'remove')),
    gpu_memory INTEGER NOT NULL,
    at REAL NOT NULL
)""",
        """INSERT INTO reservations (tenant, event, gpu_memory, at)
SELECT tenant,
       CASE action WHEN 'add-tenant' THEN 'add' WHEN 'update-tenant' THEN 'resize' ELSE 'remove' END,
       COALESCE(json_extract(detail, '$.gpu_memory'), 0),
       at
FROM audit
WHERE result = 'ok' AND tenant IS NOT NULL AND (
    (action IN ('add-tenant', 'update-tenant') AND json_type(detail, '$.gpu_memory') = 'integer')
    OR action = 'remove-tenant')
ORDER BY id""",
    ],
    [  # 9: idle tenants sleep (manager.control.sleeper): the setting, and how it slept and woke
        "ALTER TABLE tenants ADD COLUMN idle_sleep_s REAL",
        "ALTER TABLE tenants ADD COLUMN last_request_at REAL",
        "ALTER TABLE tenants ADD COLUMN sleeps INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tenants ADD COLUMN wakes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tenants ADD COLUMN wake_started_at REAL",
        "ALTER TABLE tenants ADD COLUMN last_wake_s REAL",
    ],
    [  # 10: overcommit (manager.control.overcommit): tenants never put to sleep, and why a wake waits
        "ALTER TABLE tenants ADD COLUMN always_on INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tenants ADD COLUMN wake_refusal TEXT NOT NULL DEFAULT ''",
        # sleeps and wakes are reservation rows too (the cost split prices asleep hours apart):
        # the table is rebuilt for its wider CHECK, and an older release's sleeps and wakes are
        # filled in from its audit trail, each at the size the tenant had then
        "ALTER TABLE reservations RENAME TO reservations_9",
        """CREATE TABLE reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL,
    event TEXT NOT NULL CHECK (event IN ('add', 'resize', 'remove', 'sleep', 'wake')),
    gpu_memory INTEGER NOT NULL,
    at REAL NOT NULL
)""",
        "INSERT INTO reservations (id, tenant, event, gpu_memory, at)"
        " SELECT id, tenant, event, gpu_memory, at FROM reservations_9 ORDER BY id",
        "DROP TABLE reservations_9",
        """INSERT INTO reservations (tenant, event, gpu_memory, at)
SELECT a.tenant, a.action,
       COALESCE((SELECT r.gpu_memory FROM reservations r WHERE r.tenant = a.tenant AND r.at <= a.at
                 AND r.event IN ('add', 'resize') ORDER BY r.at DESC, r.id DESC LIMIT 1), 0),
       a.at
FROM audit a
WHERE a.result = 'ok' AND a.tenant IS NOT NULL AND a.action IN ('sleep', 'wake')
ORDER BY a.id""",
    ],
    [  # 11: tool calling and reasoning per tenant (manager.control.parsers): off for a tenant from before
        "ALTER TABLE tenants ADD COLUMN tool_call_parser TEXT",
        "ALTER TABLE tenants ADD COLUMN reasoning_parser TEXT",
    ],
    [  # 12: what a sleeper really keeps of its device, measured after it slept (nvml)
        "ALTER TABLE tenants ADD COLUMN kept_asleep INTEGER",
    ],
    [  # 13: the engine's CPU weight when engines contend (unset: its reservation)
        "ALTER TABLE tenants ADD COLUMN cpu_weight INTEGER",
    ],
    [  # 14: what a model's GPU engine needed beyond weights, images, sequences and KV cache, as its
        # own start-up logged it (nvml; manager.control.reconciler ``_learn_overhead``)
        """CREATE TABLE IF NOT EXISTS engine_overheads (
    model TEXT NOT NULL,
    images INTEGER NOT NULL,
    overhead INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (model, images)
)""",
    ],
    [  # 15: fair queuing among a tenant's members at its gateway (on for a tenant from before too)
        "ALTER TABLE tenants ADD COLUMN fair_queue INTEGER NOT NULL DEFAULT 1",
    ],
    [  # 16: latency per request, as its gateway saw it (older records: none)
        "ALTER TABLE usage ADD COLUMN queue_ms REAL NOT NULL DEFAULT 0",
        "ALTER TABLE usage ADD COLUMN first_token_ms REAL",
    ],
    [  # 17: each member's weight in its tenant's fair queue (members from before weigh 1)
        "ALTER TABLE members ADD COLUMN weight REAL NOT NULL DEFAULT 1",
    ],
    [  # 18: encrypted volumes (manager.control.vault): a tenant's volume kind and size, and the data
        # key of each encrypted volume, wrapped under the host's key-encryption key
        "ALTER TABLE tenants ADD COLUMN volume TEXT NOT NULL DEFAULT 'plain'",
        "ALTER TABLE tenants ADD COLUMN volume_size INTEGER",
        """CREATE TABLE IF NOT EXISTS volume_keys (
    tenant TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL
)""",
    ],
    [  # 19: a cursor per gateway spool (``UsagePage.spool``): a tenant's gateway on a new volume counts
        # its cursor from its own start; the cursors so far are those of the spools without an identity
        """CREATE TABLE IF NOT EXISTS spool_cursors (
    tenant TEXT NOT NULL,
    spool TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (tenant, spool)
)""",
        "INSERT INTO spool_cursors (tenant, spool, cursor, at) SELECT tenant, '', cursor, 0 FROM usage_cursors",
        "DROP TABLE usage_cursors",
    ],
    [  # 20: gateway spools left on a lost swarm node, read once the node is back (``control.drains``)
        """CREATE TABLE IF NOT EXISTS spool_drains (
    tenant TEXT NOT NULL,
    node TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (tenant, node)
)""",
    ],
]
"""The manager database's schema, step by step (see manager.migrations); append only."""


_ADD_USAGE = (
    "INSERT OR IGNORE INTO usage (tenant, request_id, key_id, member, model, path, prompt_tokens,"
    " completion_tokens, status, outcome, latency_ms, at, queue_ms, first_token_ms) VALUES (?,?,?,"
    " CASE WHEN ? != '' THEN ? ELSE COALESCE((SELECT member FROM api_keys WHERE id=? AND tenant=?), '')"
    " END,?,?,?,?,?,?,?,?,?,?)"
)
"""A collected record; one written before members (no member) is its key's member's."""


def _spec_columns(spec: TenantSpec) -> dict[str, object]:
    """A spec as the tenants table's columns: one per declared field, of the same name (names
    from ``domain.TENANT_FIELDS``, never input; sqlite3 stores a bool as 0 or 1)."""
    return spec.flat()


def _tenant(row: sqlite3.Row) -> TenantRow:
    spec = TenantSpec.from_flat(row["name"], {f.name: row[f.name] for f in TENANT_FIELDS})
    sleep = SleepState(
        row["last_request_at"],
        row["sleeps"],
        row["wakes"],
        row["wake_started_at"],
        row["last_wake_s"],
        row["wake_refusal"],
        row["kept_asleep"],
    )
    return TenantRow(
        spec,
        TenantStatus(row["status"]),
        row["reason"],
        row["status_since"],
        row["created_at"],
        row["updated_at"],
        row["gateway_token"],
        row["device"],
        sleep,
    )


def _volume_key(row: sqlite3.Row) -> VolumeKeyRow:
    return VolumeKeyRow(
        row["tenant"], row["volume_id"], row["kek_id"], bytes(row["wrapped"]), row["size"], row["created_at"]
    )


def _quotas(row: sqlite3.Row) -> Quotas:
    """The four quota columns (the same names in the tenants and the members table)."""
    return Quotas(*(row[f] for f in QUOTA_FIELDS))


def _member(row: sqlite3.Row) -> MemberRow:
    return MemberRow(row["tenant"], row["name"], _quotas(row), row["created_at"], float(row["weight"]))


def preflight(path: Path, lock_timeout_s: float = 5.0) -> None:
    """Before anything starts: the state directory must be writable and the database not held
    by another writer (another manager on the same state). StateUnavailable says which."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StateUnavailable(
            f"the state directory {directory} is not writable ({exc.strerror or exc}): mount a writable "
            "volume there (GTM_STATE_DIR); nothing was started"
        ) from exc
    try:
        db = sqlite3.connect(path, timeout=lock_timeout_s, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.OperationalError as exc:
        hint = (
            "another process holds it: is another manager running on the same state? stop it first"
            if "locked" in str(exc)
            else "check the file and its directory"
        )
        raise StateUnavailable(f"the database {path} cannot be written ({exc}): {hint}; nothing was started") from exc


class SqliteTx(Tx):
    """The SQLite store's transaction: its connection, for the store's own methods alone."""

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db


def _conn(tx: Tx) -> sqlite3.Connection:
    if not isinstance(tx, SqliteTx):
        raise TypeError("a transaction of another store")
    return tx.db


class SqliteStore:
    """The control plane's database in SQLite (the ``store.TenantStore`` protocol): one
    connection guarded by a lock; the manager is the only writer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            migrate(self._db, MIGRATIONS, f"the manager database {path}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A business action's writes, all or none (``BEGIN IMMEDIATE``: no other writer between)."""
        with self._tx() as db:
            yield SqliteTx(db)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---------------------------------------------------------------- tenants
    def tenants(self) -> list[TenantRow]:
        with self._lock:
            return [_tenant(r) for r in self._db.execute("SELECT * FROM tenants ORDER BY name")]

    def tenant(self, name: str) -> TenantRow:
        with self._lock:
            row = self._db.execute("SELECT * FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no tenant named {name!r}; list-tenants shows the existing ones")
        return _tenant(row)

    def find_tenant(self, name: str) -> TenantRow | None:
        try:
            return self.tenant(name)
        except NotFound:
            return None

    def insert_tenant(
        self,
        tx: Tx,
        spec: TenantSpec,
        gateway_token: str = "",
        device: str = "",
        status: TenantStatus = TenantStatus.PENDING,
        reason: str = "",
    ) -> None:
        """A new tenant: pending (its engine starts), or asleep (admitted by overcommit: it starts on
        its first request)."""
        now = time.time()
        row = {
            "name": spec.name,
            **_spec_columns(spec),
            "status": status.value,
            "reason": reason,
            "status_since": now,
            "created_at": now,
            "updated_at": now,
            "gateway_token": gateway_token,
            "device": device,
        }
        try:
            _conn(tx).execute(
                f"INSERT INTO tenants ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",  # noqa: S608
                tuple(row.values()),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"tenant {spec.name!r} or port {spec.port} is already taken: {exc}") from exc

    def update_spec(self, tx: Tx, spec: TenantSpec, device: str | None = None) -> None:
        """The new spec (and, when given, the device the tenant moves to)."""
        columns = {
            **_spec_columns(spec),
            "updated_at": time.time(),
            **({"device": device} if device is not None else {}),
        }
        try:
            _conn(tx).execute(
                f"UPDATE tenants SET {', '.join(f'{c}=?' for c in columns)} WHERE name=?",  # noqa: S608
                (*columns.values(), spec.name),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"port {spec.port} is already taken by another tenant") from exc

    def set_status(self, tx: Tx, name: str, status: TenantStatus, reason: str = "") -> bool:
        """The tenant's status, where the diagram allows it from its current one; False (nothing
        written) where it does not, or the tenant is gone. Never enqueues reconcile work."""
        return self._move(_conn(tx), name, status, reason, time.time())

    @staticmethod
    def _move(
        db: sqlite3.Connection,
        name: str,
        status: TenantStatus,
        reason: str,
        at: float,
        only_from: TenantStatus | None = None,
        extra: str = "",
        args: tuple[object, ...] = (),
    ) -> bool:
        """Every status write of the store: checked against ``domain.can_transition`` inside the
        caller's transaction (``only_from``: and from that status alone). ``extra``: more
        ``column=?`` assignments of the same write, with their ``args``. ``status_since`` moves only
        when the status does."""
        row = db.execute("SELECT status FROM tenants WHERE name=?", (name,)).fetchone()
        current = TenantStatus(row["status"]) if row else None
        if current is None or not can_transition(current, status) or only_from not in (None, current):
            return False
        since = at if current != status else None
        db.execute(
            f"UPDATE tenants SET status=?, reason=?, status_since=COALESCE(?, status_since){extra} WHERE name=?",  # noqa: S608
            (status.value, reason, since, *args, name),
        )
        return True

    def note_last_request(self, name: str, at: float) -> None:
        """When the tenant's gateway last took a request (read from it by the sleeper)."""
        with self._lock:
            self._db.execute("UPDATE tenants SET last_request_at=? WHERE name=?", (at, name))

    def sleep_tenant(
        self,
        name: str,
        at: float,
        detail: dict[str, Any],
        reason: str = IDLE_REASON,
        action: str = "sleep",
    ) -> bool:
        """running -> asleep, counted and audited (``action``: sleep when idle, evict to make room
        for another's wake) in one transaction, with the reservation row the cost split prices it
        by; False when it was not running."""
        with self._tx() as db:
            moved = self._move(
                db, name, TenantStatus.ASLEEP, reason, at, TenantStatus.RUNNING, ", sleeps=sleeps+1, wake_refusal=''"
            )
            if moved:
                self._reservation_event(db, name, ReservationEvent.SLEEP, at)
                self.audit("manager", action, name, "ok", detail, tx=SqliteTx(db))
        return bool(moved)

    def wake_tenant(self, name: str, at: float, reason: str, detail: dict[str, Any]) -> bool:
        """asleep -> waking, counted and audited in one transaction; False when it was not asleep."""
        with self._tx() as db:
            extra = ", wakes=wakes+1, wake_started_at=?, wake_refusal=''"
            moved = self._move(db, name, TenantStatus.WAKING, reason, at, TenantStatus.ASLEEP, extra, (at,))
            if moved:
                self._reservation_event(db, name, ReservationEvent.WAKE, at)
                self.audit("manager", "wake", name, "ok", detail, tx=SqliteTx(db))
        return bool(moved)

    def refuse_wake(self, name: str, refusal: str, detail: dict[str, Any]) -> bool:
        """An asleep tenant cannot wake now (``refusal`` says why, with numbers), or ('') can again.
        Audited when it changes; True when it changed."""
        with self._tx() as db:
            moved = db.execute(
                "UPDATE tenants SET wake_refusal=? WHERE name=? AND status=? AND wake_refusal<>?",
                (refusal, name, TenantStatus.ASLEEP.value, refusal),
            ).rowcount
            if moved and refusal:
                self.audit("manager", "wake", name, "refused", {"reason": refusal, **detail}, tx=SqliteTx(db))
        return bool(moved)

    def _reservation_event(self, db: sqlite3.Connection, name: str, event: ReservationEvent, at: float) -> None:
        row = db.execute("SELECT gpu_memory FROM tenants WHERE name=?", (name,)).fetchone()
        self.insert_reservation(SqliteTx(db), name, event, int(row["gpu_memory"]), at)

    def woke(self, name: str, at: float) -> float | None:
        """waking -> running; returns how long the wake took (None when it was not waking)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT wake_started_at FROM tenants WHERE name=? AND status=?", (name, TenantStatus.WAKING.value)
            ).fetchone()
            if row is None:
                return None
            took = max(at - (row["wake_started_at"] or at), 0.0)
            self._move(db, name, TenantStatus.RUNNING, "", at, TenantStatus.WAKING, ", last_wake_s=?", (took,))
            self.audit("manager", "woke", name, "ok", {"wake_s": round(took, 3)}, tx=SqliteTx(db))
        return took

    def set_kept_asleep(self, name: str, kept: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE tenants SET kept_asleep=? WHERE name=?", (kept, name))

    def engine_overhead(self, model: str, images: bool) -> int | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT overhead FROM engine_overheads WHERE model=? AND images=?", (model, int(images))
            ).fetchone()
        return int(row["overhead"]) if row else None

    def record_engine_overhead(self, model: str, images: bool, overhead: int, at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO engine_overheads (model, images, overhead, at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (model, images) DO UPDATE SET overhead=excluded.overhead, at=excluded.at",
                (model, int(images), overhead, at),
            )

    def delete_tenant(self, name: str) -> None:
        """Removes the tenant and its keys; its usage records stay for cost sharing."""
        with self._tx() as db:  # all of it or none: no cursor left to a tenant that is gone
            db.execute("DELETE FROM tenants WHERE name=?", (name,))
            db.execute("DELETE FROM spool_cursors WHERE tenant=?", (name,))
            db.execute("DELETE FROM engine_failures WHERE tenant=?", (name,))

    # ---------------------------------------------------------------- encrypted volumes' keys
    def volume_key(self, tenant: str) -> VolumeKeyRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM volume_keys WHERE tenant=?", (tenant,)).fetchone()
        return _volume_key(row) if row else None

    def volume_keys(self) -> list[VolumeKeyRow]:
        with self._lock:
            return [_volume_key(r) for r in self._db.execute("SELECT * FROM volume_keys ORDER BY tenant")]

    def put_volume_key(self, key: VolumeKeyRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO volume_keys (tenant, volume_id, kek_id, wrapped, size, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant) DO UPDATE SET volume_id=excluded.volume_id, "
                "kek_id=excluded.kek_id, wrapped=excluded.wrapped, size=excluded.size, created_at=excluded.created_at",
                (key.tenant, key.volume_id, key.kek_id, key.wrapped, key.size, key.created_at),
            )

    def delete_volume_key(self, tenant: str) -> None:
        """Deletes a wrapped key for good: its bytes are overwritten in the database file
        (``secure_delete``) and the write-ahead log that held them is checkpointed and truncated."""
        with self._lock:
            self._db.execute("PRAGMA secure_delete=ON")
            try:
                with self._tx() as db:
                    db.execute("DELETE FROM volume_keys WHERE tenant=?", (tenant,))
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.execute("PRAGMA secure_delete=OFF")

    # ---------------------------------------------------------------- engine failures (backoff)
    def engine_failure(self, tenant: str) -> EngineFailure | None:
        with self._lock:
            row = self._db.execute(
                "SELECT count, marker, retry_at, log FROM engine_failures WHERE tenant=?", (tenant,)
            ).fetchone()
        return EngineFailure(row["count"], row["marker"], row["retry_at"], row["log"]) if row else None

    def save_engine_failure(self, tenant: str, failure: EngineFailure) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO engine_failures (tenant, count, marker, retry_at, log) VALUES (?,?,?,?,?)"
                " ON CONFLICT(tenant) DO UPDATE SET count=excluded.count, marker=excluded.marker,"
                " retry_at=excluded.retry_at, log=excluded.log",
                (tenant, failure.count, failure.marker, failure.retry_at, failure.log),
            )

    def clear_engine_failure(self, tenant: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM engine_failures WHERE tenant=?", (tenant,))

    # ---------------------------------------------------------------- usage
    def usage_cursor(self, tenant: str, spool: str = "") -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT cursor FROM spool_cursors WHERE tenant=? AND spool=?", (tenant, spool)
            ).fetchone()
        return int(row["cursor"]) if row else 0

    def spool_cursors(self, tenant: str) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT spool, cursor FROM spool_cursors WHERE tenant=?", (tenant,)).fetchall()
        return {str(r["spool"]): int(r["cursor"]) for r in rows}

    def add_spool_drain(self, tx: Tx, tenant: str, node: str, since: float) -> None:
        _conn(tx).execute(
            "INSERT INTO spool_drains (tenant, node, since) VALUES (?, ?, ?) ON CONFLICT(tenant, node) DO NOTHING",
            (tenant, node, since),
        )

    def spool_drains(self) -> list[tuple[str, str, float]]:
        with self._lock:
            rows = self._db.execute("SELECT tenant, node, since FROM spool_drains ORDER BY since").fetchall()
        return [(str(r["tenant"]), str(r["node"]), float(r["since"])) for r in rows]

    def drop_spool_drain(self, tenant: str, node: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM spool_drains WHERE tenant=? AND node=?", (tenant, node))

    def last_spool(self, tenant: str) -> str:
        with self._lock:
            row = self._db.execute(
                "SELECT spool FROM spool_cursors WHERE tenant=? ORDER BY at DESC LIMIT 1", (tenant,)
            ).fetchone()
        return str(row["spool"]) if row else ""

    def add_usage(self, tenant: str, records: Sequence[UsageRecord], cursor: int, spool: str = "") -> int:
        """Stores records collected from a gateway's ``spool`` and advances its cursor, in one
        transaction. A record seen twice (same request id) is stored once; one written before
        members (no member) is the key's member's. Returns how many were new."""
        with self._tx() as db:
            # one statement a record: its own count says whether it was new (the connection's total
            # would also count what the usage_days trigger writes)
            added = 0
            for r in records:
                added += db.execute(
                    _ADD_USAGE,
                    (
                        tenant, r.request_id, r.key_id, r.member, r.member, r.key_id, tenant, r.model, r.path,
                        r.prompt_tokens, r.completion_tokens, r.status, r.outcome, r.latency_ms, r.at, r.queue_ms,
                        r.first_token_ms,
                    ),
                ).rowcount  # fmt: skip
            for key_id, at in {r.key_id: r.at for r in sorted(records, key=lambda r: r.at)}.items():
                db.execute(
                    "UPDATE api_keys SET last_used_at=MAX(COALESCE(last_used_at, 0), ?) WHERE id=? AND tenant=?",
                    (at, key_id, tenant),
                )
            db.execute(
                "INSERT INTO spool_cursors (tenant, spool, cursor, at) VALUES (?, ?, ?, ?) ON CONFLICT(tenant, spool)"
                " DO UPDATE SET cursor=MAX(cursor, excluded.cursor), at=excluded.at",
                (tenant, spool, cursor, time.time()),
            )
        return added

    def latencies(self, tenant: str, since: float) -> list[tuple[str, float | None, float]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT member, first_token_ms, queue_ms FROM usage WHERE tenant=? AND at>=?", (tenant, since)
            ).fetchall()
        return [(str(r["member"]), r["first_token_ms"], float(r["queue_ms"])) for r in rows]

    def last_used(self) -> dict[str, float]:
        """Each tenant's latest usage record (UNIX seconds), from the daily rollup."""
        with self._lock:
            rows = self._db.execute("SELECT tenant, MAX(last_at) FROM usage_days GROUP BY tenant").fetchall()
        return {str(tenant): float(at) for tenant, at in rows}

    def usage_totals(self, tenant: str, since: float, until: float | None = None) -> UsageTotals:
        """The tenant's totals over any bounds (see ``usage_by_member``)."""
        return sum(self.usage_by_member(tenant, since, until).values(), UsageTotals(0, 0, 0))

    def usage_by_member(self, tenant: str, since: float, until: float | None = None) -> dict[str, UsageTotals]:
        """Each member's totals over any bounds (also members removed since: their usage stays for
        cost sharing): the whole UTC days between them from the daily rollup, only the partial days
        at either end from the records themselves."""
        end = until if until is not None else 1e18
        first = -(-since // DAY_S) * DAY_S  # the first day start at or after ``since``
        last = end // DAY_S * DAY_S if until is not None else None  # the last at or before ``until``
        with self._lock:
            if last is not None and last <= first:  # no whole day between them
                return self._record_totals(tenant, since, end)
            rows = self._db.execute(
                "SELECT member, SUM(requests) AS n, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c"
                " FROM usage_days WHERE tenant=? AND day >= ? AND day < ? GROUP BY member",
                (tenant, *whole_days(first, last)),
            ).fetchall()
            parts = [
                {r["member"]: UsageTotals(int(r["n"]), int(r["p"]), int(r["c"])) for r in rows},
                self._record_totals(tenant, since, first),
                self._record_totals(tenant, last, end) if last is not None else {},
            ]
        out: dict[str, UsageTotals] = {}
        for part in parts:
            for member, totals in part.items():
                out[member] = out.get(member, UsageTotals(0, 0, 0)) + totals
        return dict(sorted(out.items()))

    def _record_totals(self, tenant: str, since: float, until: float) -> dict[str, UsageTotals]:
        if until <= since:
            return {}
        rows = self._db.execute(
            "SELECT member, COUNT(*) AS n, COALESCE(SUM(prompt_tokens), 0) AS p,"
            " COALESCE(SUM(completion_tokens), 0) AS c FROM usage"
            " WHERE tenant=? AND at >= ? AND at < ? GROUP BY member",
            (tenant, since, until),
        ).fetchall()
        return {r["member"]: UsageTotals(int(r["n"]), int(r["p"]), int(r["c"])) for r in rows}

    def usage_counters(self) -> list[tuple[str, str, UsageTotals]]:
        """(tenant, member, totals) over all time: the manager's Prometheus counters."""
        with self._lock:
            rows = self._db.execute(
                "SELECT tenant, member, SUM(requests) AS n, SUM(prompt_tokens) AS p, SUM(completion_tokens) AS c"
                " FROM usage_days GROUP BY tenant, member ORDER BY tenant, member"
            ).fetchall()
        return [(r["tenant"], r["member"], UsageTotals(int(r["n"]), int(r["p"]), int(r["c"]))) for r in rows]

    def member_usage(self, tenant: str, day_start: float, month_start: float) -> dict[str, MemberUsage]:
        today = self.usage_by_member(tenant, day_start)
        month = self.usage_by_member(tenant, month_start)
        with self._lock:
            last = {
                r["member"]: float(r["at"])
                for r in self._db.execute(
                    "SELECT member, MAX(last_at) AS at FROM usage_days WHERE tenant=? GROUP BY member", (tenant,)
                )
            }
        empty = UsageTotals(0, 0, 0)
        return {
            m: MemberUsage(today.get(m, empty), month.get(m, empty), last.get(m))
            for m in sorted(set(today) | set(month) | set(last))
        }

    def usage_tenants(self, since: float, until: float) -> list[str]:
        """The tenants with usage between two UTC day starts."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT tenant FROM usage_days WHERE day >= ? AND day < ?", whole_days(since, until)
            )
            return [r["tenant"] for r in rows]

    def usage_daily(self, tenant: str, since: float) -> list[tuple[str, int, int]]:
        """(UTC day, requests, tokens) per day from the day of ``since``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT date(day, 'unixepoch') AS d, SUM(requests) AS n, SUM(prompt_tokens + completion_tokens) AS t"
                " FROM usage_days WHERE tenant=? AND day >= ? GROUP BY day ORDER BY day",
                (tenant, start_of_day(since)),
            )
            return [(r["d"], int(r["n"]), int(r["t"] or 0)) for r in rows]

    def usage_records(self, tenant: str, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM usage WHERE tenant=? ORDER BY at DESC LIMIT ?", (tenant, limit))
            return [dict(r) for r in rows]

    # ---------------------------------------------------------------- members
    def insert_member(self, tx: Tx, tenant: str, name: str, quotas: Quotas, now: float, weight: float = 1.0) -> None:
        try:
            _conn(tx).execute(
                f"INSERT INTO members (tenant, name, {', '.join(QUOTA_FIELDS)}, created_at, weight)"  # noqa: S608
                f" VALUES (?, ?, {', '.join('?' * len(QUOTA_FIELDS))}, ?, ?)",
                (tenant, name, *(getattr(quotas, f) for f in QUOTA_FIELDS), now, weight),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(
                f"tenant {tenant!r} already has a member named {name!r}; use update-member to change it"
            ) from exc

    def members(self, tenant: str) -> list[MemberRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM members WHERE tenant=? ORDER BY created_at, name", (tenant,))
            return [_member(r) for r in rows]

    def member(self, tenant: str, name: str) -> MemberRow:
        with self._lock:
            row = self._db.execute("SELECT * FROM members WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant!r} has no member named {name!r}; list-members --tenant {tenant} shows them")
        return _member(row)

    def update_member(self, tx: Tx, tenant: str, name: str, quotas: Quotas, weight: float = 1.0) -> None:
        _conn(tx).execute(
            f"UPDATE members SET {', '.join(f'{f}=?' for f in QUOTA_FIELDS)}, weight=? WHERE tenant=? AND name=?",  # noqa: S608
            (*(getattr(quotas, f) for f in QUOTA_FIELDS), weight, tenant, name),
        )

    def delete_member(self, tx: Tx, tenant: str, name: str) -> None:
        """Removes the member and its keys; its usage records stay for cost sharing."""
        _conn(tx).execute("DELETE FROM api_keys WHERE tenant=? AND member=?", (tenant, name))
        _conn(tx).execute("DELETE FROM members WHERE tenant=? AND name=?", (tenant, name))

    # ---------------------------------------------------------------- keys
    def insert_key(self, tx: Tx, key: KeyRow) -> None:
        _conn(tx).execute(
            "INSERT INTO api_keys (id, tenant, prefix, hash, created_at, expires_at, last_used_at, member)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (key.id, key.tenant, key.prefix, key.hash, key.created_at, key.expires_at, key.last_used_at, key.member),
        )

    def expire_keys(self, tx: Tx, tenant: str, member: str, at: float) -> None:
        """Ends a member's keys at ``at`` (those that would last longer)."""
        _conn(tx).execute(
            "UPDATE api_keys SET expires_at=? WHERE tenant=? AND member=? AND (expires_at IS NULL OR expires_at > ?)",
            (at, tenant, member, at),
        )

    def expire_key(self, tx: Tx, tenant: str, key_id: str, at: float) -> None:
        _conn(tx).execute("UPDATE api_keys SET expires_at=? WHERE id=? AND tenant=?", (at, key_id, tenant))

    def keys(self, tenant: str, member: str | None = None) -> list[KeyRow]:
        """The tenant's keys (or one member's), oldest first."""
        sql, args = "SELECT * FROM api_keys WHERE tenant=?", [tenant]
        if member is not None:
            sql, args = sql + " AND member=?", [tenant, member]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at", args)
            return [KeyRow(**dict(r)) for r in rows]

    # ---------------------------------------------------------------- audit
    def audit(
        self,
        actor: str,
        action: str,
        tenant: str | None,
        result: str,
        detail: dict[str, Any] | None = None,
        tx: Tx | None = None,
    ) -> None:
        args = (time.time(), actor, action, tenant, result, json.dumps(detail or {}, default=str))
        sql = "INSERT INTO audit (at, actor, action, tenant, result, detail) VALUES (?,?,?,?,?,?)"
        if tx is not None:
            _conn(tx).execute(sql, args)
        else:
            with self._lock:
                self._db.execute(sql, args)

    def audit_actions(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT action FROM audit ORDER BY action")]

    def insert_reservation(self, tx: Tx, tenant: str, event: ReservationEvent, gpu_memory: int, at: float) -> None:
        """In the transaction of the change it records."""
        _conn(tx).execute(
            "INSERT INTO reservations (tenant, event, gpu_memory, at) VALUES (?,?,?,?)",
            (tenant, event.value, gpu_memory, at),
        )

    def reservations(self) -> list[ReservationRow]:
        """Every reservation change, oldest first (a few per tenant's life, however busy it was)."""
        with self._lock:
            # by time: an older release's sleeps and wakes were filled in after its other rows
            rows = self._db.execute("SELECT * FROM reservations ORDER BY at, id").fetchall()
        return [
            ReservationRow(r["id"], r["tenant"], ReservationEvent(r["event"]), r["gpu_memory"], r["at"]) for r in rows
        ]

    def audit_log(
        self, tenant: str | None = None, action: str | None = None, limit: int = 200, before: int | None = None
    ) -> list[AuditRow]:
        """Newest first; ``before``: only entries older than that id (the next page)."""
        sql = "SELECT * FROM audit WHERE 1=1"
        args: list[object] = []
        if before is not None:
            sql += " AND id<?"
            args.append(before)
        if tenant:
            sql += " AND tenant=?"
            args.append(tenant)
        if action:
            sql += " AND action=?"
            args.append(action)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [
            AuditRow(r["id"], r["at"], r["actor"], r["action"], r["tenant"], r["result"], json.loads(r["detail"]))
            for r in rows
        ]
