"""Fair queuing in the gateway's request path (the real proxy and store, a scripted engine that
answers when the test says): at most the engine's concurrency goes in, a quiet member's request
goes before a flood's backlog, every request is metered once, and one that cannot wait gets
OpenAI's error shape with Retry-After. The queue's own rules: test_fairq.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from manager import keys
from manager.contract import GatewayConfig
from manager.gateway.proxy import Proxy
from manager.gateway.settings import GatewaySettings
from manager.gateway.state import GatewayState
from manager.gateway.store import GatewayStore

from .test_gateway_proxy import CHAT, USAGE

pytestmark = pytest.mark.anyio


class Engine:
    """Answers each request once the test releases it; notes who asked, in order."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.release = asyncio.Event()
        self.running = 0
        self.most = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.asked.append(body["messages"][0]["content"])
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}], "usage": USAGE})


def gateway(
    tmp_path: Path, engine: Engine, concurrency: int | None, fair: bool = True
) -> tuple[GatewayState, dict[str, httpx.AsyncClient]]:
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = {m: keys.issue() for m in ("flood", "quiet")}
    state.apply(
        GatewayConfig.model_validate(
            {
                "version": "v1",
                "keys": [{"id": k.id, "hash": k.hash, "member": m, "expires_at": None} for m, k in issued.items()],
                "members": [{"name": m} for m in issued],
                "concurrency": concurrency,
                "fair_queue": fair,
            }
        )
    )
    proxy = Proxy(GatewaySettings(), state, transport=httpx.MockTransport(engine))
    clients = {
        m: httpx.AsyncClient(
            transport=httpx.ASGITransport(app=proxy),
            base_url="http://gw",
            headers={"Authorization": f"Bearer {k.secret_key}"},
            timeout=10,
        )
        for m, k in issued.items()
    }
    return state, clients


def chat(text: str) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": text}]}


async def until(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not reached")


async def test_the_quiet_members_request_goes_before_the_floods_backlog(tmp_path: Path) -> None:
    engine = Engine()
    state, clients = gateway(tmp_path, engine, concurrency=2)
    flood = [asyncio.create_task(clients["flood"].post("/v1/chat/completions", json=chat(f"f{i}"))) for i in range(6)]
    await until(lambda: state.fair_queue.waiting == 4)
    quiet = asyncio.create_task(clients["quiet"].post("/v1/chat/completions", json=chat("q")))
    await until(lambda: state.fair_queue.waiting == 5)
    assert engine.asked == ["f0", "f1"], "the engine's two slots; the rest wait at the gateway"
    engine.release.set()
    answers = await asyncio.gather(*flood, quiet)
    assert [r.status_code for r in answers] == [200] * 7
    assert engine.asked[2] == "q", engine.asked
    assert engine.most == 2, "never more than the engine's concurrency at once"
    records = state.store.after(0).records
    assert sorted(r.member for r in records) == ["flood"] * 6 + ["quiet"], "each request metered once"
    waited = {r.member: r.queue_ms for r in records if r.queue_ms > 0}
    assert "quiet" in waited and sum(r.queue_ms > 0 for r in records) == 5, "the five that waited say how long"
    assert state.metrics.queued.count("quiet") == 1 and state.metrics.queued.count("flood") == 6
    assert state.fair_queue.running == 0 and state.fair_queue.waiting == 0


async def test_with_fair_queuing_off_the_engine_takes_everything_first_come(tmp_path: Path) -> None:
    engine = Engine()
    state, clients = gateway(tmp_path, engine, concurrency=2, fair=False)
    flood = [asyncio.create_task(clients["flood"].post("/v1/chat/completions", json=chat(f"f{i}"))) for i in range(4)]
    await until(lambda: engine.running == 4)
    engine.release.set()
    assert [r.status_code for r in await asyncio.gather(*flood)] == [200] * 4
    assert state.fair_queue.waiting == 0


async def test_a_request_that_cannot_wait_gets_a_503_with_retry_after_and_is_not_metered(tmp_path: Path) -> None:
    engine = Engine()
    state, clients = gateway(tmp_path, engine, concurrency=1)
    state.fair_queue.configure(1, {}, max_waiting=1, max_wait_s=0.2)
    first = asyncio.create_task(clients["flood"].post("/v1/chat/completions", json=chat("f0")))
    await until(lambda: engine.running == 1)
    waits = asyncio.create_task(clients["flood"].post("/v1/chat/completions", json=chat("f1")))
    await until(lambda: state.fair_queue.waiting == 1)
    full = await clients["quiet"].post("/v1/chat/completions", json=chat("q"))
    assert full.status_code == 503 and full.headers["retry-after"] == "5"
    error = full.json()["error"]
    assert error["code"] == "engine_busy" and "1 requests already wait" in error["message"]
    timed_out = await waits
    assert timed_out.status_code == 503 and "waited 0 s" in timed_out.json()["error"]["message"]
    engine.release.set()
    assert (await first).status_code == 200
    assert [r.member for r in state.store.after(0).records] == ["flood"], "only the one served"
    assert state.quotas.in_flight == 0, "the quota tickets of those that waited were given back"
