"""One text tenant on the real path, shared by the tests of this module: a real vLLM CPU engine
behind its real gateway container, driven by the OpenAI SDK and LangChain, with the manager
collecting usage (also after it was stopped). In file order:

- while its engine starts, every request gets one clear answer;
- members share its engine, each with their own key, nested limits and usage;
- the gateway end to end: limits, streams, keys, disconnects, the manager down, the gateway killed;
- it sleeps when idle and the requests that find it asleep wake it (one engine start);
- overcommit: two more tenants, three taking turns on room for two (three engine starts).

One engine start for the first three (the suite's budget). Each test leaves the tenant running and its
limits lifted; a test that restarts the manager hands the new one to the next (``Text.manager``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import docker
import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict

from manager import names
from manager.contract import UsageRecord
from manager.control.gateway_client import GatewayClient, desired_config
from manager.control.plan import control_network_name
from manager.control.sqlite_store import SqliteStore
from manager.errors import RuntimeUnavailable

from .conftest import TEST_PREFIX, RunningManager, remove_instance, settings_for, start_manager, wait_for, wait_status

PORT = 30401
TENANT = "acme"
L = 4  # requests per minute in the RPM check
SMALL: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Text:
    manager: RunningManager  # the one running now: a test that restarts it puts the new one here
    docker: docker.DockerClient
    key: str  # the first member's, as add-tenant printed it
    while_starting: list[httpx.Response] = field(default_factory=list)

    def api(self) -> httpx.Client:
        return self.manager.client()


def chat(key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{PORT}/v1/chat/completions",
        json={**SMALL, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def text(
    docker_client: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Text]:
    """The tenant is created, and hammered while its engine starts: what its clients got then is
    kept for the first test. The hammer stops at its first 200, served once the engine was up."""
    instance = TEST_PREFIX + secrets.token_hex(4)
    state = tmp_path_factory.mktemp("text") / "state"
    mgr = start_manager(settings_for(instance, models_dir, state, usage_interval_s=1.0))
    shared = Text(mgr, docker_client, "")
    try:
        api = mgr.client()
        tenant = {"name": TENANT, "gpu_memory": "1536M", "port": PORT, "tool_call_parser": "hermes"}
        r = api.post("/api/v1/tenants", json=tenant)
        assert r.status_code == 201, r.text
        shared.key = r.json()["key"]["api_key"]
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    answer = chat(shared.key, max_tokens=2)
                except httpx.TransportError:  # the gateway's port is not published yet
                    time.sleep(0.2)
                    continue
                shared.while_starting.append(answer)
                if answer.status_code == 200:
                    return
                time.sleep(0.2)

        hammering = threading.Thread(target=hammer)
        hammering.start()
        try:
            wait_status(api, TENANT, "running")
        finally:
            stop.set()
            hammering.join(timeout=130)
        wait_synced(mgr, docker_client, TENANT)
        yield shared
    finally:
        shared.manager.stop()
        remove_instance(docker_client, lambda i: i == instance)


def gateway_admin(mgr: RunningManager, client: docker.DockerClient, tenant: str) -> GatewayClient:
    container = client.containers.get(names.gateway(mgr.settings.instance, tenant))
    ip = container.attrs["NetworkSettings"]["Networks"][control_network_name(mgr.settings)]["IPAddress"]
    store = SqliteStore(mgr.settings.database_path)
    token = store.tenant(tenant).gateway_token
    store.close()
    return GatewayClient(ip, token)


def wait_synced(mgr: RunningManager, client: docker.DockerClient, tenant: str) -> None:
    # the engine's concurrency is in the config (the gateway's fair queue): the API says it
    concurrency = mgr.client().get(f"/api/v1/tenants/{tenant}").json()["concurrency"]

    def synced() -> bool:
        store = SqliteStore(mgr.settings.database_path)
        try:
            want = desired_config(store, tenant, concurrency=concurrency).version
        finally:
            store.close()
        with gateway_admin(mgr, client, tenant) as gw:
            return gw.version() == want

    wait_for(synced, 30, f"{tenant}'s gateway to get its config", interval=0.5)


def collected(api: httpx.Client, tenant: str) -> dict[str, Any]:
    (row,) = [u for u in api.get("/api/v1/usage").json() if u["tenant"] == tenant]
    return dict(row)


class GatewayUsage:
    def __init__(self, mgr: RunningManager, client: docker.DockerClient) -> None:
        self.mgr, self.client = mgr, client

    def records(self) -> list[UsageRecord]:
        """Every usage record the gateway holds (from its own admin API, not the manager's copy)."""
        with gateway_admin(self.mgr, self.client, TENANT) as gw:
            return gw.usage(0, limit=10_000).records


# ------------------------------------------------------------------ while the engine starts


@pytest.mark.slow
def test_while_its_engine_starts_every_request_gets_one_clear_answer(text: Text) -> None:
    """503 with Retry-After and "is starting", never a 401 for the key add-tenant printed; none of
    it metered or counted against a limit (the next test counts on that)."""
    refused = [a for a in text.while_starting if a.status_code != 200]
    assert len(refused) >= 3, [a.status_code for a in text.while_starting]
    for a in refused:
        error = a.json()["error"]
        assert a.status_code == 503 and int(a.headers["retry-after"]) >= 1, a.text
        assert error["code"] in ("tenant_starting", "engine_unavailable") and "acme is starting" in error["message"]
    assert [a.status_code for a in text.while_starting if a.status_code == 200] in ([], [200])


# ------------------------------------------------------------------ members


@dataclass
class Reply:
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

    def ask(self, member: str, max_tokens: int = 4, key: str | None = None) -> Reply:
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
            return Reply(
                member,
                exc.status_code,
                scope=exc.response.headers.get("x-ratelimit-scope", ""),
                message=str(error.get("message", "")),
                type=str(error.get("type", "")),
            )
        assert reply.usage is not None
        self.received[member].append(reply.usage.total_tokens)
        return Reply(member, 200, reply.usage.total_tokens)

    def burst(self, plan: dict[str, int], max_tokens: int = 4) -> dict[str, list[Reply]]:
        """Every member's requests at once, interleaved."""
        order = [m for i in range(max(plan.values())) for m in plan if i < plan[m]]
        with ThreadPoolExecutor(len(order)) as pool:
            answers = list(pool.map(lambda m: self.ask(m, max_tokens), order))
        out: dict[str, list[Reply]] = defaultdict(list)
        for a in answers:
            out[a.member].append(a)
        return out


def ok(answers: list[Reply]) -> int:
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
def test_members_share_one_engine_with_their_own_keys_limits_and_usage(text: Text) -> None:
    manager, docker_client, api = text.manager, text.docker, text.api()
    who = Members()
    who.keys[TENANT] = text.key  # the first member, named like the tenant
    # what the first member was served while the engine started: in its usage, and in this minute's
    # window of the tenant (this test begins seconds later), so the tenant's limit holds it too
    early = [a.json()["usage"]["total_tokens"] for a in text.while_starting if a.status_code == 200]
    who.received[TENANT] = early
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"rpm_limit": 14 + len(early)}).is_success
    for name, rpm in (("alice", 3), ("bob", 4), ("carol", 5)):
        r = api.post(f"/api/v1/tenants/{TENANT}/members", json={"name": name, "rpm_limit": rpm})
        assert r.status_code == 201, r.text
        who.keys[name] = r.json()["key"]["api_key"]
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
    restarted = text.manager = start_manager(manager.settings)  # the next test goes on with it
    api = restarted.client()
    wait_collected(api, who, ["alice", "carol", "dave", TENANT])
    with gateway_admin(restarted, docker_client, TENANT) as gw:
        spooled = gw.usage(0, limit=10_000).records
    store = SqliteStore(restarted.settings.database_path)
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
    (lab,) = [s for s in api.get("/api/v1/cost", params={"month": month, "total": 100}).json() if s["tenant"] == TENANT]
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


# ------------------------------------------------------------------ the gateway end to end


@pytest.mark.slow
def test_gateway_end_to_end(text: Text) -> None:
    manager, docker_client, api, key = text.manager, text.docker, text.api(), text.key
    # what this test's clients get is measured from here: the tenant's usage so far, all collected
    base = wait_for(
        lambda: (u := collected(api, TENANT))["requests"] == len(GatewayUsage(manager, docker_client).records()) and u,
        60,
        "the earlier usage to be collected",
    )

    # ---- RPM: with a limit of L and 3L concurrent requests, exactly L succeed (a member's limit:
    # its minute is its own, whatever the tenant served in the last one)
    r = api.post(f"/api/v1/tenants/{TENANT}/members", json={"name": "rpm", "rpm_limit": L})
    assert r.status_code == 201, r.text
    rpm_key = r.json()["key"]["api_key"]
    wait_synced(manager, docker_client, TENANT)
    with ThreadPoolExecutor(3 * L) as pool:
        responses = list(pool.map(lambda _: chat(rpm_key), range(3 * L)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * L + [429] * (2 * L), codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    for header in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"):
        assert header in limited.headers
    assert limited.headers["x-ratelimit-limit-requests"] == str(L)
    engine_tokens = sum(r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200)

    # limits change without a restart: lift the RPM limit, and the member is served in the same minute
    assert api.patch(f"/api/v1/tenants/{TENANT}/members/rpm", json={"rpm_limit": None}).status_code == 200
    wait_synced(manager, docker_client, TENANT)
    lifted = chat(rpm_key)
    assert lifted.status_code == 200, lifted.text
    engine_tokens += lifted.json()["usage"]["total_tokens"]

    # ---- the OpenAI SDK and LangChain, plain and streamed
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key, max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    engine_tokens += completion.usage.total_tokens
    # log-probabilities: vLLM ranks each token in a helper it compiles; the cpu engine runs it eagerly
    ranked = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=4, logprobs=True, top_logprobs=5
    )
    assert ranked.choices[0].logprobs and ranked.choices[0].logprobs.content, ranked
    assert len(ranked.choices[0].logprobs.content[0].top_logprobs) == 5 and ranked.usage is not None
    engine_tokens += ranked.usage.total_tokens
    plain = client.completions.create(model="demo", prompt="Hello", max_tokens=6)
    assert plain.usage is not None
    engine_tokens += plain.usage.total_tokens
    chunks = list(
        client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    engine_tokens += chunks[-1].usage.total_tokens
    plain_stream = list(client.completions.create(model="demo", prompt="Hi", max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain_stream), "the usage chunk the client did not ask for is stripped"
    assert len(plain_stream) >= 2

    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key, model="demo", max_tokens=5, max_retries=0)
    reply = llm.invoke("hello there")
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0
    engine_tokens += reply.usage_metadata["total_tokens"]

    # wrong key: 401 in OpenAI's shape; admin paths of vLLM: refused
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key[:-2] + "zz", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache", "/metrics", "/v1/load_lora_adapter"):
        resp = httpx.post(f"http://127.0.0.1:{PORT}{path}", headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 404, path
    # an allowed path this chat model does not serve: the engine's own 404, in OpenAI's shape
    with pytest.raises(openai.NotFoundError) as not_served:
        client.embeddings.create(model="demo", input="hi")
    assert "/v1/embeddings is not served by this tenant's model" in str(not_served.value)

    # ---- usage collected by the manager equals what the engine reported (plain stream: metered too)
    successful = L + 1 + 6  # RPM phase, lifted + chat, logprobs, completion, chat stream, completion stream, langchain
    successful += 1  # the engine's own 404 for /v1/embeddings: it answered, so it is metered
    usage = wait_for(
        lambda: (u := collected(api, TENANT))["requests"] - base["requests"] >= successful + 1 and u,
        30,
        "the usage to be collected",
    )
    assert usage["requests"] - base["requests"] == successful + 1  # + models.list
    with gateway_admin(manager, docker_client, TENANT) as gw:
        records = gw.usage(0, limit=10_000).records
    stream_record = next(r for r in records if r.path == "/v1/completions" and r.completion_tokens == 5)
    assert usage["total_tokens"] - base["total_tokens"] == engine_tokens + stream_record.prompt_tokens + 5

    # ---- tokens per day: never exceeded under concurrent load
    day_limit = usage["total_tokens"] + 600
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"tokens_per_day": day_limit}).status_code == 200
    wait_synced(manager, docker_client, TENANT)
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda _: chat(key, max_tokens=16), range(24)))
    burst_codes = {r.status_code for r in burst}
    assert burst_codes == {200, 429}, burst_codes
    refused = next(r for r in burst if r.status_code == 429)
    assert refused.json()["error"]["type"] == "tokens"
    assert "x-ratelimit-remaining-tokens" in refused.headers
    ok = sum(1 for r in burst if r.status_code == 200)
    after = wait_for(
        lambda: (u := collected(api, TENANT))["requests"] == usage["requests"] + ok and u, 30, "the burst's usage"
    )
    assert after["total_tokens"] <= day_limit
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"tokens_per_day": None}).status_code == 200

    # ---- rotation: the new key works at once, the old one until the grace period ends
    grace = 10.0  # longer than a push takes on a loaded 2-core machine
    rotated = api.post(f"/api/v1/tenants/{TENANT}/keys", json={"grace_s": grace}).json()
    rotated_by = time.time()  # the grace started before this
    new_key = rotated["api_key"]
    wait_synced(manager, docker_client, TENANT)
    assert chat(new_key).status_code == 200
    assert chat(key).status_code == 200
    time.sleep(max(0.0, rotated_by + grace + 1 - time.time()))
    assert chat(key).status_code == 401
    assert chat(new_key).status_code == 200
    text.key = key = new_key

    # ---- a client that disconnects mid-stream: the engine's stream is closed at once (vLLM aborts
    # the request rather than generate its 400 tokens), and the prompt and what was generated are metered
    with httpx.stream(
        "POST",
        f"http://127.0.0.1:{PORT}/v1/chat/completions",
        json={**SMALL, "max_tokens": 400, "stream": True, "min_tokens": 400, "ignore_eos": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as s:
        for _ in s.iter_lines():
            break  # read the first event, then hang up
    disconnect = wait_for(
        lambda: next(
            (r for r in GatewayUsage(manager, docker_client).records() if r.outcome == "client_disconnected"), None
        ),
        60,
        "the disconnected stream's record",
    )
    assert 0 < disconnect.completion_tokens < 400, "the engine's stream was read on after the client left"
    assert disconnect.prompt_tokens > 0, "the engine's running count names the prompt"
    gateway_usage = GatewayUsage(manager, docker_client)
    wait_for(lambda: collected(api, TENANT)["requests"] == len(gateway_usage.records()), 30, "its collection")

    # ---- the manager down: the tenant keeps serving and metering; back up: everything collected once
    manager.stop()
    served = [chat(key) for _ in range(5)]
    assert [r.status_code for r in served] == [200] * 5
    restarted = text.manager = start_manager(manager.settings)
    api = restarted.client()
    made = len(gateway_usage.records())
    wait_for(lambda: collected(api, TENANT)["requests"] == made, 60, "usage made while down")

    # ---- the gateway killed with SIGKILL under load: no committed record is lost
    done: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                resp = chat(key, max_tokens=2)
            except httpx.HTTPError:
                continue
            if resp.status_code == 200:
                done.append(resp.headers["x-request-id"])

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(3)
    # a crash, not `docker kill`: Docker counts a kill as a manual stop and does not restart
    # it (the reconciler then replaces the container); a process killed under it is restarted
    gateway_name = names.gateway(restarted.settings.instance, TENANT)
    crashed = docker_client.containers.get(gateway_name)
    os.kill(crashed.attrs["State"]["Pid"], signal.SIGKILL)
    time.sleep(1)
    stop.set()
    for w in workers:
        w.join(timeout=120)
    assert done, "some requests completed before the kill"

    def healthy() -> bool:
        try:
            state = docker_client.containers.get(gateway_name).attrs["State"]
        except docker.errors.NotFound:
            return False
        return bool(state.get("Health", {}).get("Status") == "healthy")

    wait_for(healthy, 60, "the gateway to be restarted")
    assert docker_client.containers.get(gateway_name).attrs["RestartCount"] >= 1, "Docker restarted it"

    def all_there() -> bool:
        store = SqliteStore(restarted.settings.database_path)
        try:
            ids = {r["request_id"] for r in store.usage_records(TENANT, limit=100_000)}
        finally:
            store.close()
        return set(done) <= ids

    wait_for(all_there, 60, "every answered request to be collected")
    store = SqliteStore(restarted.settings.database_path)
    records = store.usage_records(TENANT, limit=100_000)
    store.close()
    assert len(records) == len({r["request_id"] for r in records}), "none counted twice"
    listing = api.get(f"/api/v1/tenants/{TENANT}").json()
    assert listing["requests_today"] == len(records)


# ------------------------------------------------------------------ sleeping when idle, waking on a request


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


class Weather(BaseModel):
    """A tool's arguments, as its JSON schema states them (what a tool call must validate against)."""

    model_config = ConfigDict(extra="forbid")
    city: Literal["Paris", "Rome"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": Weather.model_json_schema(),
    },
}


SEED = 6
"""The demo model's weights are random: the grammar holds its tool calls to their schema, but inside
one it may write blanks until its tokens run out. Sampled with this seed (deterministic in vLLM),
it closes both calls below in about 110 tokens; a real model needs no seed."""


@pytest.mark.slow
def test_tools_and_structured_output_through_the_sdk_and_langchain(text: Text) -> None:
    """The tenant's admin set --tool-call-parser: the OpenAI SDK's tool calls (auto and named),
    LangChain's bind_tools, a JSON-schema response_format and the seed's thinking switch are
    served by the real engine, and what a named call returns validates against the tool's schema."""
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=text.key, timeout=120)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    auto = client.chat.completions.create(
        model="demo",
        messages=ask,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_tokens=8,  # type: ignore[list-item]
    )
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    named = client.chat.completions.create(
        model="demo",
        messages=ask,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=400,
        seed=SEED,
    )
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    Weather.model_validate_json(call.function.arguments)  # type: ignore[union-attr]

    schema = {"name": "weather", "schema": Weather.model_json_schema(), "strict": True}
    structured = client.chat.completions.create(
        model="demo", messages=ask, response_format={"type": "json_schema", "json_schema": schema}, max_tokens=64
    )
    Weather.model_validate_json(structured.choices[0].message.content or "")

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model="demo", base_url=f"http://127.0.0.1:{PORT}/v1", api_key=text.key, max_tokens=400, seed=SEED)  # type: ignore[arg-type]
    forced = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Rome?")
    assert isinstance(forced, AIMessage) and forced.tool_calls[0]["name"] == "get_weather"
    assert forced.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
    assert isinstance(llm.bind_tools([get_weather]).invoke("Weather in Rome?"), AIMessage)
    # the seed's own call: Qwen's thinking switch in extra_body, streamed
    seed = ChatOpenAI(  # type: ignore[call-arg]
        model="demo",
        base_url=f"http://127.0.0.1:{PORT}/v1",
        api_key=text.key,  # type: ignore[arg-type]
        max_tokens=8,
        streaming=True,
        extra_body={"enable_thinking": True, "return_reasoning": True},
    )
    assert "".join(str(chunk.content) for chunk in seed.stream("hi")) is not None


@pytest.mark.slow
def test_an_idle_tenant_sleeps_and_the_requests_that_find_it_asleep_wake_it(text: Text) -> None:
    """--idle-sleep 15s: its engine stops and its memory is freed; the next requests (a stream
    through the OpenAI SDK, then plain ones arriving during the wake) are held, then all served,
    in the order they came, though the manager restarts mid-wake; the wake is measured."""
    manager, docker_client, api = text.manager, text.docker, text.api()
    engine_name = names.engine(manager.settings.instance, TENANT)
    awake_use = api.get(f"/api/v1/tenants/{TENANT}").json()["measured"]
    assert awake_use and awake_use > 100 * 1024**2, awake_use
    host_awake = mem_available()
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"idle_sleep_s": 15}).status_code == 200
    set_at = time.monotonic()
    asleep = wait_for(
        lambda: (t := api.get(f"/api/v1/tenants/{TENANT}").json())["status"] == "asleep" and t, 90, "it to sleep"
    )
    # idle counts from its last request (before the setting), so it sleeps 15 s after that one
    slept_after = asleep["status_since"] - asleep["last_request_at"]
    assert slept_after >= 15, slept_after
    assert time.monotonic() - set_at < 15 + 10, "it slept within seconds of its idle time"
    assert asleep["sleeps"] == 1 and asleep["last_request_at"]

    def engine_gone() -> bool:
        try:
            docker_client.containers.get(engine_name)
        except docker.errors.NotFound:
            return True
        return False

    wait_for(engine_gone, 30, "its engine to be removed", interval=0.5)
    assert api.get(f"/api/v1/tenants/{TENANT}").json()["measured"] is None, "nothing measured once it is gone"
    time.sleep(2)  # the engine's pages go back to the host
    freed = mem_available() - host_awake
    print(f"engine used {awake_use / 1024**2:.0f} MiB awake; host MemAvailable {freed / 1024**2:+.0f} MiB asleep")

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=text.key, max_retries=0, timeout=300)
    answers: dict[int, tuple[float, str]] = {}
    streamed: list[Any] = []

    def stream() -> None:
        chunks = client.chat.completions.create(
            model="demo",
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed.extend(chunks)
        answers[0] = (time.monotonic(), "stream")

    def plain(i: int) -> None:
        raw = client.chat.completions.with_raw_response.create(model="demo", messages=MESSAGES, max_tokens=4)
        assert raw.parse().usage is not None
        answers[i] = (time.monotonic(), raw.headers["x-request-id"])

    woken_at = time.monotonic()
    threads = [threading.Thread(target=stream)]
    threads[0].start()
    for i in (1, 2, 3):  # arriving one after another while it wakes
        time.sleep(1.0)
        threads.append(threading.Thread(target=plain, args=(i,)))
        threads[-1].start()
    # the manager stops mid-wake and starts again: the wake goes on from the store, and the held
    # requests are served all the same
    wait_for(lambda: api.get(f"/api/v1/tenants/{TENANT}").json()["status"] == "waking", 30, "it to wake")
    manager.stop()
    time.sleep(2)
    manager = text.manager = start_manager(manager.settings)
    api = manager.client()
    for t in threads:
        t.join(timeout=300)
    assert sorted(answers) == [0, 1, 2, 3], answers
    wake_s = min(at for at, _ in answers.values()) - woken_at
    print(f"slept after {slept_after:.1f} s idle; the first request was answered {wake_s:.1f} s after it arrived")
    assert (
        streamed and streamed[-1].usage is not None and any(c.choices and c.choices[0].delta.content for c in streamed)
    )
    # in the order they came: the gateway admitted them (its records' ``at``) as it released them
    records = {r.request_id: r for r in GatewayUsage(manager, docker_client).records()}
    admitted = [records[answers[i][1]].at for i in (1, 2, 3)]
    assert admitted == sorted(admitted), admitted

    awake = api.get(f"/api/v1/tenants/{TENANT}").json()
    assert awake["status"] == "running" and (awake["sleeps"], awake["wakes"]) == (1, 1)
    assert 0 < awake["last_wake_s"] <= wake_s + 5, (awake["last_wake_s"], wake_s)
    actions = [a["action"] for a in api.get("/api/v1/audit", params={"tenant": TENANT}).json()]
    assert actions[:3] == ["woke", "wake", "sleep"], actions[:5]
    assert api.patch(f"/api/v1/tenants/{TENANT}", json={"idle_sleep_s": 0}).status_code == 200


# ------------------------------------------------------------------ overcommit: three tenants, room for two


class Serving:
    """A request its tenant's engine works on for seconds: 64 choices of 400 tokens each (the demo
    model makes 300 tokens of one choice in 0.7 s here; more on a slower machine). Its answer is
    read at ``done``."""

    def __init__(self, text: Text, tenant: str, key: str, port: int) -> None:
        body = json.dumps({**SMALL, "max_tokens": 400, "n": 64, "stream": True, "ignore_eos": True}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.conn = socket.socket()
        self.conn.settimeout(300)
        self.conn.connect(("127.0.0.1", port))
        self.conn.sendall(head + body)
        wait_for(lambda: in_flight(text, tenant) == 1, 30, f"{tenant}'s request in flight", interval=0.1)

    def done(self) -> bytes:
        """Reads the whole answer: its status line and body."""
        out = b""
        while chunk := self.conn.recv(65536):
            out += chunk
        self.conn.close()
        return out


def holding(text: Text, tenant: str) -> bool:
    """The gateway of a tenant admitted asleep runs, with the config that holds its first request."""
    try:
        with gateway_admin(text.manager, text.docker, tenant) as gw:
            return gw.activity().hold
    except (docker.errors.NotFound, KeyError, RuntimeUnavailable):
        return False  # not created, not on the control network, or not answering yet


def in_flight(text: Text, tenant: str) -> int:
    with gateway_admin(text.manager, text.docker, tenant) as gw:
        return gw.activity().in_flight


@pytest.mark.slow
def test_with_overcommit_three_tenants_take_turns_on_room_for_two_and_the_lru_idle_one_sleeps(text: Text) -> None:
    """The admin turns overcommit on (GTM_OVERCOMMIT) on a host sized for two awake tenants (the
    headroom leaves room for two reservations: the documented test setting). A third tenant is
    admitted asleep; each wake puts the least recently used idle tenant to sleep, never one serving
    a request, and when nothing can sleep the waking request gets a 503 with the numbers."""
    size = 1536 * 1024**2
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    headroom = total - 2 * size - size // 2  # room for two awake, not three
    text.manager.stop()
    manager = text.manager = start_manager(
        text.manager.settings.model_copy(update={"overcommit": True, "headroom": headroom})
    )
    api = manager.client()
    before = api.get(f"/api/v1/tenants/{TENANT}").json()
    keys = {TENANT: text.key}
    for name, port in (("bravo", PORT + 1), ("charlie", PORT + 2)):
        r = api.post("/api/v1/tenants", json={"name": name, "gpu_memory": "1536M", "port": port})
        assert r.status_code == 201, r.text
        keys[name] = r.json()["key"]["api_key"]
        admission = r.json()["admission"]
        if name == "bravo":
            assert not admission["by_overcommit"] and admission["messages"][0] == "fits awake now", admission
            wait_status(api, "bravo", "running")
        else:
            assert admission["by_overcommit"], admission
            assert admission["messages"][0].startswith("fits only by overcommit"), admission
            assert r.json()["tenant"]["status"] == "asleep"
            wait_for(lambda n=name: holding(text, n), 60, f"{name}'s gateway to hold", interval=0.5)
    ports = {TENANT: PORT, "bravo": PORT + 1, "charlie": PORT + 2}

    def ask(name: str) -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{ports[name]}/v1/chat/completions",
            json=SMALL,
            headers={"Authorization": f"Bearer {keys[name]}"},
            timeout=300,
        )

    def status(name: str) -> str:
        t = api.get(f"/api/v1/tenants/{name}").json()
        return str(t["status"]) if t["status"] != "failed" else f"failed: {t['reason']}"

    # turn 1: acme is the least recently used, but serving a request; bravo, used after it, is idle
    serving = Serving(text, TENANT, keys[TENANT], PORT)
    assert ask("bravo").status_code == 200
    woken_at = time.monotonic()
    answers: list[httpx.Response] = []
    waking = threading.Thread(target=lambda: answers.append(ask("charlie")))
    waking.start()
    try:  # acme's client reads once the choice is made
        wait_for(lambda: status("bravo") == "asleep", 30, "a tenant to be put to sleep for charlie", interval=0.2)
    finally:
        streamed = serving.done()
    assert streamed.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in streamed, streamed[:300]
    waking.join(timeout=300)
    charlie_wake = time.monotonic() - woken_at
    assert answers and answers[0].status_code == 200, answers
    print(f"charlie woke and answered in {charlie_wake:.1f} s")
    assert (status(TENANT), status("bravo"), status("charlie")) == ("running", "asleep", "running")
    evicted = [a for a in api.get("/api/v1/audit", params={"tenant": "bravo"}).json() if a["action"] == "evict"]
    assert evicted and evicted[0]["detail"]["for"] == "charlie", evicted

    # turn 2: charlie is made always on, and acme serves a request: bravo's request waits for
    # acme's to end, then acme (the least recently used) is put to sleep for it, never before
    assert api.patch("/api/v1/tenants/charlie", json={"always_on": True}).status_code == 200
    serving = Serving(text, TENANT, keys[TENANT], PORT)
    answers.clear()
    waking = threading.Thread(target=lambda: answers.append(ask("bravo")))
    waking.start()
    try:
        wait_for(
            lambda: "waking once there is room" in api.get("/api/v1/tenants/bravo").json()["reason"],
            30,
            "bravo's request to wait for room",
            interval=0.2,
        )
        assert status(TENANT) == "running", "acme serves a request: it is not put to sleep"
    finally:
        streamed = serving.done()
    assert streamed.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in streamed, streamed[:300]
    waking.join(timeout=300)
    assert answers and answers[0].status_code == 200, answers
    assert (status(TENANT), status("bravo"), status("charlie")) == ("asleep", "running", "running")

    # the host's room shrinks beneath the awake tenants (the admin raises GTM_HEADROOM to leave room
    # for one): acme's wake can never fit beside always-on charlie, and its request gets a 503
    # that names the numbers
    text.manager.stop()
    manager = text.manager = start_manager(
        text.manager.settings.model_copy(update={"headroom": total - size - size // 2})
    )
    api = manager.client()
    wait_for(lambda: holding(text, TENANT), 60, "acme's gateway to hold", interval=0.5)
    refused = ask(TENANT)
    print(f"refused: {refused.json()['error']['message']}")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "30", refused.text
    error = refused.json()["error"]
    assert error["code"] == "tenant_cannot_wake" and error["message"].endswith(
        "always on: charlie. Retry later, or ask the host's admin."
    ), error
    assert "it needs 1.5 GiB but 0 B of" in error["message"], "it names the numbers"
    # charlie may sleep again: the refusal is lifted, and acme's next request would be held and wake it
    assert api.patch("/api/v1/tenants/charlie", json={"always_on": False}).status_code == 200
    wait_for(lambda: api.get(f"/api/v1/tenants/{TENANT}").json()["wake_refusal"] == "", 30, "the refusal lifted")
    assert status(TENANT) == "asleep"
    rows = {t["name"]: t for t in api.get("/api/v1/tenants").json()}
    assert (rows["bravo"]["sleeps"], rows["bravo"]["wakes"]) == (1, 1)
    assert (rows[TENANT]["sleeps"], rows[TENANT]["wakes"]) == (before["sleeps"] + 1, before["wakes"])
