"""The least a Python proxy can do on the gateway's own server stack (uvicorn with httptools on
uvloop): read the body, forward it, stream the answer back. No keys, quotas or metering. The wire
benchmark runs it with each candidate forwarding client, side by side, and compares the gateway
with the one the gateway uses: what is left over is the gateway's own work.

    python -m bench.passthrough PORT UPSTREAM_URL [httpx|aiohttp|lean]

- httpx: httpx's own transport (the gateway's client before its own);
- aiohttp: aiohttp's client session (its C parser, its connection pool);
- lean: the gateway's own keep-alive HTTP/1.1 client (``manager.gateway.upstream``): a deque
  of idle connections, no per-request scan of the pool, no httpx objects.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Send = Callable[[dict[str, Any]], Awaitable[None]]


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
    """The gateway's own client (``manager.gateway.upstream``), used as the gateway uses it."""
    from manager.gateway.upstream import LeanUpstream, Timeouts

    client = LeanUpstream(upstream)
    timeouts = Timeouts(connect=2.0, read=600.0, write=600.0, pool=600.0)
    json_type = ((b"content-type", b"application/json"),)

    async def forward(scope: dict[str, Any], body: bytes, send: Send) -> None:
        answer = await client.send(scope["method"], scope["path"], json_type, body, timeouts)
        try:
            headers = [(k, v) for k, v in answer.headers if k.lower() == b"content-type"]
            await send({"type": "http.response.start", "status": answer.status, "headers": headers})
            async for part in answer.chunks():
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await answer.close()

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
