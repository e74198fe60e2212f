"""Versioned schema migrations for the SQLite files: the manager's database and each
gateway's spool.

A file's version is ``PRAGMA user_version``: the number of steps applied. Each step is
a list of statements applied in one transaction together with the version bump, in
order, at start-up; a file from an older release is brought forward in place and
keeps every row. Step 1 is the schema of the first release, written with
``IF NOT EXISTS``: files of that release carry version 0 and already have it.
A file written by a newer release is refused rather than guessed at.

Steps are append-only: never edit a released step, add one. ``tests/unit/test_upgrade.py``
opens files written by an earlier release (``tests/fixtures/release-*``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from manager.errors import StateUnavailable

Step = Sequence[str]


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, steps: Sequence[Step], what: str) -> int:
    """Applies the steps the file has not seen yet; returns the file's version afterwards.
    ``db`` must be in autocommit mode (``isolation_level=None``)."""
    current = version(db)
    if current > len(steps):
        raise StateUnavailable(
            f"{what} has schema version {current}, newer than this release knows ({len(steps)}): it was "
            "written by a newer release; run that release (downgrades are not supported)"
        )
    for number, statements in enumerate(steps[current:], start=current + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number:d}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return len(steps)
