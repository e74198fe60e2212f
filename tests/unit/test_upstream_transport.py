"""The gateway's keep-alive client against a real HTTP server (uvicorn, as vLLM serves), checked
side by side with httpx's own transport behind the same interface (``HttpxUpstream``, which the
proxy's tests use with an ``httpx.MockTransport``): what the proxy relies on holds for both."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from manager.gateway.upstream import (
    HttpxUpstream,
    LeanUpstream,
    Timeouts,
    Upstream,
    UpstreamConnectError,
    UpstreamTimeout,
)
from tests.serving import serving

disconnected = threading.Event()  # set by the server (its own thread and loop)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    client = f"{scope['client'][0]}:{scope['client'][1]}"  # one per connection
    path = scope["path"]
    if path == "/slow":
        await asyncio.sleep(2)
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(20):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            await asyncio.sleep(0.05)
            if i >= 2:
                try:
                    message = await asyncio.wait_for(receive(), 0.001)
                except TimeoutError:
                    continue
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    body = json.dumps({"connection": client, "path": path}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 404 if path == "/missing" else 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serving(app, timeout_keep_alive=1) as port:
        yield f"http://127.0.0.1:{port}"


TRANSPORTS: dict[str, Callable[[str], Upstream]] = {
    "lean": LeanUpstream,
    "httpx": lambda url: HttpxUpstream(httpx.AsyncHTTPTransport(), url),
}
HEADERS = ((b"content-type", b"application/json"),)


def timeouts(read_s: float = 5.0) -> Timeouts:
    return Timeouts(connect=1.0, read=read_s, write=1.0, pool=1.0)


async def plain(upstream: Upstream, path: str, whole: bool = False) -> tuple[int, dict[str, str]]:
    answer = await upstream.send("POST", path, HEADERS, b'{"a": 1}', timeouts(), whole=whole)
    try:
        return answer.status, json.loads(await answer.read())
    finally:
        await answer.close()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_plain_answers_reuse_the_connection_and_survive_the_servers_idle_close(server: str, kind: str) -> None:
    async def run() -> None:
        transport = TRANSPORTS[kind](server)
        status, first = await plain(transport, "/plain")
        _, second = await plain(transport, "/plain", whole=True)  # read with its head
        assert status == 200 and first["connection"] == second["connection"]  # kept alive
        missing, _ = await plain(transport, "/missing")
        assert missing == 404
        await asyncio.sleep(1.5)  # the server closes the idle connection (keep-alive 1 s)
        status, third = await plain(transport, "/plain")
        assert status == 200 and third["connection"] != first["connection"]
        await transport.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_stream_arrives_event_by_event_and_closing_it_early_reaches_the_server(server: str, kind: str) -> None:
    async def run() -> None:
        transport = TRANSPORTS[kind](server)
        response = await transport.send("POST", "/stream", HEADERS, b"{}", timeouts())
        got: list[tuple[float, bytes]] = []
        async for chunk in response.chunks():
            got.append((time.monotonic(), chunk))
            if len(got) == 4:
                break
        await response.close()
        assert b"".join(c for _, c in got).startswith(b"data: 0\n\ndata: 1\n\n")
        assert got[-1][0] - got[0][0] >= 0.1, "events came together, not as they were sent"
        assert await asyncio.to_thread(disconnected.wait, 3), "the server never learned the client went away"
        disconnected.clear()
        status, _ = await plain(transport, "/plain")  # the pool still works
        assert status == 200
        whole = await transport.send("POST", "/stream", HEADERS, b"{}", timeouts())
        body = await whole.read()
        await whole.close()
        assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 21
        await transport.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_errors_are_upstream_errors(server: str, kind: str) -> None:
    async def run() -> None:
        transport = TRANSPORTS[kind](server)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        nowhere = TRANSPORTS[kind](f"http://127.0.0.1:{closed}")
        with pytest.raises(UpstreamConnectError):
            await nowhere.send("POST", "/plain", HEADERS, b"{}", timeouts())
        for whole in (False, True):
            with pytest.raises(UpstreamTimeout):
                await transport.send("POST", "/slow", HEADERS, b"{}", timeouts(read_s=0.3), whole=whole)
        status, _ = await plain(transport, "/plain")  # and it goes on serving
        assert status == 200
        await transport.aclose()

    asyncio.run(run())


def test_chunked_bodies_decode_however_the_bytes_arrive() -> None:
    """What arrived is decoded at once; a chunk, a size line or the last chunk cut anywhere waits
    for the rest."""
    import random

    from manager.gateway.upstream import _dechunk

    rng = random.Random(7)
    for _ in range(200):
        parts = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(rng.randrange(1, 8))]
        wire = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"
        cuts = sorted(rng.sample(range(1, len(wire)), min(5, len(wire) - 1)))
        got, buf, ended = b"", b"", False
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            assert not ended
            buf += wire[a:b]
            piece, buf, ended = _dechunk(buf)
            got += piece
        assert ended and buf == b"" and got == b"".join(parts)
