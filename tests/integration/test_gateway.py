"""The tenant gateway on the real path: a real vLLM CPU engine behind a real gateway
container, driven by the OpenAI SDK and LangChain, with the manager collecting usage."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import httpx
import openai
import pytest

from manager import names
from manager.contract import UsageRecord
from manager.control.gateway_client import GatewayClient, desired_config
from manager.control.plan import control_network_name
from manager.control.store import Store

from .conftest import RunningManager, start_manager, wait_for, wait_status

PORT = 30401
L = 4  # requests per minute in the RPM check
SMALL: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def manager(manager_settings) -> Iterator[RunningManager]:
    mgr = start_manager(manager_settings(usage_interval_s=1.0))
    yield mgr
    mgr.stop()


def gateway_admin(mgr: RunningManager, client: docker.DockerClient, tenant: str) -> GatewayClient:
    container = client.containers.get(names.gateway(mgr.settings.instance, tenant))
    ip = container.attrs["NetworkSettings"]["Networks"][control_network_name(mgr.settings)]["IPAddress"]
    store = Store(mgr.settings.database_path)
    token = store.tenant(tenant).gateway_token
    store.close()
    return GatewayClient(ip, token)


def wait_synced(mgr: RunningManager, client: docker.DockerClient, tenant: str) -> None:
    def synced() -> bool:
        store = Store(mgr.settings.database_path)
        try:
            want = desired_config(store, tenant).version
        finally:
            store.close()
        with gateway_admin(mgr, client, tenant) as gw:
            return gw.version() == want

    wait_for(synced, 30, f"{tenant}'s gateway to get its config", interval=0.5)


def collected(api: httpx.Client, tenant: str) -> dict[str, Any]:
    (row,) = [u for u in api.get("/api/v1/usage").json() if u["tenant"] == tenant]
    return dict(row)


def chat(key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{PORT}/v1/chat/completions",
        json={**SMALL, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


@pytest.mark.slow
def test_gateway_end_to_end(manager: RunningManager, docker_client: docker.DockerClient) -> None:
    api = manager.client()
    r = api.post("/api/v1/tenants", json={"name": "acme", "gpu_memory": "1536M", "port": PORT, "rpm_limit": L})
    assert r.status_code == 201, r.text
    key = r.json()["key"]["api_key"]

    # ---- hammered while it starts: one clear answer (503, Retry-After, "is starting"), never a 401
    # for the key add-tenant printed; none of it metered or counted against the RPM limit
    answers: list[httpx.Response] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                answer = chat(key, max_tokens=2)
            except httpx.TransportError:  # the gateway's port is not published yet
                time.sleep(0.2)
                continue
            answers.append(answer)
            if answer.status_code == 200:
                return
            time.sleep(0.2)

    hammering = threading.Thread(target=hammer)
    hammering.start()
    try:
        wait_status(api, "acme", "running")
    finally:
        stop.set()
        hammering.join(timeout=130)
    refused = [a for a in answers if a.status_code != 200]
    early = len(answers) - len(refused)  # served once the engine was up: they count, as they should
    assert len(refused) >= 3, [a.status_code for a in answers]
    for a in refused:
        error = a.json()["error"]
        assert a.status_code == 503 and int(a.headers["retry-after"]) >= 1, a.text
        assert error["code"] in ("tenant_starting", "engine_unavailable") and "acme is starting" in error["message"]
    wait_synced(manager, docker_client, "acme")

    # ---- RPM: with a limit of L and 3L concurrent requests, exactly L succeed (with those served early)
    with ThreadPoolExecutor(3 * L) as pool:
        responses = list(pool.map(lambda _: chat(key), range(3 * L)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * (L - early) + [429] * (2 * L + early), codes
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    for header in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"):
        assert header in limited.headers
    assert limited.headers["x-ratelimit-limit-requests"] == str(L)
    engine_tokens = sum(r.json()["usage"]["total_tokens"] for r in [*responses, *answers] if r.status_code == 200)

    # limits change without a restart: lift the RPM limit
    assert api.patch("/api/v1/tenants/acme", json={"rpm_limit": None}).status_code == 200
    wait_synced(manager, docker_client, "acme")

    # ---- the OpenAI SDK and LangChain, plain and streamed
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key, max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    completion = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    engine_tokens += completion.usage.total_tokens
    text = client.completions.create(model="demo", prompt="Hello", max_tokens=6)
    assert text.usage is not None
    engine_tokens += text.usage.total_tokens
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
    successful = L + 5  # RPM phase (with the early ones) + chat, completion, chat stream, completion stream, langchain
    successful += 1  # the engine's own 404 for /v1/embeddings: it answered, so it is metered
    usage = wait_for(
        lambda: (u := collected(api, "acme"))["requests"] >= successful + 1 and u, 30, "the usage to be collected"
    )
    assert usage["requests"] == successful + 1  # + models.list
    with gateway_admin(manager, docker_client, "acme") as gw:
        records = gw.usage(0).records
    stream_record = next(r for r in records if r.path == "/v1/completions" and r.completion_tokens == 5)
    assert usage["total_tokens"] == engine_tokens + stream_record.prompt_tokens + 5

    # ---- tokens per day: never exceeded under concurrent load
    day_limit = usage["total_tokens"] + 600
    assert api.patch("/api/v1/tenants/acme", json={"tokens_per_day": day_limit}).status_code == 200
    wait_synced(manager, docker_client, "acme")
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda _: chat(key, max_tokens=16), range(24)))
    burst_codes = {r.status_code for r in burst}
    assert burst_codes == {200, 429}, burst_codes
    refused = next(r for r in burst if r.status_code == 429)
    assert refused.json()["error"]["type"] == "tokens"
    assert "x-ratelimit-remaining-tokens" in refused.headers
    ok = sum(1 for r in burst if r.status_code == 200)
    after = wait_for(
        lambda: (u := collected(api, "acme"))["requests"] == usage["requests"] + ok and u, 30, "the burst's usage"
    )
    assert after["total_tokens"] <= day_limit
    assert api.patch("/api/v1/tenants/acme", json={"tokens_per_day": None}).status_code == 200

    # ---- rotation: the new key works at once, the old one until the grace period ends
    grace = 10.0  # longer than a push takes on a loaded 2-core machine
    rotated = api.post("/api/v1/tenants/acme/keys", json={"grace_s": grace}).json()
    rotated_by = time.time()  # the grace started before this
    new_key = rotated["api_key"]
    wait_synced(manager, docker_client, "acme")
    assert chat(new_key).status_code == 200
    assert chat(key).status_code == 200
    time.sleep(max(0.0, rotated_by + grace + 1 - time.time()))
    assert chat(key).status_code == 401
    assert chat(new_key).status_code == 200
    key = new_key

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
    wait_for(lambda: collected(api, "acme")["requests"] == len(gateway_usage.records()), 30, "its collection")

    # ---- the manager down: the tenant keeps serving and metering; back up: everything collected once
    manager.stop()
    served = [chat(key) for _ in range(5)]
    assert [r.status_code for r in served] == [200] * 5
    restarted = start_manager(manager.settings)
    try:
        api = restarted.client()
        made = len(gateway_usage.records())
        wait_for(lambda: collected(api, "acme")["requests"] == made, 60, "usage made while down")

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
        gateway_name = names.gateway(restarted.settings.instance, "acme")
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
            store = Store(restarted.settings.database_path)
            try:
                ids = {r["request_id"] for r in store.usage_records("acme", limit=100_000)}
            finally:
                store.close()
            return set(done) <= ids

        wait_for(all_there, 60, "every answered request to be collected")
        store = Store(restarted.settings.database_path)
        records = store.usage_records("acme", limit=100_000)
        store.close()
        assert len(records) == len({r["request_id"] for r in records}), "none counted twice"
        listing = api.get("/api/v1/tenants/acme").json()
        assert listing["requests_today"] == len(records)
    finally:
        restarted.stop()


class GatewayUsage:
    def __init__(self, mgr: RunningManager, client: docker.DockerClient) -> None:
        self.mgr, self.client = mgr, client

    def records(self) -> list[UsageRecord]:
        """Every usage record the gateway holds (from its own admin API, not the manager's copy)."""
        with gateway_admin(self.mgr, self.client, "acme") as gw:
            return gw.usage(0, limit=10_000).records
