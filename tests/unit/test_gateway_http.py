"""The public port's limits on a real socket: the gateway's protocol in an in-process
uvicorn server, the proxy in front of a scripted upstream (no Docker). The same cases
run against a gateway container in tests/integration/test_gateway_hardening.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from manager import keys
from manager.contract import GatewayConfig
from manager.gateway.http import protocol_for
from manager.gateway.proxy import Proxy
from manager.gateway.settings import GatewaySettings
from manager.gateway.state import GatewayState
from manager.gateway.store import GatewayStore
from tests.rawhttp import exchange
from tests.serving import serving


def upstream(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, str]]:
    settings = GatewaySettings(header_timeout_s=0.5, body_idle_timeout_s=0.5, max_headers=20, max_header_bytes=4096)
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate({"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {}})
    )
    proxy = Proxy(settings, state, transport=httpx.MockTransport(upstream))
    with serving(proxy, http=protocol_for(settings), lifespan="off") as port:
        yield port, issued.secret_key


def test_half_sent_headers_get_408_and_the_connection_closes(served: tuple[int, str]) -> None:
    port, _ = served
    out, elapsed = exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert out.startswith(b"HTTP/1.1 408"), out
    assert elapsed < 3


def test_a_silent_connection_is_closed(served: tuple[int, str]) -> None:
    port, _ = served
    out, elapsed = exchange(port, b"")
    assert out.startswith(b"HTTP/1.1 408") and elapsed < 3


def test_body_shorter_than_its_content_length_gets_408(served: tuple[int, str]) -> None:
    port, key = served
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    ).encode()
    out, elapsed = exchange(port, head + b'{"model": "demo"')
    assert b" 408 " in out.split(b"\r\n")[0], out
    assert b"request_timeout" in out and elapsed < 3


def test_too_many_headers_get_431(served: tuple[int, str]) -> None:
    port, _ = served
    flood = b"".join(b"X-H%d: v\r\n" % i for i in range(50))
    out, _ = exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + flood + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431"), out


def test_oversized_headers_get_431(served: tuple[int, str]) -> None:
    port, _ = served
    out, _ = exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431"), out


def test_ordinary_keep_alive_requests_still_work(served: tuple[int, str]) -> None:
    port, key = served
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}) as c:
        for _ in range(3):
            r = c.post("/v1/chat/completions", json={"model": "demo", "messages": [], "max_tokens": 1})
            assert r.status_code == 200
            time.sleep(0.3)  # idle between requests is not a header timeout


def test_the_scope_says_when_the_whole_body_has_arrived(tmp_path: Path) -> None:
    """The proxy reads a body that came with its headers without arming a timer; a body still on
    its way is not marked (and is read under the idle timer, as the 408 test shows)."""
    from manager.gateway.http import BODY_COMPLETE

    seen: list[bool] = []

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        seen.append(bool(scope.get(BODY_COMPLETE)))
        while (await receive())["more_body"]:  # type: ignore[operator]
            pass
        await send({"type": "http.response.start", "status": 204, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    with (
        serving(app, http=protocol_for(GatewaySettings()), lifespan="off") as port,
        socket.create_connection(("127.0.0.1", port)) as conn,
    ):
        conn.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        assert conn.recv(1024).startswith(b"HTTP/1.1 204")
        conn.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n{")
        time.sleep(0.3)
        conn.sendall(b'""}')
        assert conn.recv(1024).startswith(b"HTTP/1.1 204")
    assert seen == [True, False]


def test_a_stream_goes_no_faster_than_its_client_reads_and_a_stalled_one_is_ended(tmp_path: Path) -> None:
    """An engine that would write 50 MB of events, to a client that reads nothing: the gateway
    pulls no more than its bounded buffers hold, ends the stream after the stall timeout (the
    engine's stream is closed, so vLLM aborts the request), meters it as ``client_stalled`` with
    the engine's count, and serves another client meanwhile."""
    produced, closed = [0], threading.Event()
    event = b'data: {"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}],"usage":{"prompt_tokens":3,'

    async def endless() -> AsyncIterator[bytes]:
        try:
            for n in range(50_000):
                produced[0] += len(event) + 40
                yield event + b'"completion_tokens":%d}}\n\n' % (n + 1)
        finally:
            closed.set()

    def engine(request: httpx.Request) -> httpx.Response:
        if b'"stream": true' in request.content or b'"stream":true' in request.content:
            return httpx.Response(200, content=endless(), headers={"content-type": "text/event-stream"})
        return upstream(request)

    settings = GatewaySettings(stall_timeout_s=1.0, send_buffer_bytes=64 * 1024)
    state = GatewayState(GatewayStore(tmp_path / "gw.db"))
    issued = keys.issue()
    state.apply(
        GatewayConfig.model_validate({"version": "v", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {}})
    )
    proxy = Proxy(settings, state, transport=httpx.MockTransport(engine))
    body = b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {issued.secret_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with serving(proxy, http=protocol_for(settings), lifespan="off") as port:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        reader.connect(("127.0.0.1", port))
        reader.sendall(head + body)  # and reads nothing
        try:
            other = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {issued.secret_key}"},
                timeout=5,
            )
            assert other.status_code == 200, "another client is served meanwhile"
            assert closed.wait(10), "the stalled stream was ended at the engine"
            assert produced[0] < 4 * 1024 * 1024, f"the gateway pulled {produced[0]} bytes for a client that read none"
        finally:
            reader.close()
    records = state.store.after(0).records
    (stalled,) = [r for r in records if r.outcome != "ok"]
    assert stalled.outcome == "client_stalled" and stalled.completion_tokens > 0 and stalled.prompt_tokens == 3
