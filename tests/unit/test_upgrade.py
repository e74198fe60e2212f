"""Upgrades keep state: files written by an earlier release (tests/fixtures/release-*,
made with that release's own code) are opened by this one, migrated in place, and every
tenant, key, usage record and audit row is still there; the old keys still authenticate."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from manager.control.costs import split
from manager.control.gateway_client import desired_config
from manager.control.sqlite_store import MIGRATIONS, SqliteStore
from manager.domain import TenantStatus
from manager.errors import StateUnavailable
from manager.gateway.state import GatewayState
from manager.gateway.store import MIGRATIONS as SPOOL_MIGRATIONS
from manager.gateway.store import GatewayStore
from manager.migrations import version

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SLEEP_ACTIONS = ("sleep", "wake", "woke")
RELEASES = sorted(p for p in FIXTURES.glob("release-*") if p.is_dir())


@pytest.fixture(params=RELEASES, ids=[p.name for p in RELEASES])
def release(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(request.param, copy)
    return copy


def test_the_manager_database_upgrades_in_place(release: Path) -> None:
    store = SqliteStore(release / "manager.db")
    try:
        (row,) = store.tenants()
        assert (row.spec.name, row.spec.port, row.spec.gpu_memory, row.status) == (
            "lab",
            30001,
            10 * 1024**3,
            TenantStatus.RUNNING,
        )
        assert (row.spec.quotas.rpm_limit, row.spec.quotas.tokens_per_day) == (30, 100_000)
        assert row.gateway_token == "fixture-gateway-token"
        assert row.spec.max_body == 32 * 1024**2  # the column a later release added, at its default
        # step 6: a tenant from before takes no images until its admin says so; prefix caching is on
        assert (row.spec.max_images, row.spec.max_image_pixels) == (0, 4096 * 3072)
        assert row.spec.enable_prefix_caching and not row.spec.trust_remote_code and row.spec.max_num_seqs is None
        assert row.device == ""  # step 7: placed on the host's first device, where older releases ran it
        assert len(store.keys("lab")) == 2
        assert store.usage_totals("lab", 0).requests == 3
        assert store.usage_cursor("lab") == 3
        slept = [a.action for a in store.audit_log("lab") if a.action in SLEEP_ACTIONS]
        others = [a.action for a in store.audit_log("lab") if a.action not in SLEEP_ACTIONS]
        assert others == ["rotate-key", "add-tenant"]
        # step 8: the reservation the audit trail recorded becomes a typed row, which the cost split reads
        (added,) = [r for r in store.reservations() if r.event.value == "add"]
        (audited,) = store.audit_log("lab", "add-tenant")
        assert (added.tenant, added.event.value, added.gpu_memory) == ("lab", "add", 10 * 1024**3)
        assert abs(added.at - audited.at) < 1.0  # the audit's own time, or written beside it
        # step 10: a release's sleeps and wakes become reservation rows too, at the size it had then
        sleeps = [(r.event.value, r.gpu_memory) for r in store.reservations() if r.event.value in ("sleep", "wake")]
        assert sleeps == ([("sleep", 10 * 1024**3), ("wake", 10 * 1024**3)] if slept else [])
        assert not row.spec.always_on and row.sleep.wake_refusal == ""
        if slept:
            assert slept == ["woke", "wake", "sleep"] and (row.sleep.sleeps, row.sleep.wakes) == (1, 1)
        (share,) = split(time.strftime("%Y-%m", time.gmtime(added.at)), 50.0, store, now=added.at + 3600)
        assert share.tenant == "lab" and abs(share.gib_hours - 10.0) < 1e-3 and share.cost_by_memory == 50.0
        assert store.engine_failure("lab") is None  # the table the new release added is there
        # members: the tenant's keys and usage belong to its first member, named like the tenant
        assert [m.name for m in store.members("lab")] == ["lab"]
        assert {k.member for k in store.keys("lab")} == {"lab"}
        assert store.usage_by_member("lab", 0)["lab"].requests == 3
        # the key the tenant's users hold still works once this release pushes its config
        fresh = GatewayState(GatewayStore(release / "fresh-gateway.db"))
        fresh.apply(desired_config(store, "lab"))
        keys = json.loads((release / "keys.json").read_text())
        current = fresh.authenticate(keys["current"])
        assert current is not None and current.member == "lab"
        assert fresh.authenticate(keys["expired"]) is None  # its rotation grace ended long ago
    finally:
        store.close()
    with sqlite3.connect(release / "manager.db") as db:
        assert version(db) == len(MIGRATIONS)
    again = SqliteStore(release / "manager.db")  # a second start changes nothing
    assert len(again.tenants()) == 1
    again.close()


def test_the_gateway_spool_upgrades_in_place_and_old_keys_authenticate(release: Path) -> None:
    keys = json.loads((release / "keys.json").read_text())
    spool = GatewayStore(release / "gateway.db")
    state = GatewayState(spool)
    assert state.version == "v-fixture"
    assert state.authenticate(keys["current"]) is not None
    page = spool.after(0)
    assert [r.request_id for r in page.records] == ["req_0", "req_1", "req_2"]
    assert {r.member for r in page.records} == {""}  # written before members: the manager maps the key
    # the quota state counts the records of before the upgrade (keys pushed then have no member)
    assert state.quotas.month_requests == 0  # the fixture's records are from 2023
    spool.close()
    with sqlite3.connect(release / "gateway.db") as db:
        assert version(db) == len(SPOOL_MIGRATIONS)


def test_a_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "manager.db") as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StateUnavailable, match="newer release"):
        SqliteStore(tmp_path / "manager.db")


def test_the_contract_reads_what_a_gateway_of_the_previous_release_answers() -> None:
    """During an upgrade the new manager talks to gateways of the previous release until they are
    recreated: their status and usage pages (no members yet) still parse."""
    from manager.contract import GatewayStatus, UsagePage

    status = GatewayStatus.model_validate({"version": "v1", "key_ids": ["a1b2c3d4"], "limits": {"rpm_limit": 30}})
    assert status.version == "v1" and status.members == []
    old_record = {
        "seq": 7,
        "request_id": "req_0",
        "key_id": "a1b2c3d4",
        "model": "demo",
        "path": "/v1/chat/completions",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "status": 200,
        "outcome": "ok",
        "latency_ms": 12.5,
        "at": 1_700_000_200.0,
    }
    page = UsagePage.model_validate({"records": [old_record], "cursor": 7})
    assert page.records[0].member == "" and page.cursor == 7
