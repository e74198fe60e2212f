"""The gateway's request path against a scripted upstream (httpx.MockTransport): the
real proxy code, its real SQLite store, no Docker. The real engine path is in
tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from manager import keys
from manager.contract import GatewayConfig
from manager.gateway import proxy as proxy_module
from manager.gateway.proxy import Proxy
from manager.gateway.settings import GatewaySettings
from manager.gateway.state import GatewayState
from manager.gateway.store import GatewayStore, Settle

from .fakes import usage_record

pytestmark = pytest.mark.anyio
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def upstream(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/health":
        return httpx.Response(200)
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "demo"}]})
    body = json.loads(request.content)
    if body.get("stream"):
        assert body["stream_options"]["include_usage"] is True
        events = [
            {"choices": [{"delta": {"content": "a"}}]},
            {"choices": [{"delta": {"content": "b"}}]},
            {"choices": [], "usage": USAGE},
        ]
        raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
        return httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}], "usage": USAGE})


def recording(
    state: GatewayState, key: str | None = None, settings: GatewaySettings | None = None
) -> tuple[httpx.AsyncClient, list[httpx.Request]]:
    """A client of a gateway in front of ``upstream``, and every request the gateway forwarded."""
    forwarded: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        forwarded.append(request)
        return upstream(request)

    proxy = Proxy(settings or GatewaySettings(), state, transport=httpx.MockTransport(record))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {key}"} if key else {},
    )
    return client, forwarded


@pytest.fixture
def gateway(tmp_path: Path) -> tuple[httpx.AsyncClient, GatewayState, str]:
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate(
            {
                "version": "v1",
                "keys": [{"id": issued.id, "hash": issued.hash, "expires_at": None}],
                "limits": {"rpm_limit": 3},
            }
        )
    )
    proxy = Proxy(GatewaySettings(max_body_bytes=2048), state, transport=httpx.MockTransport(upstream))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    return client, state, issued.secret_key


CHAT: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def test_chat_is_forwarded_metered_and_rate_limited(gateway: tuple[httpx.AsyncClient, GatewayState, str]):
    client, state, key = gateway
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.json()["usage"] == USAGE
    assert r.headers["x-ratelimit-remaining-requests"] == "2"
    (rec,) = state.store.after(0).records
    assert (rec.prompt_tokens, rec.completion_tokens, rec.status, rec.outcome) == (5, 3, 200, "ok")
    assert rec.request_id == r.headers["x-request-id"]
    assert key not in rec.model_dump_json()
    await client.post("/v1/chat/completions", json=CHAT)
    await client.get("/v1/models")
    limited = await client.post("/v1/chat/completions", json=CHAT)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"


async def test_stream_strips_the_usage_chunk_the_client_did_not_ask_for(gateway):
    client, state, _ = gateway
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert not any('"usage"' in e for e in events)
    (rec,) = state.store.after(0).records
    assert (rec.prompt_tokens, rec.completion_tokens) == (5, 3)
    assert rec.first_token_ms is not None and 0 <= rec.first_token_ms <= rec.latency_ms
    assert state.metrics.first_token.count("") == 1 and state.metrics.per_token.count("") == 1


async def test_stream_keeps_usage_when_asked(gateway):
    client, _, _ = gateway
    r = await client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert any('"usage"' in e for e in r.text.split("\n\n"))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/sleep"),
        ("POST", "/wake_up"),
        ("GET", "/is_sleeping"),
        ("POST", "/collective_rpc"),
        ("POST", "/reset_prefix_cache"),
        ("GET", "/metrics"),
        ("DELETE", "/v1/models"),
        ("POST", "/v1/load_lora_adapter"),
    ],
)
async def test_admin_paths_are_refused(gateway, method: str, path: str):
    client, state, _ = gateway
    r = await client.request(method, path)
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert state.store.after(0).records == []


async def test_wrong_or_missing_key_is_401_in_openai_shape(gateway):
    client, _, key = gateway
    for headers in (
        {"Authorization": "Bearer " + key[:-1] + "x"},
        {"Authorization": ""},
        {"Authorization": "Bearer sk-not-ours"},
    ):
        r = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert key not in r.text


async def test_oversized_body_is_413(gateway):
    client, _, _ = gateway
    r = await client.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 4096})
    assert r.status_code == 413


async def test_engine_down_is_503_with_retry_after_and_neither_metered_nor_counted(tmp_path: Path):
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    limits = {"rpm_limit": 2, "requests_per_month": 2, "tokens_per_day": 10_000}
    state.apply(
        GatewayConfig.model_validate(
            {"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": limits}
        )
    )
    engine_up = False
    tried: list[str] = []

    def engine(request: httpx.Request) -> httpx.Response:
        tried.append(request.url.path)
        if not engine_up:
            raise httpx.ConnectError("connection refused", request=request)
        return upstream(request)

    proxy = Proxy(GatewaySettings(tenant="companya"), state, transport=httpx.MockTransport(engine))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    for body in (CHAT, {**CHAT, "stream": True}) * 3:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        error = r.json()["error"]
        assert error["code"] == "engine_unavailable" and error["message"].startswith("Tenant companya is starting")
    assert state.store.after(0, 100).records == []  # never served: never metered
    assert state.quotas.in_flight == 0 and state.quotas.day_reserved == 0
    assert state.metrics.refused.value("engine_unavailable") == 6
    # only the first request went to the engine: the others were answered at once (no connect,
    # no name lookup to wait for), while one probe at a time asks whether it is back
    assert tried.count("/v1/chat/completions") == 1 and proxy.engine_down
    engine_up = True  # six refusals used none of the 2 requests a minute and 2 a month
    for _ in range(100):
        if not proxy.engine_down:
            break
        await asyncio.sleep(0.05)
    assert not proxy.engine_down, "the probe did not see the engine back"
    assert [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)] == [200, 200, 429]
    assert len(state.store.after(0, 100).records) == 2


async def test_before_its_first_config_a_gateway_says_the_tenant_is_starting_never_401(tmp_path: Path):
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    client, forwarded = recording(state, keys.issue().secret_key, GatewaySettings(tenant="companya"))
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"] == {
        "message": "Tenant companya is starting; retry in a few seconds.",
        "type": "server_error",
        "code": "tenant_starting",
        "param": None,
    }
    assert forwarded == [] and state.store.after(0, 100).records == []


async def test_expired_key_is_refused(tmp_path: Path):
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    old, new = keys.issue(), keys.issue()
    state.apply(
        GatewayConfig.model_validate(
            {
                "version": "v",
                "keys": [{"id": old.id, "hash": old.hash, "expires_at": 1.0}, {"id": new.id, "hash": new.hash}],
                "limits": {},
            }
        )
    )
    assert state.authenticate(old.secret_key) is None
    assert state.authenticate(new.secret_key) is not None
    # the config survives a restart of the gateway
    again = GatewayState(state.store)
    assert again.authenticate(new.secret_key) is not None and again.version == "v"


def test_admin_side_needs_its_token_and_pages_usage_by_cursor(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from manager.gateway.admin import create_admin_app

    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    state.store.write([Settle(usage_record(f"r{i}", member="alice").model_dump()) for i in range(3)])
    client = TestClient(create_admin_app(state, "admin-secret"))
    assert client.get("/admin/usage").status_code == 401
    auth = {"Authorization": "Bearer admin-secret"}
    page = client.get("/admin/usage", params={"after": 0, "limit": 2}, headers=auth).json()
    assert [r["request_id"] for r in page["records"]] == ["r0", "r1"]
    assert page["records"][0]["member"] == "alice"
    rest = client.get("/admin/usage", params={"after": page["cursor"]}, headers=auth).json()
    assert [r["request_id"] for r in rest["records"]] == ["r2"]
    config = {"version": "v9", "keys": [], "limits": {"rpm_limit": 7}}
    assert client.put("/admin/config", json=config, headers=auth).json() == {"version": "v9"}
    assert client.get("/admin/config", headers=auth).json()["limits"]["rpm_limit"] == 7
    assert state.quotas.limits.rpm_limit == 7


def test_the_engines_sleep_mode_is_reached_from_the_admin_side_alone(tmp_path: Path) -> None:
    """vLLM's dev-mode sleep endpoints, through the gateway's admin port (the tenant's port refuses
    them: test_admin_paths_are_refused); an engine without sleep mode is a 502 that says so."""
    from fastapi.testclient import TestClient

    from manager.gateway.admin import create_admin_app

    asleep, calls = [False], []

    def engine(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        if request.url.path == "/sleep":
            asleep[0] = True
        elif request.url.path == "/wake_up":
            asleep[0] = False
        elif request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "qwen3-8b"}]})
        elif request.url.path == "/v1/completions":
            assert json.loads(request.content) == {"model": "qwen3-8b", "prompt": "warm", "max_tokens": 1}
            return httpx.Response(200, json={"choices": [{"text": "x"}]})
        elif request.url.path != "/is_sleeping":
            return httpx.Response(404)
        return httpx.Response(200, json={"is_sleeping": asleep[0]} if request.url.path == "/is_sleeping" else None)

    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    upstream_engine = httpx.Client(transport=httpx.MockTransport(engine), base_url="http://engine:8000")
    client = TestClient(create_admin_app(state, "admin-secret", upstream_engine))
    auth = {"Authorization": "Bearer admin-secret"}
    assert client.post("/admin/engine/sleep").status_code == 401
    assert client.get("/admin/engine/sleeping", headers=auth).json() == {"sleeping": False}
    assert client.post("/admin/engine/sleep", headers=auth).json() == {"sleeping": True}
    assert "POST /sleep?level=1" in calls, "level 1: the weights go to host memory"
    assert client.post("/admin/engine/wake", headers=auth).json() == {"sleeping": False}
    assert calls[-2:] == ["GET /v1/models?", "POST /v1/completions?"], "awake, it writes one token first"
    without = TestClient(
        create_admin_app(
            state,
            "admin-secret",
            httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404)), base_url="http://e"),
        )
    )
    answer = without.post("/admin/engine/sleep", headers=auth)
    assert answer.status_code == 502 and "--enable-sleep-mode" in answer.json()["detail"]


@pytest.mark.parametrize(
    "raw",
    [
        b"/v1/models/../../metrics",
        b"/v1/models/%2e%2e/%2e%2e/metrics",
        b"/v1/models/..%2f..%2fmetrics",
        b"/v1/models/%2E%2E/openapi.json",
        b"/v1/models/./../version",
        b"//v1/models",
        b"/v1//models",
        b"/v1/models/",
        b"/v1/chat/completions/",
        b"/v1/chat/completions/..",
        b"/v1/models/..\\..\\load",
        b"/v1/models/demo/../../docs",
        b"/v1/%6dodels",
    ],
)
def test_paths_an_upstream_would_normalise_are_refused(raw: bytes) -> None:
    from manager.gateway.proxy import allowed, canonical_path

    path = canonical_path(raw)
    assert path is None or (not allowed("GET", path) and not allowed("POST", path))


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("GET", b"/v1/models"),
        ("GET", b"/v1/models/demo"),
        ("GET", b"/v1/models/qwen2.5-7b:int4"),
        ("POST", b"/v1/chat/completions"),
        ("POST", b"/v1/embeddings"),
    ],
)
def test_the_openai_paths_pass_exactly(method: str, raw: bytes) -> None:
    from manager.gateway.proxy import allowed, canonical_path

    assert canonical_path(raw) == raw.decode()
    assert allowed(method, raw.decode())


async def test_a_dot_segment_path_is_not_forwarded(gateway):
    """The ASGI scope as uvicorn builds it for ``curl --path-as-is .../v1/models/../../metrics``."""
    client, _state, key = gateway
    proxy = client._transport.app  # type: ignore[attr-defined]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v1/models/../../metrics",
        "raw_path": b"/v1/models/../../metrics",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }
    await proxy(scope, receive, send)
    assert sent[0]["status"] == 404
    assert b"not served on this port" in sent[1]["body"]


async def test_deeply_nested_json_is_400(gateway):
    client, state, _ = gateway
    for depth in (65, 1000, 100_000):
        body = b'{"model": "demo", "x": ' + b"[" * depth + b"]" * depth + b"}"
        r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 413), depth
        assert r.json()["error"]["code"] in ("invalid_json", "request_too_large")
    ok = {**CHAT, "x": [[[[{"a": [1]}]]]]}
    assert (await client.post("/v1/chat/completions", json=ok)).status_code == 200
    assert state.store.after(0).records[-1].status == 200


class FillableStore(GatewayStore):
    """The gateway's real store, whose volume the test can make full."""

    full = False
    """While set, no usage record fits (the volume filled up while requests were served)."""

    def write(self, writes: Any) -> None:
        import sqlite3

        if self.full and any(isinstance(w, Settle) for w in writes):
            raise sqlite3.OperationalError("database or disk is full")
        super().write(writes)


async def test_a_full_spool_refuses_requests_and_loses_no_record(tmp_path: Path) -> None:
    store = FillableStore(tmp_path / "gw.db")
    state = GatewayState(store)
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate(
            {"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {"max_in_flight": 5}}
        )
    )
    client, forwarded = recording(state, issued.secret_key)
    store.full = True
    first = await client.post("/v1/chat/completions", json=CHAT)  # served; its record waits in memory
    assert first.status_code == 200
    refused = await client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "usage_spool_full"
    assert refused.headers["retry-after"] == "30"
    assert len(forwarded) == 1, "nothing is served unmetered"
    assert state.quotas.in_flight == 0, "a failed write leaks no in-flight slot"
    store.full = False
    again = await client.post("/v1/chat/completions", json=CHAT)
    assert again.status_code == 200
    assert [r.request_id for r in store.after(0).records] == [
        first.headers["x-request-id"],
        again.headers["x-request-id"],
    ]


async def test_an_engine_lost_mid_stream_ends_with_an_error_event_and_meters_what_was_served(tmp_path: Path):
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate({"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {}})
    )

    class Dying(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for token in ("a", "b", "c"):
                yield b"data: " + json.dumps({"choices": [{"delta": {"content": token}}]}).encode() + b"\n\n"
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def dying(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Dying(), headers={"content-type": "text/event-stream"})

    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(dying))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 4
    assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == "engine_unavailable"
    (rec,) = state.store.after(0).records
    assert (rec.outcome, rec.completion_tokens) == ("engine_error", 3)
    assert state.quotas.in_flight == 0


async def test_the_token_reservation_is_bounded_by_the_engines_context(tmp_path: Path) -> None:
    """A big body (an image as a data: URL) reserves at most max_model_len tokens, so a daily
    quota far smaller than the body's size in bytes still admits it, and settles to real usage."""
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate(
            {
                "version": "v",
                "keys": [{"id": issued.id, "hash": issued.hash}],
                "limits": {"tokens_per_day": 2000},
                "max_model_len": 512,
            }
        )
    )
    proxy = Proxy(GatewaySettings(max_body_bytes=8 << 20), state, transport=httpx.MockTransport(upstream))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    # a real PNG header: the gateway reads every image's size at the door
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", 640, 480) + bytes(525_000 - 24)
    image = "data:image/png;base64," + base64.b64encode(png).decode()
    assert len(image) > 700_000
    body = {
        **CHAT,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    }
    for _ in range(3):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    # while the third was in flight it held 512 tokens, not 700,000; settled, each used its real 8
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 2000 - 2 * USAGE["total_tokens"] - 512
    assert int(state.quotas.headers()["x-ratelimit-remaining-tokens"]) == 2000 - 3 * USAGE["total_tokens"]


async def test_the_tenants_body_limit_applies_and_a_413_names_it(tmp_path: Path) -> None:
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate(
            {
                "version": "v",
                "keys": [{"id": issued.id, "hash": issued.hash}],
                "limits": {},
                "max_body": 4 * 1024 * 1024,
            }
        )
    )
    proxy = Proxy(GatewaySettings(max_body_bytes=1024), state, transport=httpx.MockTransport(upstream))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    image = "data:image/png;base64," + "A" * 3_000_000  # over the gateway's own default, within the tenant's
    ok = await client.post("/v1/chat/completions", json={**CHAT, "x": image})
    assert ok.status_code == 200
    too_big = await client.post("/v1/chat/completions", json={**CHAT, "x": image + "A" * 2_000_000})
    assert too_big.status_code == 413
    assert "4.0 MiB (4194304 bytes)" in too_big.json()["error"]["message"]
    assert "--max-body" in too_big.json()["error"]["message"]


async def test_large_bodies_take_a_slot_and_wait_for_one(tmp_path: Path) -> None:
    import asyncio

    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate({"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {}})
    )
    release = asyncio.Event()
    inside = 0
    most = 0

    class Slow(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1
            return upstream(request)

    proxy = Proxy(GatewaySettings(large_bodies=2, body_idle_timeout_s=5), state, transport=Slow())
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    big = {**CHAT, "x": "A" * 2_000_000}
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=big)) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert inside == 2  # two large requests at the engine, three waiting for a slot
    release.set()
    assert [r.status_code for r in await asyncio.gather(*tasks)] == [200] * 5
    assert most == 2


# ---------------------------------------------------------------- members
def member_config(version: str, alice: keys.IssuedKey, bob: keys.IssuedKey | None) -> GatewayConfig:
    members = [{"name": "alice", "limits": {"rpm_limit": 2}}]
    key_list = [{"id": alice.id, "hash": alice.hash, "member": "alice"}]
    if bob is not None:
        members.append({"name": "bob", "limits": {}})
        key_list.append({"id": bob.id, "hash": bob.hash, "member": "bob"})
    return GatewayConfig.model_validate(
        {"version": version, "keys": key_list, "limits": {"rpm_limit": 3}, "members": members}
    )


async def test_members_have_nested_limits_their_own_records_and_metrics(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    alice, bob = keys.issue(), keys.issue()
    state.apply(member_config("v1", alice, bob))
    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(upstream))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://gw") as client:

        async def chat(key: keys.IssuedKey) -> httpx.Response:
            return await client.post(
                "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key.secret_key}"}
            )

        assert [(await chat(alice)).status_code for _ in range(3)] == [200, 200, 429]
        limited = await chat(alice)
        assert "member alice" in limited.json()["error"]["message"]
        assert limited.headers["x-ratelimit-scope"] == "member"
        assert [(await chat(bob)).status_code for _ in range(2)] == [200, 429]  # the tenant's 3 are used
        tenant_limited = await chat(bob)
        assert tenant_limited.headers["x-ratelimit-scope"] == "tenant"
        assert "this tenant" in tenant_limited.json()["error"]["message"]
        records = state.store.after(0).records
        assert [r.member for r in records] == ["alice", "alice", "bob"]
        metrics = generate_latest(state.metrics.registry).decode()
        assert 'gtm_gateway_member_requests_total{member="alice",status="200"} 2.0' in metrics
        assert 'gtm_gateway_member_requests_total{member="alice",status="429"} 2.0' in metrics
        assert 'gtm_gateway_rate_limited_total{reason="rpm",scope="tenant"} 2.0' in metrics

        # bob removed: his key is refused at once; alice's limits and counters carry over
        state.apply(member_config("v2", alice, None))
        assert (await chat(bob)).status_code == 401
        assert len(state.members["alice"].window) == 2
        # bob added again the same day: his use of today still counts against his limits
        state.apply(member_config("v3", alice, bob))
        assert len(state.members["bob"].window) == 1 and state.members["bob"].month_requests == 1

    # a restart rebuilds each member's counters from the spool
    again = GatewayState(state.store)
    assert len(again.members["alice"].window) == 2 and len(again.quotas.window) == 3


async def test_a_key_whose_member_is_gone_is_refused_even_while_the_config_is_swapped(tmp_path: Path) -> None:
    """``apply`` publishes the members, then the keys: in between, a removed member's key is
    still among the keys. It must be refused, not served under the tenant's limits alone."""
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    alice, bob = keys.issue(), keys.issue()
    state.apply(member_config("v1", alice, bob))
    bob_entry = state.authenticate(bob.secret_key)
    assert bob_entry is not None and state.quota_states(bob_entry) is not None
    del state.members["bob"]  # the moment between the two assignments of a removal
    assert state.authenticate(bob.secret_key) is None
    assert state.quota_states(bob_entry) is None  # authenticated just before: refused at admission
    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(upstream))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://gw") as client:
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {bob.secret_key}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {alice.secret_key}"}
        )
        assert ok.status_code == 200
    # a key pushed before members (member '') is bounded by the tenant's limits only
    legacy = keys.issue()
    state.apply(GatewayConfig.model_validate({"version": "old", "keys": [{"id": legacy.id, "hash": legacy.hash}]}))
    entry = state.authenticate(legacy.secret_key)
    assert entry is not None and state.quota_states(entry) == [state.quotas]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_record_is_written_before_the_last_byte(gateway, stream: bool) -> None:
    """A client that got the whole answer is metered even if the gateway dies right after (SIGKILL):
    when the last body message goes out, the record is already in the spool and the quota settled."""
    client, state, key = gateway
    proxy = client._transport.app  # type: ignore[attr-defined]
    body = json.dumps({**CHAT, "stream": stream}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    seen_at_last_byte: list[int] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            seen_at_last_byte.append(len(state.store.after(0).records))
            assert state.quotas.in_flight == 0
            if stream:
                assert message["body"].endswith(b"data: [DONE]\n\n"), "[DONE] goes with the last byte"

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode())],
    }
    await proxy(scope, receive, send)
    assert seen_at_last_byte == [1]
    (rec,) = state.store.after(0).records
    assert (rec.prompt_tokens, rec.completion_tokens) == (5, 3)


def test_a_rotated_key_expires_on_the_gateways_clock(tmp_path: Path) -> None:
    now = [1000.0]
    state = GatewayState(GatewayStore(tmp_path / "gw.db"), clock=lambda: now[0])
    old, new = keys.issue(), keys.issue()
    state.apply(
        GatewayConfig.model_validate(
            {
                "version": "v2",
                "keys": [{"id": old.id, "hash": old.hash, "expires_at": 1010.0}, {"id": new.id, "hash": new.hash}],
            }
        )
    )
    assert state.authenticate(old.secret_key) is not None  # inside its grace period
    now[0] = 1010.0
    assert state.authenticate(old.secret_key) is None
    assert state.authenticate(new.secret_key) is not None


def two_members(tmp_path: Path, **config: object) -> tuple[GatewayState, dict[str, str]]:
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = {m: keys.issue() for m in ("alice", "bob")}
    state.apply(
        GatewayConfig.model_validate(
            {
                "version": "v1",
                "keys": [{"id": k.id, "hash": k.hash, "member": m} for m, k in issued.items()],
                "members": [{"name": m} for m in issued],
                **config,
            }
        )
    )
    return state, {m: k.secret_key for m, k in issued.items()}


async def test_each_member_gets_its_own_cache_salt_and_a_clients_own_is_replaced(tmp_path: Path) -> None:
    state, secret = two_members(tmp_path)
    client, forwarded = recording(state, settings=GatewaySettings(tenant="lab"))

    async def send(member: str, path: str, body: dict[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {secret[member]}"}
        r = await client.post(path, json=body, headers=headers)
        assert r.status_code == 200, r.text

    await send("alice", "/v1/chat/completions", CHAT)
    await send("bob", "/v1/chat/completions", CHAT)
    await send("alice", "/v1/chat/completions", {**CHAT, "cache_salt": "bobs-guess"})
    await send("alice", "/v1/chat/completions", {**CHAT, "stream": True})
    await send("alice", "/v1/completions", {"model": "demo", "prompt": "hi", "max_tokens": 2})
    await send("alice", "/v1/embeddings", {"model": "demo", "input": "hi"})
    seen = [json.loads(request.content) for request in forwarded]
    salts = [body.get("cache_salt") for body in seen]
    alice, bob = salts[0], salts[1]
    assert alice and bob and alice != bob
    assert salts[2:5] == [alice, alice, alice], "a client's own salt does not survive; streams and completions too"
    assert salts[5] is None, "embeddings use no prefix cache"
    assert all(b["messages"] == CHAT["messages"] for b in seen[:4]), "the rest of the body is forwarded as sent"


def test_the_salt_is_put_in_front_without_writing_the_body_again() -> None:
    from manager.gateway.proxy import with_field

    body = b'  {"model": "m", "x": [1, 2]}'
    payload = json.loads(body)
    assert with_field(body, payload, "cache_salt", "s") == b'  {"cache_salt": "s","model": "m", "x": [1, 2]}'
    assert with_field(b"{}", {}, "cache_salt", "s") == b'{"cache_salt": "s"}'
    sent = {"cache_salt": "theirs", "model": "m"}
    assert json.loads(with_field(json.dumps(sent).encode(), sent, "cache_salt", "ours")) == {
        "cache_salt": "ours",
        "model": "m",
    }
    utf16 = json.dumps({"model": "m"}).encode("utf-16")
    assert json.loads(with_field(utf16, {"model": "m"}, "cache_salt", "s")) == {"model": "m", "cache_salt": "s"}


async def test_images_are_checked_at_the_door_before_the_engine_or_the_quota_sees_them(tmp_path: Path) -> None:
    state, secret = two_members(tmp_path, max_images=2, max_image_pixels=1_000_000, limits={"rpm_limit": 100})
    client, forwarded = recording(state, secret["alice"])

    def png(width: int, height: int) -> str:
        raw = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", width, height) + bytes(20)
        return "data:image/png;base64," + base64.b64encode(raw).decode()

    def chat(*urls: str) -> dict[str, Any]:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        return {**CHAT, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}]}

    refused = {
        "image_too_large": chat(png(2000, 1000)),
        "too_many_images": chat(png(10, 10), png(10, 10), png(10, 10)),
        "image_url_not_supported": chat("https://example.com/cat.png"),
        "invalid_image": chat("data:image/png;base64,AAAA"),
    }
    for code, body in refused.items():
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["code"], error["type"]) == (code, "invalid_request_error")
        assert error["param"].startswith("messages[0].content[") and error["message"].endswith(".")
    assert not forwarded and state.store.after(0).records == [], "nothing reached the engine or was metered"
    assert state.quotas.headers()["x-ratelimit-remaining-requests"] == "100"
    r = await client.post("/v1/chat/completions", json=chat(png(1000, 1000), png(640, 480)))
    assert r.status_code == 200 and len(forwarded) == 1
    metrics = state.metrics.registry.get_sample_value
    assert metrics("gtm_gateway_images_refused_total", {"code": "too_many_images"}) == 1


async def test_requests_with_images_take_the_tenants_image_slot_in_turn(tmp_path: Path) -> None:
    """cpu mode: one request's images at a time (the engine's reservation holds one decode); a text
    request is never held, and an image request that waits too long gets a 503 to retry."""
    state, secret = two_members(tmp_path, max_images=4)
    release, inside = asyncio.Event(), asyncio.Event()
    entered: list[str] = []

    async def slow(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        entered.append("image" if isinstance(body["messages"][0]["content"], list) else "text")
        if entered[-1] == "image":
            inside.set()
            await release.wait()
        return upstream(request)

    settings = GatewaySettings(image_requests=1, body_idle_timeout_s=0.5)
    proxy = Proxy(settings, state, transport=httpx.MockTransport(slow))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {secret['bob']}"},
    )
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", 64, 64) + bytes(20)
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]
    image = {**CHAT, "messages": [{"role": "user", "content": parts}]}

    first = asyncio.create_task(client.post("/v1/chat/completions", json=image))
    await asyncio.wait_for(inside.wait(), 5)
    text = await client.post("/v1/chat/completions", json=CHAT)
    assert text.status_code == 200, "a text request does not wait for the image slot"
    waited = await client.post("/v1/chat/completions", json=image)
    assert waited.status_code == 503 and waited.json()["error"]["code"] == "too_many_image_requests"
    assert waited.headers["retry-after"] == "5" and entered == ["image", "text"]
    second = asyncio.create_task(client.post("/v1/chat/completions", json=image))
    await asyncio.sleep(0.1)
    assert entered == ["image", "text"], "the second image request waits for the first"
    release.set()
    assert (await first).status_code == 200 and (await second).status_code == 200
    assert entered == ["image", "text", "image"]


async def test_an_engines_error_that_is_not_in_openais_shape_is_wrapped(tmp_path: Path) -> None:
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(GatewayConfig.model_validate({"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}]}))

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/embeddings":  # a chat model: the framework's own 404
            return httpx.Response(404, json={"detail": "Not Found"})
        if json.loads(request.content).get("stream"):
            return httpx.Response(500, text="Internal Server Error")
        own = {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": None, "code": 400}}
        return httpx.Response(400, json=own)

    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(engine))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    r = await client.post("/v1/embeddings", json={"model": "demo", "input": "hi"})
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "not_found" and "/v1/embeddings is not served by this tenant's model" in r.text
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 500 and r.json()["error"] == {
        "message": "The model engine answered 500: Internal Server Error",
        "type": "server_error",
        "param": None,
        "code": "engine_error",
    }
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens is too large"  # vLLM's own, as it is


VLLM_TOOLS_OFF = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
VLLM_NAMED_OFF = 'tool_choice=function "get_weather" requires --tool-call-parser to be set'


async def test_an_engine_error_that_names_its_flags_says_what_to_ask_the_admin(tmp_path: Path) -> None:
    """A tenant never sees a flag of the engine: vLLM's 400s for tools and reasoning become what to
    ask the admin for, in OpenAI's shape; a thinking switch sent the way Qwen's API takes it reaches
    the engine as the chat template's argument."""
    state, issued = one_key(tmp_path)
    sent: list[dict[str, Any]] = []

    def engine(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        if body.get("tool_choice") == "auto":
            message = VLLM_TOOLS_OFF
        elif isinstance(body.get("tool_choice"), dict):
            message = VLLM_NAMED_OFF
        elif body.get("top_k") == -7:
            message = "top_k needs --generation-config=vllm to be set"
        else:
            return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        return httpx.Response(400, json={"error": {"message": message, "type": "BadRequestError", "code": 400}})

    proxy = Proxy(GatewaySettings(tenant="acme"), state, transport=httpx.MockTransport(engine))
    client = client_for(proxy, issued)
    for choice in ("auto", {"type": "function", "function": {"name": "get_weather"}}):
        r = await client.post("/v1/chat/completions", json={**CHAT, "tools": [], "tool_choice": choice})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "tool_calls_not_enabled", error
        assert error["message"] == (
            "Tool calling is not enabled for this tenant; an admin enables it with "
            "`update-tenant --name acme --tool-call-parser auto` (list-models shows what auto picks for "
            "the model; where it picks none, the admin names a parser, such as hermes)."
        )
    r = await client.post("/v1/chat/completions", json={**CHAT, "top_k": -7, "stream": True})
    assert r.status_code == 400 and "--generation-config" not in r.text and "an engine option" in r.text
    r = await client.post("/v1/chat/completions", json={**CHAT, "enable_thinking": False, "return_reasoning": True})
    assert r.status_code == 200
    assert sent[-1]["chat_template_kwargs"] == {"enable_thinking": False} and "enable_thinking" not in sent[-1]


def one_key(tmp_path: Path) -> tuple[GatewayState, keys.IssuedKey]:
    """A gateway state with one key and no limits."""
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate({"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {}})
    )
    return state, issued


def client_for(proxy: Proxy, issued: keys.IssuedKey) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )


def vllm_chunks(n: int, prompt: int = 7) -> list[bytes]:
    """What vLLM streams with continuous_usage_stats: compact JSON, usage after choices in every
    chunk, then the usage-only chunk and [DONE]."""
    out = []
    for i in range(n):
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + i + 1, "completion_tokens": i + 1}
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "é"}}]}
        out.append(b"data: " + json.dumps({**chunk, "usage": usage}, separators=(",", ":")).encode() + b"\n\n")
    final = {"prompt_tokens": prompt, "total_tokens": prompt + n, "completion_tokens": n}
    out.append(b"data: " + json.dumps({"id": "c", "choices": [], "usage": final}, separators=(",", ":")).encode())
    out.append(b"\n\ndata: [DONE]\n\n")
    return out


@pytest.mark.parametrize(
    ("options", "usage_events"),
    [(None, 0), ({"include_usage": True}, 1), ({"include_usage": True, "continuous_usage_stats": True}, 5)],
)
async def test_the_engines_running_count_is_read_and_shown_only_as_asked(
    tmp_path: Path, options: dict[str, bool] | None, usage_events: int
) -> None:
    state, issued = one_key(tmp_path)
    asked: list[dict[str, Any]] = []

    def engine(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content))
        return httpx.Response(200, content=b"".join(vllm_chunks(4)), headers={"content-type": "text/event-stream"})

    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(engine))
    async with client_for(proxy, issued) as client:
        body = {**CHAT, "stream": True, **({"stream_options": options} if options else {})}
        r = await client.post("/v1/chat/completions", json=body)
    events = [e for e in r.text.split("\n\n") if e]
    assert asked[0]["stream_options"] == {**(options or {}), "include_usage": True, "continuous_usage_stats": True}
    assert sum('"usage"' in e for e in events) == usage_events
    contents = [json.loads(e[6:]) for e in events if '"content"' in e]
    assert [c["choices"][0]["delta"]["content"] for c in contents] == ["é"] * 4  # chunks intact without usage
    (rec,) = state.store.after(0).records
    assert (rec.outcome, rec.prompt_tokens, rec.completion_tokens) == ("ok", 7, 4)


async def test_an_abandoned_stream_is_closed_at_once_and_metered_with_the_engines_count(tmp_path: Path) -> None:
    """The client leaves after 2 chunks of 1000: the gateway closes the engine's stream at once (so
    vLLM aborts the request), and meters the prompt and what the engine had generated by then."""
    state, issued = one_key(tmp_path)
    produced: list[int] = []
    closed = asyncio.Event()

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for i, chunk in enumerate(vllm_chunks(1000)):
                produced.append(i)
                yield chunk
                await asyncio.sleep(0.01)

        async def aclose(self) -> None:
            closed.set()

    proxy = Proxy(
        GatewaySettings(),
        state,
        transport=httpx.MockTransport(
            lambda request: httpx.Response(200, stream=Endless(), headers={"content-type": "text/event-stream"})
        ),
    )
    body = json.dumps({**CHAT, "stream": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    left = asyncio.Event()
    chunks_seen = 0

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await left.wait()  # the client goes away after its second chunk
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunks_seen
        if message["type"] == "http.response.body" and message.get("body"):
            chunks_seen += 1
            if chunks_seen == 2:
                left.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "headers": [
            (b"authorization", f"Bearer {issued.secret_key}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    await asyncio.wait_for(proxy(scope, receive, send), 5)
    await asyncio.wait_for(closed.wait(), 5)
    await asyncio.sleep(0.1)
    assert len(produced) < 50, "the engine's stream was read on after the client left"
    (rec,) = state.store.after(0).records
    assert rec.outcome == "client_disconnected" and rec.prompt_tokens == 7
    assert 2 <= rec.completion_tokens <= len(produced)
    assert state.quotas.in_flight == 0


async def test_a_stream_the_engine_ends_with_an_error_is_an_engine_error(tmp_path: Path) -> None:
    state, issued = one_key(tmp_path)
    error = b'data: {"error":{"message":"boom","type":"InternalServerError","code":500}}\n\n'

    def engine(request: httpx.Request) -> httpx.Response:
        content = b"".join(vllm_chunks(3)[:3]) + error + b"data: [DONE]\n\n"
        return httpx.Response(200, content=content, headers={"content-type": "text/event-stream"})

    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(engine))
    async with client_for(proxy, issued) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert '"boom"' in r.text
    (rec,) = state.store.after(0).records
    assert (rec.outcome, rec.prompt_tokens, rec.completion_tokens) == ("engine_error", 7, 3)  # the engine's count


async def test_a_gateway_killed_mid_stream_meters_the_request_as_interrupted_at_its_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Begun when admitted, its progress saved while it streams: the spool of a gateway that died
    (here: never settled) holds the open request, and the next gateway on the same spool meters it
    once, as interrupted, with what was saved; its quotas count it. A normal end leaves nothing open."""
    monkeypatch.setattr(proxy_module, "PROGRESS_S", 0.0)  # progress saved at every chunk, not each second
    spool = tmp_path / "gw.db"
    state = GatewayState(GatewayStore(spool))
    issued = keys.issue()
    config = {"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {"tokens_per_day": 1000}}
    state.apply(GatewayConfig.model_validate(config))
    started = asyncio.Event()
    hang = asyncio.Event()

    class Stuck(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            for chunk in vllm_chunks(3, prompt=40)[:3]:
                yield chunk
            started.set()
            await hang.wait()  # the gateway dies here
            yield b"data: [DONE]\n\n"

    proxy = Proxy(
        GatewaySettings(),
        state,
        transport=httpx.MockTransport(
            lambda request: httpx.Response(200, stream=Stuck(), headers={"content-type": "text/event-stream"})
        ),
    )
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
    )
    in_flight = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.05)
    assert state.store.after(0).records == []
    # the gateway is SIGKILLed: nothing settles the request; a new gateway opens the same spool
    again = GatewayState(GatewayStore(spool))
    (rec,) = again.store.after(0).records
    assert rec.outcome == "interrupted" and rec.status == 200 and rec.path == "/v1/chat/completions"
    assert (rec.prompt_tokens, rec.completion_tokens) == (40, 3)  # what the client had been sent
    assert again.quotas.day_tokens == 43
    assert again.last_request_at == rec.at, "the restarted gateway knows when it last served"
    assert GatewayState(GatewayStore(spool)).store.after(0).records == [rec]  # settled once, never twice
    in_flight.cancel()
    hang.set()
    await client.aclose()


async def test_requests_that_end_leave_nothing_open(gateway) -> None:
    client, state, _ = gateway
    for body in (CHAT, {**CHAT, "stream": True}):
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    assert state.store.settle_interrupted(0.0) == 0


class CountingStore(GatewayStore):
    """The gateway's real store, counting its transactions."""

    transactions = 0

    def write(self, writes: Any) -> None:
        self.transactions += 1
        super().write(writes)


async def test_requests_that_begin_and_end_together_share_one_commit(tmp_path: Path) -> None:
    """The writes of one event-loop turn are one transaction: twenty requests in flight at once cost
    a few commits, not forty, and each is still recorded once, before its answer."""
    store = CountingStore(tmp_path / "gw.db")
    state = GatewayState(store)
    issued = keys.issue()
    state.apply(GatewayConfig.model_validate({"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}]}))
    client, forwarded = recording(state, issued.secret_key)
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(20)))
    assert [a.status_code for a in answers] == [200] * 20 and len(forwarded) == 20
    records = store.after(0).records
    assert sorted(r.request_id for r in records) == sorted(a.headers["x-request-id"] for a in answers)
    assert store.transactions <= 4, store.transactions
    assert store.settle_interrupted(0.0) == 0, "every request's open row ended with its record"


def test_the_running_usage_is_read_and_cut_out_of_a_chunk_byte_exactly() -> None:
    record: dict[str, Any] = {}
    chunk = 'data: {"choices":[{"delta":{"content":"hé"}}],"usage":{"prompt_tokens":3,"completion_tokens":2},"x":"ü"}'
    final, out = proxy_module.take_usage(chunk.encode(), record, keep=False)
    assert not final and (record["prompt_tokens"], record["completion_tokens"]) == (3, 2)
    assert out.decode() == 'data: {"choices":[{"delta":{"content":"hé"}}],"x":"ü"}'
    assert proxy_module.take_usage(chunk.encode(), record, keep=True) == (False, chunk.encode())
    last = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    assert proxy_module.take_usage(last, record, keep=False) == (True, last) and record["completion_tokens"] == 4
    assert proxy_module.take_usage(b'data: {"usage": null}', record, keep=False) == (False, b'data: {"usage": null}')


def test_a_whole_answers_usage_is_its_top_level_one() -> None:
    text = 'a \\"usage\\": {\\"prompt_tokens\\": 99} in the answer'
    answer = (
        '{"choices":[{"message":{"content":"' + text + '","x":{"usage":{"prompt_tokens":7}}}}],'
        '"usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}, "extra": "é"}'
    ).encode()
    assert proxy_module.usage_in(answer) == (5, 3)
    assert proxy_module.usage_in(b'{"data": [], "usage": {"prompt_tokens": 4, "total_tokens": 4}}') == (4, 0)
    assert proxy_module.usage_in(b'{"usage": null}') is None
    odd = b'{"usage": {"prompt_tokens": 2, "completion_tokens": 1}, "kind": "usage"}'
    assert proxy_module.usage_in(odd) == (2, 1)  # the last "usage" is a value: the whole answer is read
    assert proxy_module.usage_in(b'{"choices": []}') is None
    assert proxy_module.usage_in(b"not json") is None
