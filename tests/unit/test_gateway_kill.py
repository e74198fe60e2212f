"""A real gateway process, SIGKILLed under concurrent load, against its real spool: every answer a
client received is recorded exactly once, every other request begun is settled once as
interrupted at the next start, and nothing is left open: what group-committed metering (the
writes of one event-loop turn in one transaction) must keep. That no answer's last byte leaves
before its record is committed is pinned exactly, in process, by
``test_gateway_proxy.test_the_record_is_written_before_the_last_byte``: a kill rarely lands in
that window."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from manager import keys
from tests.serving import free_port, serving

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


async def engine(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An engine that answers every request after a short think, with its usage."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(0.005)
    body = json.dumps({"choices": [{"message": {"content": "hi"}}], "usage": USAGE}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with serving(engine) as port:
        yield f"http://127.0.0.1:{port}"


def start_gateway(upstream: str, data: Path, public: int, admin: int, token: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "GTM_GATEWAY_UPSTREAM": upstream,
        "GTM_GATEWAY_HOST": "127.0.0.1",
        "GTM_GATEWAY_PUBLIC_PORT": str(public),
        "GTM_GATEWAY_ADMIN_PORT": str(admin),
        "GTM_GATEWAY_ADMIN_TOKEN": token,
        "GTM_GATEWAY_DATA_DIR": str(data),
    }
    gateway = subprocess.Popen([sys.executable, "-m", "manager.cli", "gateway"], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{public}/healthz", timeout=1).status_code == 200:
                return gateway
        except httpx.TransportError:
            time.sleep(0.05)
    gateway.kill()
    raise AssertionError("the gateway did not start")


def test_a_gateway_killed_under_load_loses_and_doubles_nothing(upstream: str, tmp_path: Path) -> None:
    public, admin, token = free_port(), free_port(), keys.issue().secret_key
    issued = keys.issue()
    gateway = start_gateway(upstream, tmp_path, public, admin, token)
    served: set[str] = set()
    try:
        httpx.put(
            f"http://127.0.0.1:{admin}/admin/config",
            headers={"Authorization": f"Bearer {token}"},
            json={"version": "v1", "keys": [{"id": issued.id, "hash": issued.hash}]},
        ).raise_for_status()

        async def client(stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{public}", headers={"Authorization": f"Bearer {issued.secret_key}"}
            ) as c:
                while not stop.is_set():
                    try:
                        r = await c.post("/v1/chat/completions", json={"model": "demo", "messages": []}, timeout=5)
                    except httpx.TransportError:
                        return  # the gateway is gone
                    assert r.status_code == 200, r.text
                    served.add(r.headers["x-request-id"])

        async def load() -> None:
            stop = asyncio.Event()
            clients = [asyncio.create_task(client(stop)) for _ in range(16)]
            await asyncio.sleep(1.5)
            gateway.send_signal(signal.SIGKILL)  # mid-load: requests begun, answered and in between
            await asyncio.gather(*clients)

        asyncio.run(load())
        gateway.wait(5)
    finally:
        gateway.kill()
        gateway.wait(5)
    assert len(served) > 50, "the load did not run"

    again = start_gateway(upstream, tmp_path, public, admin, token)  # settles what the first left open
    again.send_signal(signal.SIGTERM)
    again.wait(10)
    db = sqlite3.connect(tmp_path / "gateway.db")
    try:
        rows = db.execute("SELECT request_id, outcome, prompt_tokens FROM usage").fetchall()
        left_open = db.execute("SELECT COUNT(*) FROM open_requests").fetchone()[0]
    finally:
        db.close()
    outcomes = {rid: outcome for rid, outcome, _ in rows}
    assert len(outcomes) == len(rows), "no request is recorded twice"
    missing = served - outcomes.keys()
    assert not missing, f"{len(missing)} answered requests have no record"
    assert all(outcomes[rid] == "ok" for rid in served)
    assert all(o in ("ok", "interrupted") for o in outcomes.values())
    assert all(p == 9 for rid, o, p in rows if o == "ok"), "every answer is metered with the engine's usage"
    assert left_open == 0


def test_the_spool_is_checkpointed_off_the_writers(tmp_path: Path) -> None:
    """The commits never checkpoint (a checkpoint syncs the file: milliseconds on the event loop);
    the spool's own thread copies the log into the database."""
    from manager.gateway.store import GatewayStore, Settle

    from .fakes import usage_record

    store = GatewayStore(tmp_path / "gw.db", checkpoint_s=0.2)
    try:
        before = (tmp_path / "gw.db").stat().st_size
        for i in range(50):
            store.write([Settle(usage_record(f"r{i}-{j}").model_dump()) for j in range(20)])
        assert (tmp_path / "gw.db").stat().st_size == before, "no commit checkpointed"
        deadline = time.monotonic() + 5
        while (tmp_path / "gw.db").stat().st_size == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "gw.db").stat().st_size > before, "the checkpointer copied the log"
        assert len(store.after(0, limit=2000).records) == 1000
    finally:
        store.close()
