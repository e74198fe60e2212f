import calendar
from pathlib import Path
from typing import Any

import pytest

from manager.contract import UsageRecord
from manager.control.costs import incarnations, month_bounds, split
from manager.control.records import ReservationEvent, ReservationRow
from manager.control.sqlite_store import SqliteStore
from manager.errors import InvalidInput

G = 1024**3


ADD, RESIZE, REMOVE = ReservationEvent.ADD, ReservationEvent.RESIZE, ReservationEvent.REMOVE
SLEEP = ReservationEvent.SLEEP


def test_intervals_follow_add_resize_remove() -> None:
    reservations = [
        ReservationRow(1, "a", ADD, 10 * G, 0),
        ReservationRow(2, "a", RESIZE, 20 * G, 100),
        ReservationRow(3, "c", ADD, 1 * G, 200),
        ReservationRow(4, "a", REMOVE, 0, 300),
        ReservationRow(5, "b", RESIZE, 5 * G, 400),  # a resize of no living tenant counts nothing
    ]
    assert {life.tenant: life.spans for life in incarnations(reservations, now=1000)} == {
        "a": [(0, 100, 10 * G, False), (100, 300, 20 * G, False)],
        "c": [(200, 1000, G, False)],
    }


def test_asleep_hours_are_priced_apart_at_the_rate_the_admin_sets(tmp_path: Path) -> None:
    """a and b reserve 10 GiB all month; b sleeps half of it. By default an asleep hour costs what
    a sleeper keeps (nothing: its engine is stopped); at the admin's rate, that share of an awake one."""
    store = SqliteStore(tmp_path / "m.db")
    start, end = month_bounds("2026-11")
    half = start + (end - start) / 2
    with store.transaction() as db:
        store.insert_reservation(db, "a", ADD, 10 * G, start)
        store.insert_reservation(db, "b", ADD, 10 * G, start)
        store.insert_reservation(db, "b", SLEEP, 10 * G, half)
        store.insert_reservation(db, "b", RESIZE, 20 * G, half + 3600)  # resized asleep: still asleep
    (life,) = [x for x in incarnations(store.reservations(), now=end) if x.tenant == "b"]
    assert [s[3] for s in life.spans] == [False, True, True]
    hours = (end - start) / 3600
    a, b = split("2026-11", 100.0, store, now=end)
    assert (b.gib_hours_awake, b.gib_hours) == (round(10 * hours / 2, 4), round(10 * hours / 2, 4))
    assert b.gib_hours_asleep == round(10 + 20 * (hours / 2 - 1), 4)
    assert (a.cost_by_memory, b.cost_by_memory) == (66.67, 33.33), "b pays its awake half only"
    a, b = split("2026-11", 100.0, store, now=end, asleep_rate=1.0)
    assert b.gib_hours == round(b.gib_hours_awake + b.gib_hours_asleep, 4), "asleep priced as awake"
    _, b = split("2026-11", 100.0, store, now=end, asleep_rate=0.5)
    assert b.gib_hours == round(b.gib_hours_awake + 0.5 * b.gib_hours_asleep, 4)
    with pytest.raises(InvalidInput, match="from 0 to 1"):
        split("2026-11", 100.0, store, now=end, asleep_rate=1.5)
    # a GPU engine sleeps in place and keeps its CUDA context: by default that is what is priced
    _, b = split("2026-11", 100.0, store, now=end, kept_asleep=G // 2)
    assert b.gib_hours == round(b.gib_hours_awake + 0.5 * (hours / 2), 4)
    store.close()


def test_split_by_memory_hours_and_by_tokens(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "m.db")
    start, end = month_bounds("2026-11")
    # a holds 30 GiB all month; b holds 10 GiB for the second half
    with store.transaction() as db:
        store.insert_reservation(db, "a", ADD, 30 * G, start - 10)
        store.insert_reservation(db, "b", ADD, 10 * G, start + (end - start) / 2)

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
    store = SqliteStore(tmp_path / "m.db")
    start, end = month_bounds("2026-11")
    day = 86400.0
    with store.transaction() as db:
        store.insert_reservation(db, "acc", ADD, 2 * G, start + 1 * day)
        store.insert_reservation(db, "acc", REMOVE, 0, start + 2 * day + 600)
        store.insert_reservation(db, "acc", ADD, 4 * G, start + 2 * day + 900)

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


def test_create_resize_remove_through_the_service_is_priced_from_typed_rows(svc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The service writes each reservation change with its spec change, at its clock's time; the
    split prices them (the audit trail's free-form detail is not read)."""
    import sqlite3

    from .test_service import MIB, create

    start = float(calendar.timegm((2026, 3, 10, 9, 0, 0)))
    now = [start]
    svc.clock = lambda: now[0]
    create(svc, "lab")
    now[0] += 3600
    svc.update("lab", "admin", gpu_memory=2048 * MIB)
    now[0] += 600
    svc.update("lab", "admin", max_num_seqs=4)  # no new size: no reservation row
    now[0] += 1800
    svc.remove("lab", "admin")
    now[0] += 60
    svc.remove("lab", "admin")  # asked again: the reservation ended at the first
    rows = svc.store.reservations()
    assert [(r.tenant, r.event, r.gpu_memory, r.at) for r in rows] == [
        ("lab", ADD, 1536 * MIB, start),
        ("lab", RESIZE, 2048 * MIB, start + 3600),
        ("lab", REMOVE, 0, start + 6000),
    ]
    with sqlite3.connect(tmp_path / "m.db") as db:  # the svc fixture's store: nothing reads the audit's detail
        db.execute("UPDATE audit SET detail = '{}'")
    (share,) = svc.cost("2026-03", 100.0)
    held = (3600 * 1.5 + 2400 * 2.0) / 3600  # GiB-hours: 1.5 GiB for an hour, then 2 GiB for 40 minutes
    assert share.tenant == "lab" and share.removed_at == start + 6000 and share.added_at == start
    assert abs(share.gib_hours - held) < 1e-4 and share.cost_by_memory == 100.0
