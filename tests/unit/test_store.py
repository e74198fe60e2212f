"""The store's tests, run against every implementation of its protocol (``store.TenantStore``);
the preflight checks are the SQLite store's own."""

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from manager.control.records import KeyRow
from manager.control.sqlite_store import SqliteStore
from manager.control.store import TenantStore
from manager.domain import ALLOWED_TRANSITIONS, Quotas, TenantSpec, TenantStatus, can_transition
from manager.errors import Conflict, NotFound


def spec(name: str = "a", port: int = 30001) -> TenantSpec:
    return TenantSpec(
        name=name, port=port, gpu_memory=2**30, model="demo", max_model_len=512, quotas=Quotas(rpm_limit=30)
    )


IMPLEMENTATIONS: dict[str, Callable[[Path], TenantStore]] = {"sqlite": SqliteStore}
"""Every implementation of the store's protocol; each runs every store test below."""


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def open_store(request: pytest.FixtureRequest) -> Callable[[Path], TenantStore]:
    return IMPLEMENTATIONS[request.param]


def test_round_trip_and_uniqueness(tmp_path: Path, open_store: Callable[[Path], TenantStore]) -> None:
    store = open_store(tmp_path / "m.db")
    with store.transaction() as db:
        store.insert_tenant(db, spec())
    row = store.tenant("a")
    assert row.spec == spec() and row.status == TenantStatus.PENDING
    with pytest.raises(Conflict), store.transaction() as db:
        store.insert_tenant(db, spec("b", 30001))
    with pytest.raises(NotFound, match="list-tenants"):
        store.tenant("b")


def test_failed_transaction_leaves_nothing(tmp_path: Path, open_store: Callable[[Path], TenantStore]) -> None:
    store = open_store(tmp_path / "m.db")
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.insert_tenant(db, spec())
        store.insert_key(db, KeyRow("k1", "a", "gtm", "h", 1.0, None, None))
        raise RuntimeError("boom")
    assert store.tenants() == [] and store.keys("a") == []


def test_state_survives_reopen_and_keys_cascade(tmp_path: Path, open_store: Callable[[Path], TenantStore]) -> None:
    store = open_store(tmp_path / "m.db")
    with store.transaction() as db:
        store.insert_tenant(db, spec())
        store.insert_key(db, KeyRow("k1", "a", "gtm", "h", 1.0, None, None))
    with store.transaction() as tx:
        assert store.set_status(tx, "a", TenantStatus.FAILED, "why")
    store.audit("admin", "add-tenant", "a", "ok", {"x": 1})
    store.close()
    again = open_store(tmp_path / "m.db")
    assert again.tenant("a").reason == "why"
    assert again.audit_log(tenant="a")[0].detail == {"x": 1}
    again.delete_tenant("a")
    assert again.keys("a") == []


def test_concurrent_writers_do_not_collide(tmp_path: Path, open_store: Callable[[Path], TenantStore]) -> None:
    store = open_store(tmp_path / "m.db")

    def work(i: int) -> None:
        for j in range(20):
            store.audit("admin", "x", f"t{i}", "ok", {"j": j})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.audit_log(limit=1000)) == 160


def test_preflight_refuses_a_state_dir_it_cannot_write(tmp_path: Path) -> None:
    from manager.control.sqlite_store import preflight
    from manager.errors import StateUnavailable

    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(StateUnavailable, match="not writable"):
        preflight(tmp_path / "not-a-dir" / "manager.db")


def test_preflight_refuses_a_database_another_process_holds(tmp_path: Path) -> None:
    import sqlite3

    from manager.control.sqlite_store import preflight
    from manager.errors import StateUnavailable

    holder = sqlite3.connect(tmp_path / "manager.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StateUnavailable, match="another manager"):
            preflight(tmp_path / "manager.db", lock_timeout_s=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    preflight(tmp_path / "manager.db")


def test_the_daily_rollup_counts_each_record_once_on_its_utc_day(
    tmp_path: Path, open_store: Callable[[Path], TenantStore]
) -> None:
    """/metrics, list-members, the daily bars and the cost split read ``usage_days``, kept by a
    trigger; it must equal what the records themselves add up to, a record collected twice once."""
    import random

    from manager.utc import DAY_S, start_of_day

    from .fakes import usage_record

    store = open_store(tmp_path / "m.db")
    with store.transaction() as db:
        store.insert_tenant(db, spec("a", 30001))
        store.insert_tenant(db, spec("b", 30002))
    rng = random.Random(7)
    day0 = 1_796_083_200.0  # a UTC midnight
    records = {
        t: [
            usage_record(
                f"{t}-{i}",
                member=rng.choice(["alice", "bob", t]),
                prompt_tokens=rng.randint(0, 50),
                completion_tokens=rng.randint(0, 50),
                at=day0 + rng.uniform(-2 * DAY_S, 3 * DAY_S) if i % 10 else day0 + (i // 10 % 3) * DAY_S,  # midnights
            )
            for i in range(300)
        ]
        for t in ("a", "b")
    }
    for t, recs in records.items():
        store.add_usage(t, recs[:200], cursor=200)
        store.add_usage(t, recs[150:], cursor=300)  # 50 collected twice

    for t, recs in records.items():
        for since in (day0 - 2 * DAY_S, day0, day0 + DAY_S):
            want: dict[str, list[int]] = {}
            for r in recs:
                if r.at >= since:
                    n = want.setdefault(r.member, [0, 0, 0])
                    n[0], n[1], n[2] = n[0] + 1, n[1] + r.prompt_tokens, n[2] + r.completion_tokens
            got = store.usage_by_member(t, since)
            assert {m: [u.requests, u.prompt_tokens, u.completion_tokens] for m, u in got.items()} == want
        daily = {d: (n, tok) for d, n, tok in store.usage_daily(t, day0 - 2 * DAY_S)}
        assert sum(n for n, _ in daily.values()) == 300
        assert len(daily) == len({start_of_day(r.at) for r in recs})
        last = store.member_usage(t, day0, day0)
        assert {m: u.last_used_at for m, u in last.items()} == {
            m: max(r.at for r in recs if r.member == m) for m in {r.member for r in recs}
        }
    for t, recs in records.items():  # any bounds: whole days from the rollup, partial days from the records
        bounds = [
            (0.0, None),
            (day0, None),
            (day0 + 0.5, day0 + DAY_S - 0.5),
            (day0 - 1.5 * DAY_S, day0 + 2.25 * DAY_S),
        ]
        bounds += [(day0 + rng.uniform(-3, 3) * DAY_S, day0 + rng.uniform(-1, 4) * DAY_S) for _ in range(40)]
        for since, until in bounds:
            inside = [r for r in recs if r.at >= since and (until is None or r.at < until)]
            got = store.usage_totals(t, since, until)
            assert (got.requests, got.prompt_tokens, got.completion_tokens) == (
                len(inside),
                sum(r.prompt_tokens for r in inside),
                sum(r.completion_tokens for r in inside),
            ), (since, until)
            by_member: dict[str, list[int]] = {}
            for r in inside:
                n = by_member.setdefault(r.member, [0, 0, 0])
                n[0], n[1], n[2] = n[0] + 1, n[1] + r.prompt_tokens, n[2] + r.completion_tokens
            got_members = store.usage_by_member(t, since, until)
            assert {m: [u.requests, u.prompt_tokens, u.completion_tokens] for m, u in got_members.items()} == by_member
    counters = {(t, m): u.requests for t, m, u in store.usage_counters()}
    assert sum(counters.values()) == 600 and sorted(store.usage_tenants(day0, day0 + DAY_S)) == ["a", "b"]
    store.close()


STATUSES = list(TenantStatus)


@pytest.mark.parametrize("start", STATUSES, ids=str)
def test_every_status_write_follows_the_diagram(
    tmp_path: Path, open_store: Callable[[Path], TenantStore], start: TenantStatus
) -> None:
    """From each status, every other one: the store writes exactly the diagram's arrows (and
    staying), and a refused write leaves the status, its reason and its time as they were."""
    store = open_store(tmp_path / "m.db")
    for target in STATUSES:
        name = f"t-{target.value}"
        with store.transaction() as db:
            store.insert_tenant(db, spec(name, 30000 + STATUSES.index(target)), status=start, reason="before")
        before = store.tenant(name)
        with store.transaction() as db:
            moved = store.set_status(db, name, target, "after")
        after = store.tenant(name)
        assert moved == can_transition(start, target) == (target == start or target in ALLOWED_TRANSITIONS[start])
        if moved:
            assert (after.status, after.reason) == (target, "after")
        else:
            assert (after.status, after.reason, after.status_since) == (start, "before", before.status_since)


def test_sleeps_and_wakes_take_their_arrow_only(tmp_path: Path, open_store: Callable[[Path], TenantStore]) -> None:
    store = open_store(tmp_path / "m.db")
    with store.transaction() as db:
        store.insert_tenant(db, spec(), status=TenantStatus.STARTING)
    assert not store.sleep_tenant("a", 1.0, {}), "only a running tenant is put to sleep"
    assert not store.wake_tenant("a", 1.0, "waking", {}) and store.woke("a", 1.0) is None
    with store.transaction() as db:
        store.set_status(db, "a", TenantStatus.RUNNING)
    assert store.sleep_tenant("a", 2.0, {}) and store.tenant("a").status == TenantStatus.ASLEEP
    assert store.wake_tenant("a", 3.0, "waking", {}) and store.tenant("a").status == TenantStatus.WAKING
    assert store.woke("a", 5.0) == 2.0
    row = store.tenant("a")
    assert (row.status, row.status_since, row.sleep.sleeps, row.sleep.wakes) == (TenantStatus.RUNNING, 5.0, 1, 1)


def test_each_gateway_spool_is_collected_from_its_own_start(tmp_path) -> None:
    """A tenant placed on another node gets a gateway on a new volume: its spool counts from 1
    again. Collection reads it from its own start (not from the old spool's cursor, which would skip
    its first records), and an old spool that comes back goes on where it stood. Nothing twice."""
    from manager.contract import UsagePage
    from manager.control.gateway_client import collect_usage
    from manager.control.sqlite_store import SqliteStore
    from tests.unit.fakes import usage_record

    class Spool:
        def __init__(self, spool: str, ids: list[str]) -> None:
            self.spool, self.records = spool, [usage_record(i) for i in ids]

        def usage(self, after: int, limit: int = 1000) -> UsagePage:
            page = self.records[after : after + limit]
            return UsagePage(records=page, cursor=after + len(page), spool=self.spool)

    store = SqliteStore(tmp_path / "m.db")
    try:
        old = Spool("a1", ["r1", "r2", "r3"])
        assert collect_usage(store, "acme", old) == 3  # type: ignore[arg-type]
        new = Spool("b2", ["r4"])
        assert collect_usage(store, "acme", new) == 1, "its first record, though the old cursor is 3"  # type: ignore[arg-type]
        old.records.append(usage_record("r5"))  # written before the old node was lost, read once it is back
        assert collect_usage(store, "acme", old) == 1  # type: ignore[arg-type]
        assert collect_usage(store, "acme", new) == 0 and collect_usage(store, "acme", old) == 0  # type: ignore[arg-type]
        assert (store.usage_cursor("acme", "a1"), store.usage_cursor("acme", "b2")) == (4, 1)
        assert store.usage_totals("acme", 0).requests == 5
    finally:
        store.close()


def test_a_gateway_spool_keeps_its_identity_and_a_new_one_gets_its_own(tmp_path) -> None:
    from manager.gateway.store import GatewayStore

    first = GatewayStore(tmp_path / "a.db")
    identity = first.spool_id
    first.close()
    again = GatewayStore(tmp_path / "a.db")
    other = GatewayStore(tmp_path / "b.db")
    try:
        assert again.spool_id == identity and len(identity) == 32
        assert other.spool_id != identity
        assert again.after(0).spool == identity
    finally:
        again.close()
        other.close()
