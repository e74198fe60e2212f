"""The least a Python proxy can do on the gateway's own stack (uvicorn with httptools on uvloop,
httpx's transport to the upstream): read the body, forward it, stream the answer back. No keys,
quotas or metering. The wire benchmark compares the gateway with it: what is left over is the
gateway's own work.

    python -m bench.passthrough PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys
from typing import Any

import httpx
import uvicorn


def make_app(upstream: str) -> Any:
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        request = httpx.Request(
            scope["method"],
            upstream + scope["path"],
            headers=[(b"content-type", b"application/json")],
            content=b"".join(chunks),
        )
        response = await transport.handle_async_request(request)
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.lower() in (b"content-type", b"content-length")]
            await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
            async for part in response.stream:  # type: ignore[union-attr]
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


if __name__ == "__main__":
    port, upstream = int(sys.argv[1]), sys.argv[2]
    uvicorn.run(
        make_app(upstream),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
