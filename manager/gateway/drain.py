"""A gateway's spool read where its gateway no longer runs: on a swarm, a tenant placed on another
node leaves its old gateway's volume on the node it was lost with. When that node returns, the
manager runs ``manager drain-spool`` there as a one-off on the old volume and stores what it prints:
the records its old gateway spooled after the manager last collected (at most one collection
interval of traffic), each stored once (records are keyed by request id, cursors only move on).

Requests the old gateway had in flight are settled as interrupted, as a restarted gateway settles
them, with what was saved of them, at the time the spool was last written."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from manager.contract import DRAINED_PAGE
from manager.gateway.store import SPOOL_FILE, GatewayStore

PAGE_RECORDS = 20
"""Records a printed page holds: a line stays well under the 16 KiB at which Docker splits a log line."""


def drain(data_dir: Path, cursors: Mapping[str, int], out: TextIO, page_records: int = PAGE_RECORDS) -> int:
    """Prints the spool's pages after its cursor in ``cursors`` (by spool identity; from its start
    when absent), the first one even when empty (it names the spool). Returns how many records were
    printed; a data directory without a spool prints nothing (its volume held no gateway)."""
    path = data_dir / SPOOL_FILE
    if not path.exists():
        return 0
    written = [p.stat().st_mtime for p in (path, path.with_name(SPOOL_FILE + "-wal")) if p.exists()]
    store = GatewayStore(path, checkpoint_s=None)
    try:
        store.settle_interrupted(max(written))
        page = store.after(cursors.get(store.spool_id, 0), page_records)
        printed = 0
        while True:
            print(DRAINED_PAGE + page.model_dump_json(), file=out, flush=True)
            printed += len(page.records)
            if not page.records:
                return printed
            page = store.after(page.cursor, page_records)
    finally:
        store.close()
