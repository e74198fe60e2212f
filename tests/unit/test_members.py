"""Members through the service with a real SQLite store (no Docker): what each member action
leaves in the desired state, in the audit trail and in the config pushed to the gateway.
The real path (engine, gateway, OpenAI SDK) is tests/integration/test_members.py."""

from __future__ import annotations

import time

import pytest

from manager.control.gateway_client import desired_config
from manager.control.service import TenantService
from manager.domain import Quotas
from manager.errors import Conflict, InvalidInput, NotFound
from manager.gateway.state import GatewayState
from manager.gateway.store import GatewayStore

from .fakes import usage_record
from .test_service import create


def test_add_tenant_makes_a_first_member_named_like_the_tenant_holding_its_key(svc: TenantService) -> None:
    create(svc, "lab")
    (first,) = svc.members.views("lab")
    assert first.row.name == "lab" and first.row.quotas == Quotas()
    (key,) = first.keys
    assert key.member == "lab"
    config = desired_config(svc.store, "lab")
    assert [(k.id, k.member) for k in config.keys] == [(key.id, "lab")]
    assert [m.name for m in config.members] == ["lab"]


def test_members_get_their_own_keys_and_quotas_in_the_gateway_config(svc: TenantService, tmp_path) -> None:
    create(svc, "lab")
    row, alice_key = svc.members.add("lab", "alice", Quotas(rpm_limit=5, tokens_per_day=1000), "admin")
    assert row.quotas.rpm_limit == 5
    _, bob_key = svc.members.add("lab", "bob", Quotas(), "admin")
    config = desired_config(svc.store, "lab")
    limits = {m.name: m.limits for m in config.members}
    assert limits["alice"].rpm_limit == 5 and limits["alice"].tokens_per_day == 1000
    assert limits["bob"].rpm_limit is None
    gateway = GatewayState(GatewayStore(tmp_path / "gw.db"))
    gateway.apply(config)
    alice = gateway.authenticate(alice_key.secret_key)
    assert alice is not None and alice.member == "alice"
    assert [s.scope for s in gateway.quota_states(alice)] == ["member", "tenant"]
    actions = [(a.action, a.detail.get("member")) for a in svc.store.audit_log("lab")]
    assert ("add-member", "alice") in actions and ("add-member", "bob") in actions
    assert bob_key.secret_key.startswith(f"gtm_{bob_key.id}_")


def test_bad_member_input_says_what_to_do_and_creates_nothing(svc: TenantService) -> None:
    create(svc, "lab")
    with pytest.raises(InvalidInput, match="invalid member name"):
        svc.members.add("lab", "Alice!", Quotas(), "admin")
    with pytest.raises(InvalidInput, match="rpm limit must be between 1"):
        svc.members.add("lab", "alice", Quotas(rpm_limit=0), "admin")
    with pytest.raises(NotFound, match="no tenant named 'nope'"):
        svc.members.add("nope", "alice", Quotas(), "admin")
    assert [v.row.name for v in svc.members.views("lab")] == ["lab"]
    assert len(svc.store.keys("lab")) == 1
    svc.members.add("lab", "alice", Quotas(), "admin")
    with pytest.raises(Conflict, match="already has a member named 'alice'"):
        svc.members.add("lab", "alice", Quotas(), "admin")
    assert len(svc.store.keys("lab", "alice")) == 1  # the refused second add left no key behind


def test_update_member_changes_only_the_quotas_given(svc: TenantService) -> None:
    create(svc, "lab")
    svc.members.add("lab", "alice", Quotas(rpm_limit=5, tokens_per_day=1000), "admin")
    row = svc.members.update("lab", "alice", {"tokens_per_day": 2000}, "admin")
    assert row.quotas == Quotas(rpm_limit=5, tokens_per_day=2000)
    row = svc.members.update("lab", "alice", {"rpm_limit": None}, "admin")
    assert row.quotas == Quotas(tokens_per_day=2000)
    with pytest.raises(InvalidInput, match="nothing to change"):
        svc.members.update("lab", "alice", {"tokens_per_day": 2000}, "admin")
    with pytest.raises(NotFound, match="list-members --tenant lab"):
        svc.members.update("lab", "carol", {"rpm_limit": 1}, "admin")


def test_a_members_weight_is_its_share_of_the_fair_queue_and_reaches_the_gateway(svc: TenantService, tmp_path) -> None:
    """A PI at weight 2 beside students at the default 1: kept, changed on its own, refused out of
    range with the way out, and pushed to the gateway's fair queue with the member's config."""
    create(svc, "lab")
    pi, _ = svc.members.add("lab", "pi", Quotas(), "admin", weight=2.0)
    student, _ = svc.members.add("lab", "student", Quotas(rpm_limit=5), "admin")
    assert (pi.weight, student.weight) == (2.0, 1.0)
    with pytest.raises(InvalidInput, match=r"weight 0 is out of range: give 0\.1 to 100"):
        svc.members.add("lab", "nobody", Quotas(), "admin", weight=0.0)
    assert "nobody" not in [v.row.name for v in svc.members.views("lab")]
    row = svc.members.update("lab", "student", {}, "admin", weight=0.5)
    assert row.weight == 0.5 and row.quotas.rpm_limit == 5, "the weight alone changed"
    with pytest.raises(InvalidInput, match="nothing to change"):
        svc.members.update("lab", "student", {}, "admin", weight=0.5)
    config = desired_config(svc.store, "lab", concurrency=8)
    assert {m.name: m.weight for m in config.members} == {"lab": 1.0, "pi": 2.0, "student": 0.5}
    gateway = GatewayState(GatewayStore(tmp_path / "gw.db"))
    gateway.apply(config)
    assert gateway.fair_queue.slots == 8 and gateway.fair_queue.weights["pi"] == 2.0
    svc.update("lab", "admin", fair_queue=False)  # the tenant's own switch, applied live
    gateway.apply(desired_config(svc.store, "lab", concurrency=8))
    assert gateway.fair_queue.slots is None, "fair queuing off: the engine takes every request"


def test_remove_member_drops_its_keys_and_keeps_its_usage(svc: TenantService) -> None:
    create(svc, "lab")
    _, key = svc.members.add("lab", "alice", Quotas(), "admin")
    record = usage_record("r1", key.id, "alice", prompt_tokens=3, completion_tokens=4, at=time.time())
    svc.store.add_usage("lab", [record], 1)
    svc.members.remove("lab", "alice", "admin")
    assert [v.row.name for v in svc.members.views("lab")] == ["lab"]
    assert svc.store.keys("lab", "alice") == []
    assert all(k.member != "alice" for k in desired_config(svc.store, "lab").keys)
    assert svc.store.usage_by_member("lab", 0)["alice"].tokens == 7  # usage stays for cost sharing
    with pytest.raises(NotFound):
        svc.members.remove("lab", "alice", "admin")


def test_rotate_key_of_a_member_keeps_the_old_one_for_the_grace_period(svc: TenantService) -> None:
    create(svc, "lab")
    _, first = svc.members.add("lab", "alice", Quotas(), "admin")
    second = svc.members.rotate_key("lab", "admin", 60.0, "alice")
    alice = {k.id: k for k in svc.store.keys("lab", "alice")}
    assert alice[first.id].expires_at is not None and alice[second.id].expires_at is None
    assert all(k.expires_at is None for k in svc.store.keys("lab", "lab")), "other members' keys untouched"
    # today's `rotate-key --name lab` rotates the first member's key
    svc.rotate_key("lab", "admin", 0.0)
    lab = svc.store.keys("lab", "lab")
    assert len(lab) == 2 and sum(1 for k in lab if k.active(time.time() + 1)) == 1
    svc.members.remove("lab", "lab", "admin")
    with pytest.raises(NotFound, match="pass --member"):
        svc.rotate_key("lab", "admin", 0.0)


def test_member_usage_is_split_by_member_with_today_and_month(svc: TenantService) -> None:
    create(svc, "lab")
    _, key = svc.members.add("lab", "alice", Quotas(), "admin")
    now = time.time()
    records = [
        usage_record("a", key.id, "alice", at=now),
        # a record written before members (no member): the key's member is meant
        usage_record("b", key.id, completion_tokens=1, at=now),
        usage_record("c", "gone", prompt_tokens=5, completion_tokens=5, at=now),
    ]
    svc.store.add_usage("lab", records, 3)
    svc.store.add_usage("lab", records, 3)  # collected twice: stored once
    views = {v.row.name: v for v in svc.members.views("lab", now)}
    assert (views["alice"].usage.today.requests, views["alice"].usage.today.tokens) == (2, 5)
    assert views["alice"].usage.month.tokens == 5 and views["alice"].usage.last_used_at == now
    assert svc.store.usage_by_member("lab", 0)[""].tokens == 10  # an unknown key: unattributed, not lost


def test_every_change_to_a_tenant_being_removed_gets_the_same_refusal(svc: TenantService) -> None:
    """Once remove-tenant has marked it, nothing of the tenant changes: keys, members or limits."""
    create(svc, "lab")
    svc.members.add("lab", "alice", Quotas(), "admin")
    (key,) = svc.store.keys("lab", "lab")
    svc.remove("lab", "admin")
    before = (svc.store.keys("lab"), svc.store.members("lab"), svc.store.tenant("lab").spec)
    actions = {
        "rotate-key": lambda: svc.rotate_key("lab", "admin", 0),
        "rotate-key --member": lambda: svc.rotate_key("lab", "admin", 0, "alice"),
        "revoke-key": lambda: svc.revoke_key("lab", key.id, "admin"),
        "add-member": lambda: svc.members.add("lab", "bob", Quotas(), "admin"),
        "update-member": lambda: svc.members.update("lab", "alice", {"rpm_limit": 3}, "admin"),
        "remove-member": lambda: svc.members.remove("lab", "alice", "admin"),
        "update-tenant": lambda: svc.update("lab", "admin", max_num_seqs=4),
    }
    for action, run in actions.items():
        with pytest.raises(Conflict) as refused:
            run()
        assert "is being removed, so nothing of it can change any more" in str(refused.value), action
    assert (svc.store.keys("lab"), svc.store.members("lab"), svc.store.tenant("lab").spec) == before
    removal = [e for e in svc.audit_log("lab", "remove-tenant", 10, None)]
    assert len(removal) == 1 and svc.store.tenant("lab").status.value == "removing"
