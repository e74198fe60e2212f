import threading
from pathlib import Path

import pytest

from manager.control.store import KeyRow, Store
from manager.domain import Quotas, TenantSpec, TenantStatus
from manager.errors import Conflict, NotFound


def spec(name: str = "a", port: int = 30001) -> TenantSpec:
    return TenantSpec(
        name=name, port=port, gpu_memory=2**30, model="demo", max_model_len=512, quotas=Quotas(rpm_limit=30)
    )


def test_round_trip_and_uniqueness(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    with store.transaction() as db:
        store.insert_tenant(db, spec())
    row = store.tenant("a")
    assert row.spec == spec() and row.status == TenantStatus.PENDING
    with pytest.raises(Conflict), store.transaction() as db:
        store.insert_tenant(db, spec("b", 30001))
    with pytest.raises(NotFound, match="list-tenants"):
        store.tenant("b")


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    with pytest.raises(RuntimeError), store.transaction() as db:
        store.insert_tenant(db, spec())
        store.insert_key(db, KeyRow("k1", "a", "gtm", "h", 1.0, None, None))
        raise RuntimeError("boom")
    assert store.tenants() == [] and store.keys("a") == []


def test_state_survives_reopen_and_keys_cascade(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    with store.transaction() as db:
        store.insert_tenant(db, spec())
        store.insert_key(db, KeyRow("k1", "a", "gtm", "h", 1.0, None, None))
    store.set_status("a", TenantStatus.FAILED, "why")
    store.audit("admin", "add-tenant", "a", "ok", {"x": 1})
    store.close()
    again = Store(tmp_path / "m.db")
    assert again.tenant("a").reason == "why"
    assert again.audit_log(tenant="a")[0].detail == {"x": 1}
    again.delete_tenant("a")
    assert again.keys("a") == []


def test_concurrent_writers_do_not_collide(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")

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
    from manager.control.store import preflight
    from manager.errors import StateUnavailable

    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(StateUnavailable, match="not writable"):
        preflight(tmp_path / "not-a-dir" / "manager.db")


def test_preflight_refuses_a_database_another_process_holds(tmp_path: Path) -> None:
    import sqlite3

    from manager.control.store import preflight
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
