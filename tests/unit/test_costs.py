import json
from pathlib import Path

from manager.control.costs import month_bounds, reservation_intervals, split
from manager.control.store import AuditRow, Store

G = 1024**3


def row(i: int, at: float, action: str, tenant: str, size: int | None = None, result: str = "ok") -> AuditRow:
    return AuditRow(i, at, "admin", action, tenant, result, {"gpu_memory": size} if size else {})


def test_intervals_follow_add_resize_remove() -> None:
    audit = [
        row(1, 0, "add-tenant", "a", 10 * G),
        row(2, 100, "update-tenant", "a", 20 * G),
        row(3, 50, "add-tenant", "b", 5 * G, result="refused"),
        row(4, 300, "remove-tenant", "a"),
        row(5, 200, "add-tenant", "c", 1 * G),
    ]
    assert reservation_intervals(audit, now=1000) == {
        "a": [(0, 100, 10 * G), (100, 300, 20 * G)],
        "c": [(200, 1000, G)],
    }


def test_split_by_memory_hours_and_by_tokens(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    start, end = month_bounds("2026-11")
    # a holds 30 GiB all month; b holds 10 GiB for the second half
    with store.transaction() as db:
        db.execute(
            "INSERT INTO audit (at, actor, action, tenant, result, detail) VALUES (?,?,?,?,?,?)",
            (start - 10, "admin", "add-tenant", "a", "ok", json.dumps({"gpu_memory": 30 * G})),
        )
        db.execute(
            "INSERT INTO audit (at, actor, action, tenant, result, detail) VALUES (?,?,?,?,?,?)",
            (start + (end - start) / 2, "admin", "add-tenant", "b", "ok", json.dumps({"gpu_memory": 10 * G})),
        )
    rec = {
        "key_id": "k",
        "model": "m",
        "path": "/v1/chat/completions",
        "status": 200,
        "outcome": "ok",
        "latency_ms": 1.0,
    }
    store.add_usage("a", [{**rec, "request_id": "1", "prompt_tokens": 100, "completion_tokens": 0, "at": start + 5}], 1)
    store.add_usage("b", [{**rec, "request_id": "2", "prompt_tokens": 200, "completion_tokens": 100, "at": end - 5}], 1)
    shares = {s.tenant: s for s in split("2026-11", 700.0, store, now=end + 100)}
    assert shares["a"].share_by_memory == round(30 / 35, 6)
    assert shares["a"].cost_by_memory == 600.0
    assert shares["b"].cost_by_memory == 100.0
    assert shares["a"].cost_by_tokens == 175.0 and shares["b"].cost_by_tokens == 525.0
    assert abs(shares["a"].gib_hours - 30 * (end - start) / 3600) < 1e-3
