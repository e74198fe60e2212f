"""Members on the real path: one tenant's real vLLM CPU engine shared by several members, each
with their own key and limits, driven by the OpenAI SDK against the real gateway container, with
the manager collecting per-member usage (also after it was stopped)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import docker
import httpx
import openai
import pytest

from manager.control.store import Store

from .conftest import RunningManager, start_manager, wait_for, wait_status
from .test_gateway import gateway_admin, wait_synced

PORT = 30451
TENANT = "lab"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def manager(manager_settings) -> Iterator[RunningManager]:
    mgr = start_manager(manager_settings(usage_interval_s=1.0))
    yield mgr
    mgr.stop()


@dataclass
class Answer:
    member: str
    status: int
    tokens: int = 0
    scope: str = ""
    message: str = ""
    type: str = ""


class Members:
    """Each member's OpenAI client and what their clients received (the ``usage`` blocks)."""

    def __init__(self) -> None:
        self.keys: dict[str, str] = {}
        self.received: dict[str, list[int]] = defaultdict(list)

    def ask(self, member: str, max_tokens: int = 4, key: str | None = None) -> Answer:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key or self.keys[member], max_retries=0, timeout=120
        )
        try:
            # min_tokens (vLLM): every answer is exactly max_tokens long, so the token figures below
            # do not depend on when the random model happens to stop
            reply = client.chat.completions.create(
                model="demo", messages=MESSAGES, max_tokens=max_tokens, extra_body={"min_tokens": max_tokens}
            )
        except openai.APIStatusError as exc:
            error = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else {}
            return Answer(
                member,
                exc.status_code,
                scope=exc.response.headers.get("x-ratelimit-scope", ""),
                message=str(error.get("message", "")),
                type=str(error.get("type", "")),
            )
        assert reply.usage is not None
        self.received[member].append(reply.usage.total_tokens)
        return Answer(member, 200, reply.usage.total_tokens)

    def burst(self, plan: dict[str, int], max_tokens: int = 4) -> dict[str, list[Answer]]:
        """Every member's requests at once, interleaved."""
        order = [m for i in range(max(plan.values())) for m in plan if i < plan[m]]
        with ThreadPoolExecutor(len(order)) as pool:
            answers = list(pool.map(lambda m: self.ask(m, max_tokens), order))
        out: dict[str, list[Answer]] = defaultdict(list)
        for a in answers:
            out[a.member].append(a)
        return out


def ok(answers: list[Answer]) -> int:
    return sum(1 for a in answers if a.status == 200)


def members_usage(api: httpx.Client) -> dict[str, dict[str, int]]:
    listing = api.get(f"/api/v1/tenants/{TENANT}/members")
    assert listing.status_code == 200, listing.text
    return {m["name"]: m["today"] for m in listing.json()}


def wait_collected(api: httpx.Client, who: Members, members: list[str]) -> None:
    """Until the manager's per-member usage equals what each member's clients received."""

    def equal() -> bool:
        usage = members_usage(api)
        return all(
            usage.get(m, {}).get("requests") == len(who.received[m])
            and usage.get(m, {}).get("total_tokens") == sum(who.received[m])
            for m in members
        )

    try:
        wait_for(equal, 60, "each member's collected usage to equal what their clients received", interval=0.5)
    except AssertionError:
        received = {m: (len(who.received[m]), sum(who.received[m])) for m in members}
        raise AssertionError(f"collected {members_usage(api)}, received {received}") from None


@pytest.mark.slow
def test_members_share_one_engine_with_their_own_keys_limits_and_usage(
    manager: RunningManager, docker_client: docker.DockerClient
) -> None:
    api = manager.client()
    created = api.post("/api/v1/tenants", json={"name": TENANT, "gpu_memory": "1536M", "port": PORT, "rpm_limit": 14})
    assert created.status_code == 201, created.text
    who = Members()
    who.keys[TENANT] = created.json()["key"]["api_key"]  # the first member, named like the tenant
    for name, rpm in (("alice", 3), ("bob", 4), ("carol", 5)):
        r = api.post(f"/api/v1/tenants/{TENANT}/members", json={"name": name, "rpm_limit": rpm})
        assert r.status_code == 201, r.text
        who.keys[name] = r.json()["key"]["api_key"]
    wait_status(api, TENANT, "running")
    wait_synced(manager, docker_client, TENANT)

    # ---- concurrent bursts from all three at once: each member's per-minute limit is exact
    burst = who.burst({"alice": 8, "bob": 8, "carol": 8})
    assert (ok(burst["alice"]), ok(burst["bob"]), ok(burst["carol"])) == (3, 4, 5)
    refused = next(a for a in burst["alice"] if a.status == 429)
    assert refused.scope == "member" and "member alice" in refused.message
    # ---- the tenant's limit caps their sum: 12 of its 14 are used, the first member (no own limit) gets 2
    first = who.burst({TENANT: 6})[TENANT]
    assert ok(first) == 2
    capped = next(a for a in first if a.status == 429)
    assert capped.scope == "tenant" and "this tenant" in capped.message

    # ---- tokens per day, a member's: never exceeded under a concurrent burst from all three
    wait_collected(api, who, ["alice", "bob", "carol", TENANT])
    used = members_usage(api)
    # each answer is 16 tokens plus the prompt, so 8 of alice's need more than her 130 left: some are
    # refused however the burst interleaves (the tenant's own day is far away in this step)
    limits = {"alice": used["alice"]["total_tokens"] + 130, "carol": used["carol"]["total_tokens"] + 250}
    tenant_day = sum(u["total_tokens"] for u in used.values()) + 100_000
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"rpm_limit": None, "tokens_per_day": tenant_day}).is_success
    for name in ("alice", "bob", "carol"):
        body = {"rpm_limit": None, **({"tokens_per_day": limits[name]} if name in limits else {})}
        assert api.patch(f"/api/v1/tenants/{TENANT}/members/{name}", json=body).is_success
    wait_synced(manager, docker_client, TENANT)
    tokens_burst = who.burst({"alice": 8, "bob": 8, "carol": 8}, max_tokens=16)
    alice_refused = [a for a in tokens_burst["alice"] if a.status == 429]
    assert alice_refused and all(a.type == "tokens" and a.scope == "member" for a in alice_refused)
    assert "member alice" in alice_refused[0].message
    assert ok(tokens_burst["bob"]) == 8
    wait_collected(api, who, ["alice", "bob", "carol", TENANT])
    used = members_usage(api)
    assert used["alice"]["total_tokens"] <= limits["alice"]
    assert used["carol"]["total_tokens"] <= limits["carol"]

    # ---- tokens per day, the tenant's: caps a member without a day limit of its own
    tenant_day = sum(u["total_tokens"] for u in used.values()) + 150
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"tokens_per_day": tenant_day}).is_success
    wait_synced(manager, docker_client, TENANT)
    first = who.burst({TENANT: 8}, max_tokens=16)[TENANT]  # 8 answers need more than 150 tokens
    refused_by_tenant = [a for a in first if a.status == 429]
    assert refused_by_tenant and all(a.type == "tokens" and a.scope == "tenant" for a in refused_by_tenant)
    wait_collected(api, who, ["alice", "bob", "carol", TENANT])
    assert sum(u["total_tokens"] for u in members_usage(api).values()) <= tenant_day
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"tokens_per_day": None}).is_success
    for name in limits:
        assert api.patch(f"/api/v1/tenants/{TENANT}/members/{name}", json={"tokens_per_day": None}).is_success

    # ---- a member's key rotates with a grace period; the others are untouched
    grace = 10.0  # longer than a push takes on a loaded 2-core machine
    rotated = api.post(f"/api/v1/tenants/{TENANT}/members/alice/keys", json={"grace_s": grace})
    rotated_by = time.time()  # the grace started before this
    assert rotated.status_code == 201, rotated.text
    old_alice = who.keys["alice"]
    who.keys["alice"] = rotated.json()["api_key"]
    wait_synced(manager, docker_client, TENANT)
    assert who.ask("alice").status == 200
    assert who.ask("alice", key=old_alice).status == 200
    time.sleep(max(0.0, rotated_by + grace + 1 - time.time()))
    assert who.ask("alice", key=old_alice).status == 401
    assert who.ask("alice").status == 200 and who.ask("bob").status == 200

    # ---- removing a member: its key answers 401 within 5 s while the others keep working
    removed_at = time.monotonic()
    assert api.delete(f"/api/v1/tenants/{TENANT}/members/bob").status_code == 204
    wait_for(lambda: who.ask("bob").status == 401, 5, "bob's key to be refused", interval=0.2)
    assert time.monotonic() - removed_at <= 5.0
    assert who.ask("alice").status == 200 and who.ask("carol").status == 200
    assert "bob" not in members_usage(api)
    wait_collected(api, who, ["alice", "carol", TENANT])

    # ---- the manager stopped: limits are still enforced; usage is collected afterwards, once
    dave = api.post(f"/api/v1/tenants/{TENANT}/members", json={"name": "dave", "rpm_limit": 2})
    assert dave.status_code == 201, dave.text
    who.keys["dave"] = dave.json()["key"]["api_key"]
    wait_synced(manager, docker_client, TENANT)
    manager.stop()
    down = who.burst({"dave": 5, "carol": 3})
    assert ok(down["dave"]) == 2 and ok(down["carol"]) == 3
    assert next(a for a in down["dave"] if a.status == 429).scope == "member"
    restarted = start_manager(manager.settings)
    try:
        api = restarted.client()
        wait_collected(api, who, ["alice", "carol", "dave", TENANT])
        with gateway_admin(restarted, docker_client, TENANT) as gw:
            spooled = gw.usage(0, limit=10_000).records
        store = Store(restarted.settings.database_path)
        try:
            stored = store.usage_records(TENANT, limit=100_000)
            bob_usage = store.usage_by_member(TENANT, 0)["bob"]
        finally:
            store.close()
        assert len(stored) == len({r["request_id"] for r in stored}) == len(spooled), "nothing lost or doubled"
        assert {r["request_id"]: r["member"] for r in stored} == {r.request_id: r.member for r in spooled}
        # bob's usage stays for cost sharing after his removal
        assert (bob_usage.requests, bob_usage.tokens) == (len(who.received["bob"]), sum(who.received["bob"]))
        month = time.strftime("%Y-%m", time.gmtime())
        (lab,) = [
            s for s in api.get("/api/v1/cost", params={"month": month, "total": 100}).json() if s["tenant"] == TENANT
        ]
        split = {m["member"]: m for m in lab["members"]}
        assert set(split) == {TENANT, "alice", "bob", "carol", "dave"}
        assert sum(m["tokens"] for m in split.values()) == lab["tokens"]
        assert abs(sum(m["share_by_tokens"] for m in split.values()) - 1) < 1e-4
        # Prometheus: the manager's counters per tenant and member
        from prometheus_client.parser import text_string_to_metric_families

        samples = {
            (sample.name, sample.labels.get("member"), sample.labels.get("kind")): sample.value
            for family in text_string_to_metric_families(api.get("/metrics").text)
            for sample in family.samples
            if sample.labels.get("tenant") == TENANT
        }
        for member in ("alice", "bob", "carol", "dave", TENANT):
            assert samples[("gtm_usage_requests_total", member, None)] == len(who.received[member])
            tokens = sum(samples[("gtm_usage_tokens_total", member, kind)] for kind in ("prompt", "completion"))
            assert tokens == sum(who.received[member])
    finally:
        restarted.stop()
