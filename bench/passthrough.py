"""The least a Python proxy can do on the gateway's own server stack (uvicorn with httptools on
uvloop): read the body, forward it, stream the answer back. No keys, quotas or metering. The wire
benchmark runs it with each candidate forwarding client, side by side, and compares the gateway
with the one the gateway uses: what is left over is the gateway's own work.

    python -m bench.passthrough PORT UPSTREAM_URL [httpx|aiohttp|lean]

- httpx: httpx's transport, as the gateway uses it today;
- aiohttp: aiohttp's client session (its C parser, its connection pool);
- lean: ``LeanClient`` below, a keep-alive HTTP/1.1 client on asyncio streams: a deque of idle
  connections, no per-request scan of the pool.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import uvicorn

Send = Callable[[dict[str, Any]], Awaitable[None]]


class LeanResponse:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]) -> None:
        self.status, self.headers, self.body = status, headers, body


class LeanClient:
    """HTTP/1.1 with keep-alive to one upstream: idle connections in a deque, reused last in,
    first out; a connection whose answer was not read to its end is closed, not reused."""

    def __init__(self, url: str, max_idle: int = 100) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self.max_idle = max_idle

    async def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> LeanResponse:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        head = [f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-length: {len(body)}\r\n".encode()]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        writer.write(b"".join(head) + b"\r\n" + body)
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        out: list[tuple[bytes, bytes]] = []
        length, chunked = None, False
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(b":")
            k, v = k.strip().lower(), v.strip()
            if k == b"content-length":
                length = int(v)
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
            out.append((k, v))
        return LeanResponse(status, out, self._body(conn, length, chunked))

    async def _body(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], length: int | None, chunked: bool
    ) -> AsyncIterator[bytes]:
        reader, writer = conn
        done = False
        try:
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif length:
                yield await reader.readexactly(length)
            done = True
        finally:
            if done and len(self.idle) < self.max_idle:
                self.idle.append(conn)
            else:
                writer.close()


def httpx_forwarder(upstream: str) -> Callable[[dict[str, Any], bytes, Send], Awaitable[None]]:
    import httpx

    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))

    async def forward(scope: dict[str, Any], body: bytes, send: Send) -> None:
        request = httpx.Request(
            scope["method"], upstream + scope["path"], headers=[(b"content-type", b"application/json")], content=body
        )
        response = await transport.handle_async_request(request)
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.lower() == b"content-type"]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for part in response.stream:  # type: ignore[union-attr]
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return forward


def aiohttp_forwarder(upstream: str) -> Callable[[dict[str, Any], bytes, Send], Awaitable[None]]:
    import aiohttp

    session: list[aiohttp.ClientSession] = []

    async def forward(scope: dict[str, Any], body: bytes, send: Send) -> None:
        if not session:
            connector = aiohttp.TCPConnector(limit=1000, limit_per_host=1000, keepalive_timeout=60)
            session.append(aiohttp.ClientSession(connector=connector, auto_decompress=False))
        async with session[0].request(
            scope["method"], upstream + scope["path"], data=body, headers={"content-type": "application/json"}
        ) as response:
            headers = [(b"content-type", response.headers.get("content-type", "application/json").encode())]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            async for part in response.content.iter_any():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return forward


def lean_forwarder(upstream: str) -> Callable[[dict[str, Any], bytes, Send], Awaitable[None]]:
    client = LeanClient(upstream)

    async def forward(scope: dict[str, Any], body: bytes, send: Send) -> None:
        response = await client.request(scope["method"], scope["path"], [(b"content-type", b"application/json")], body)
        headers = [(k, v) for k, v in response.headers if k == b"content-type"]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        async for part in response.body:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return forward


CLIENTS = {"httpx": httpx_forwarder, "aiohttp": aiohttp_forwarder, "lean": lean_forwarder}


def make_app(upstream: str, client: str = "httpx") -> Any:
    forward = CLIENTS[client](upstream)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        await forward(scope, b"".join(chunks), send)

    return app


if __name__ == "__main__":
    port, upstream = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        make_app(upstream, sys.argv[3] if len(sys.argv) > 3 else "httpx"),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
