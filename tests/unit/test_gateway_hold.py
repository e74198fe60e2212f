"""A sleeping tenant's gateway holds requests until the manager lifts the hold (the real proxy,
its real store, a scripted engine). The real path, with a real engine stopped and started
again, is in tests/integration/test_text_tenant.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from manager import keys
from manager.contract import GatewayConfig
from manager.gateway.admin import create_admin_app
from manager.gateway.hold import Held, Hold
from manager.gateway.proxy import Proxy
from manager.gateway.settings import GatewaySettings
from manager.gateway.state import GatewayState
from manager.gateway.store import GatewayStore

from .test_gateway_proxy import CHAT, USAGE, upstream

pytestmark = pytest.mark.anyio


def config(key: keys.IssuedKey, hold: bool, **extra: object) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "version": f"v-{hold}",
            "keys": [{"id": key.id, "hash": key.hash, "expires_at": None}],
            "limits": {"rpm_limit": 2},
            "hold": hold,
            **extra,
        }
    )


@pytest.fixture
def held(tmp_path: Path) -> tuple[httpx.AsyncClient, GatewayState, keys.IssuedKey, list[str]]:
    """A gateway told to hold, and the order in which its engine got requests (by their content)."""
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(config(issued, hold=True))
    seen: list[str] = []

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/chat"):
            seen.append(request.content.decode())
        return upstream(request)

    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(engine))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
        timeout=30,
    )
    return client, state, issued, seen


async def until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_held_requests_are_served_in_arrival_order_once_the_hold_is_lifted(held) -> None:  # type: ignore[no-untyped-def]
    client, state, issued, seen = held
    tasks = []
    for i in range(5):  # one after another, each waiting before the next arrives
        body = {**CHAT, "messages": [{"role": "user", "content": f"n{i}"}]}
        tasks.append(asyncio.create_task(client.post("/v1/chat/completions", json=body)))
        await until(lambda n=i: state.hold.waiting == n + 1, f"request {i} held")
    assert seen == [] and state.store.after(0).records == []
    assert state.last_request_at is not None
    # held is not admitted: the limit of 2 a minute counts nothing yet
    assert state.quotas.in_flight == 0 and len(state.quotas.window) == 0
    # the manager lifts the hold from the admin app's thread (a config push runs there)
    await asyncio.to_thread(state.apply, config(issued, hold=False))
    answers = await asyncio.gather(*tasks)
    assert sorted(a.status_code for a in answers) == [200, 200, 429, 429, 429]
    assert [a.status_code for a in answers] == [200, 200, 429, 429, 429], "the first two to arrive are served"
    assert [s.split('"content":"n')[1][0] for s in seen] == ["0", "1"]
    assert answers[0].json()["usage"] == USAGE and state.hold.waiting == 0


async def test_a_streamed_request_held_then_released_streams(held) -> None:  # type: ignore[no-untyped-def]
    client, state, issued, _ = held
    task = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    await until(lambda: state.hold.waiting == 1, "the stream held")
    state.apply(config(issued, hold=False))
    r = await task
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    (record,) = state.store.after(0).records
    assert (record.prompt_tokens, record.completion_tokens, record.outcome) == (5, 3, "ok")


async def test_past_the_deadline_or_beyond_the_queue_it_is_a_503_that_says_the_tenant_is_waking(held) -> None:  # type: ignore[no-untyped-def]
    client, state, issued, seen = held
    state.apply(config(issued, hold=True, hold_timeout_s=0.2, max_waiting=1))
    late = await client.post("/v1/chat/completions", json=CHAT)
    assert late.status_code == 503 and late.headers["retry-after"] == "5"
    error = late.json()["error"]
    assert error["code"] == "tenant_waking" and "is waking up" in error["message"] and "waited 0 s" in error["message"]
    state.apply(config(issued, hold=True, hold_timeout_s=5, max_waiting=1))
    first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: state.hold.waiting == 1, "one held")
    full = await client.post("/v1/chat/completions", json=CHAT)
    assert full.status_code == 503 and "1 requests are already waiting" in full.json()["error"]["message"]
    state.apply(config(issued, hold=False))
    assert (await first).status_code == 200
    assert len(seen) == 1 and state.store.after(0).records[0].outcome == "ok"  # refused ones: never metered


async def test_a_wake_the_manager_refused_is_a_503_with_its_numbers_for_the_held_and_the_next(held) -> None:  # type: ignore[no-untyped-def]
    client, state, issued, seen = held
    waiting = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: state.hold.waiting == 1, "one held")
    why = "it needs 3.0 GiB but 1.0 GiB of 7.0 GiB is free beside the 2 tenants awake; serving requests now: a, b."
    await asyncio.to_thread(state.apply, config(issued, hold=True, hold_refusal=why))
    for answer in (await waiting, await client.post("/v1/chat/completions", json=CHAT)):
        assert answer.status_code == 503 and answer.headers["retry-after"] == "30"
        error = answer.json()["error"]
        assert error["code"] == "tenant_cannot_wake" and why in error["message"], error
    assert state.hold.waiting == 0 and seen == [] and state.store.after(0).records == []
    assert state.last_request_at is not None, "the manager sees it came, and looks again"
    state.apply(config(issued, hold=True))  # room again: the next one is held, and served once awake
    again = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
    await until(lambda: state.hold.waiting == 1, "held again")
    state.apply(config(issued, hold=False))
    assert (await again).status_code == 200


async def test_a_wrong_key_is_refused_at_once_while_held(held) -> None:  # type: ignore[no-untyped-def]
    client, state, _, _ = held
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer gtm_wrong"})
    assert r.status_code == 401 and state.hold.waiting == 0 and state.last_request_at is None


async def test_the_activity_the_manager_reads(held) -> None:  # type: ignore[no-untyped-def]
    client, state, issued, _ = held
    admin = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_admin_app(state, "t0ken")),
        base_url="http://admin",
        headers={"Authorization": "Bearer t0ken"},
    )
    idle = (await admin.get("/admin/activity")).json()
    assert idle == {"last_request_at": None, "in_flight": 0, "waiting": 0, "hold": True, "waiting_since": None}
    task = asyncio.create_task(client.get("/v1/models"))
    await until(lambda: state.hold.waiting == 1, "held")
    busy = (await admin.get("/admin/activity")).json()
    assert busy["waiting"] == 1 and busy["last_request_at"] == state.last_request_at
    assert busy["waiting_since"] and abs(busy["waiting_since"] - state.last_request_at) < 1.0
    state.apply(config(issued, hold=False))
    assert (await task).status_code == 200
    assert (await admin.get("/admin/activity")).json()["waiting_since"] is None
    assert (await admin.get("/admin/activity")).json()["hold"] is False
    assert (await admin.get("/admin/activity", headers={"Authorization": "Bearer x"})).status_code == 401


async def test_a_hold_lifted_between_the_look_and_the_wait_does_not_strand_the_request() -> None:
    hold = Hold()
    hold.set(True, 5.0, 8)
    waiter = asyncio.create_task(hold.wait())
    await asyncio.sleep(0)
    hold.set(False, 5.0, 8)
    assert await waiter is Held.RELEASED
    # the race: the proxy saw ``on``, the hold is lifted, then the request starts waiting
    hold.set(False, 5.0, 8)
    assert await asyncio.wait_for(hold.wait(), 1.0) is Held.RELEASED and hold.waiting == 0


async def test_held_image_requests_hold_no_image_slot(tmp_path: Path) -> None:
    """cpu mode: one image request at a time goes to the engine. Two held ones both wait for the
    wake, not the second for the first's slot (it would get a 503 after the body timeout)."""
    import base64
    import struct

    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", 32, 32) + bytes(20)  # its size, read at the door
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(config(issued, hold=True, hold_timeout_s=10))
    settings = GatewaySettings(image_requests=1, body_idle_timeout_s=0.3, max_images=4)
    proxy = Proxy(settings, state, transport=httpx.MockTransport(upstream))
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=proxy),
        base_url="http://gw",
        headers={"Authorization": f"Bearer {issued.secret_key}"},
        timeout=30,
    )
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(header).decode()}}
    body = {**CHAT, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what?"}]}]}
    tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(2)]
    await until(lambda: state.hold.waiting == 2, "both held")
    await asyncio.sleep(0.5)  # longer than the image slot's wait
    state.apply(config(issued, hold=False))
    assert [r.status_code for r in await asyncio.gather(*tasks)] == [200, 200]
