"""The public port's HTTP/1.1 protocol: uvicorn's httptools protocol with the limits a
port open to the network needs and uvicorn does not have.

- a request's line and headers must arrive within ``header_timeout_s`` of the
  connection opening (or of the request's first byte on a kept-alive connection):
  408, then the connection is closed;
- at most ``max_headers`` headers and ``max_header_bytes`` bytes of request line and
  headers: 431, then the connection is closed.

- what a connection buffers on its way out is bounded: the kernel's send buffer is
  ``send_buffer`` (the kernel's autotuning would grow it to megabytes for a client that reads
  nothing), and the transport pauses the proxy beyond ``send_buffer`` of its own, so a stream
  is forwarded no faster than its client reads (the proxy's ``stall_timeout_s`` ends one whose
  client reads nothing at all).

A body that stops arriving is the proxy's concern (``body_idle_timeout_s``, 408; the scope
says when the body is complete, ``BODY_COMPLETE``, and the proxy then arms no timer),
and uvicorn's ``limit_concurrency`` caps open connections (503). uvicorn is pinned
in images/manager/requirements.lock; tests/unit/test_gateway_http.py runs this
protocol on a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from manager.gateway.settings import GatewaySettings

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
BODY_COMPLETE = "gtm.body_complete"
"""Set in a request's scope once its whole body has arrived."""


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the parser reports it as an error."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    max_headers = 100
    max_header_bytes = 32 * 1024
    send_buffer = 256 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None

    # ---------------------------------------------------------------- header deadline
    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        self._reply(408, f"the request's headers did not arrive within {self.header_timeout_s:.0f} s")

    def _reply(self, status: int, message: str) -> None:
        if self.transport.is_closing():
            return
        code = "request_timeout" if status == 408 else "headers_too_large"
        body = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        ).encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, REASONS[status], len(body)) + body)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        transport.set_write_buffer_limits(high=self.send_buffer)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # ---------------------------------------------------------------- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._header_count = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def _count(self, size: int, headers: int) -> None:
        self._header_bytes += size
        self._header_count += headers
        if self._header_count > self.max_headers:
            self._refusal = (431, f"more than {self.max_headers} request headers")
        elif self._header_bytes > self.max_header_bytes:
            self._refusal = (431, f"request line and headers larger than {self.max_header_bytes} bytes")
        if self._refusal is not None:
            raise _Refused()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # the whole body is in: the proxy reads it without arming its body timer (a small body
        # comes with its headers, so this is the usual case)
        self.cycle.scope[BODY_COMPLETE] = True  # type: ignore[literal-required]

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers every parser error with 400; a refusal of ours gets its own status."""
        self._disarm()
        if self._refusal is not None:
            self._reply(*self._refusal)
            return
        super().send_400_response(msg)


def protocol_for(settings: GatewaySettings) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with this gateway's limits (uvicorn instantiates it per connection)."""
    return type(
        "GatewayHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "max_headers": settings.max_headers,
            "max_header_bytes": settings.max_header_bytes,
            "send_buffer": settings.send_buffer_bytes,
        },
    )
