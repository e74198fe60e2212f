import json
from pathlib import Path
from typing import Any

from manager.contract import UsageRecord
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

    def rec(request_id: str, member: str, prompt: int, completion: int, at: float) -> UsageRecord:
        fields: dict[str, Any] = dict(model="m", path="/v1/chat/completions", status=200, outcome="ok", latency_ms=1.0)
        return UsageRecord(
            request_id=request_id,
            key_id="k-" + member,
            member=member,
            prompt_tokens=prompt,
            completion_tokens=completion,
            at=at,
            **fields,
        )

    # tenant a: alice used 75 tokens in 1 request, bob 25 tokens in 3 requests
    store.add_usage(
        "a",
        [
            rec("1", "alice", 70, 5, start + 5),
            rec("2", "bob", 10, 5, start + 6),
            rec("3", "bob", 5, 0, start + 7),
            rec("4", "bob", 5, 0, start + 8),
        ],
        4,
    )
    store.add_usage("b", [rec("5", "b", 200, 100, end - 5)], 1)
    shares = {s.tenant: s for s in split("2026-11", 700.0, store, now=end + 100)}
    assert shares["a"].share_by_memory == round(30 / 35, 6)
    assert shares["a"].cost_by_memory == 600.0
    assert shares["b"].cost_by_memory == 100.0
    assert shares["a"].cost_by_tokens == 175.0 and shares["b"].cost_by_tokens == 525.0
    assert abs(shares["a"].gib_hours - 30 * (end - start) / 3600) < 1e-3
    # inside a: its 600 split by each member's share of a's tokens, and of a's requests
    alice, bob = shares["a"].members
    assert (alice.member, alice.tokens, alice.requests) == ("alice", 75, 1)
    assert (alice.share_by_tokens, alice.cost_by_tokens) == (0.75, 450.0)
    assert (alice.share_by_requests, alice.cost_by_requests) == (0.25, 150.0)
    assert (bob.cost_by_tokens, bob.cost_by_requests) == (150.0, 450.0)
    assert [m.member for m in shares["b"].members] == ["b"]
    assert shares["b"].members[0].cost_by_tokens == 100.0


def test_a_name_removed_and_added_again_is_two_tenants(tmp_path: Path) -> None:
    """Each life of a name keeps its own reservation and its own usage (none moves to the new one)."""
    store = Store(tmp_path / "m.db")
    start, end = month_bounds("2026-11")
    day = 86400.0
    events = [
        (start + 1 * day, "add-tenant", {"gpu_memory": 2 * G}),
        (start + 2 * day + 600, "remove-tenant", {}),
        (start + 2 * day + 900, "add-tenant", {"gpu_memory": 4 * G}),
    ]
    with store.transaction() as db:
        for at, action, detail in events:
            db.execute(
                "INSERT INTO audit (at, actor, action, tenant, result, detail) VALUES (?,?,?,?,?,?)",
                (at, "admin", action, "acc", "ok", json.dumps(detail)),
            )

    def rec(request_id: str, tokens: int, at: float) -> UsageRecord:
        return UsageRecord(
            request_id=request_id,
            key_id="k",
            member="acc",
            model="m",
            path="/v1/chat/completions",
            prompt_tokens=tokens,
            completion_tokens=0,
            status=200,
            outcome="ok",
            latency_ms=1.0,
            at=at,
        )

    # the first life: 3 requests, the last collected after its removal; the second: 2, the same day
    store.add_usage("acc", [rec("1", 10, start + day + 5), rec("2", 10, start + 2 * day + 5)], 2)
    store.add_usage("acc", [rec("3", 10, start + 2 * day + 650)], 3)
    store.add_usage("acc", [rec("4", 7, start + 2 * day + 1000), rec("5", 7, start + 5 * day)], 5)
    first, second = split("2026-11", 100.0, store, now=end)
    assert (first.tenant, first.requests, first.tokens) == ("acc", 3, 30)
    assert first.removed_at == start + 2 * day + 600 and first.added_at == start + day
    assert (second.tenant, second.requests, second.tokens, second.removed_at) == ("acc", 2, 14, None)
    assert abs(first.gib_hours - 2 * (day + 600) / 3600) < 1e-3
    assert abs(second.gib_hours - 4 * (end - start - 2 * day - 900) / 3600) < 1e-3
    assert first.members[0].requests == 3 and second.members[0].requests == 2
