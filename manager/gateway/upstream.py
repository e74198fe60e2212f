"""The gateway's client to its engine: HTTP/1.1 with keep-alive to one upstream, behind httpx's
transport interface (so the proxy and its tests speak ``httpx.Request`` and ``httpx.Response``,
and tests pass an ``httpx.MockTransport``).

Chosen by measurement (``scripts/bench.sh --wire``: a pass-through proxy alone on one core of
the 2-core reference machine, 32 connections):

- httpx's own transport: 234-459 requests/s, 2,161-4,253 us of CPU each: httpcore checks every
  pooled connection (its expiry, a select() on its socket) on every request;
- aiohttp's client: 3,166-5,745 requests/s, 173-313 us;
- this transport behind httpx's ``Request`` and ``Response`` objects (as the gateway uses it):
  3,971 requests/s, 250 us; the same connection handling without those objects: 9,884-12,286
  requests/s, 80-100 us. Most of what is left is httpx's models, not the wire.

It is as fast as aiohttp through the same httpx objects, needs no new package in the image (aiohttp
brings eight), and keeps the proxy's tests on ``httpx.MockTransport``. Leaving httpx's models on
the hot path is the next step.

What it keeps of httpx's transport: streamed bodies, the timeouts in ``request.extensions``
(connect; read, between any two reads of the answer; write; pool), a bounded number of
connections, and the errors as httpx's ``TransportError`` classes (the proxy maps them to
OpenAI-shaped 502/503/504). A response closed before its end closes its connection: that is how
the engine learns a client went away, and aborts the request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httpx

IDLE_S = 4.0
"""An idle connection is reused for this long at most: uvicorn, vLLM's server, closes keep-alive
connections after 5 s."""


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.idle_since = reader, writer, 0.0

    def usable(self, now: float) -> bool:
        return now - self.idle_since < IDLE_S and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 1000, max_idle: int = 100) -> None:
        self._idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        host, port = _address(request.url)
        try:
            await asyncio.wait_for(self._slots.acquire(), timeouts.get("pool"))
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no free connection to the engine", request=request) from exc
        try:
            return await self._send(request, host, port, timeouts)
        except BaseException:
            self._slots.release()
            raise

    async def _send(
        self, request: httpx.Request, host: str, port: int, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        head = _head(request, host)
        body = request.content
        for attempt in (0, 1):
            conn, reused = self._checkout(host, port), True
            if conn is None:
                conn, reused = await self._connect(request, host, port, timeouts.get("connect")), False
            try:
                conn.writer.write(head + body)
                async with asyncio.timeout(timeouts.get("write")):
                    await conn.writer.drain()
                async with asyncio.timeout(timeouts.get("read")):
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                conn.close()
                if reused and not exc.partial and attempt == 0:
                    continue  # the engine closed the idle connection as we reused it: once more, on a new one
                raise httpx.RemoteProtocolError("the engine closed the connection", request=request) from exc
            except TimeoutError as exc:
                conn.close()
                raise httpx.ReadTimeout("the engine did not answer in time", request=request) from exc
            except (OSError, asyncio.LimitOverrunError) as exc:
                conn.close()
                if reused and attempt == 0 and isinstance(exc, ConnectionError):
                    continue
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
            status, headers, length, chunked = _parse_head(raw, request)
            if request.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                length, chunked = 0, False
            stream = _Body(self, (host, port), conn, length, chunked, timeouts.get("read"), request)
            return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})
        raise AssertionError("unreachable")

    def _checkout(self, host: str, port: int) -> _Connection | None:
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _connect(self, request: httpx.Request, host: str, port: int, limit_s: float | None) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit_s)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return _Connection(reader, writer)

    def _checkin(self, address: tuple[str, int], conn: _Connection | None) -> None:
        self._slots.release()
        if conn is None:
            return
        idle = self._idle.setdefault(address, deque())
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


class _Body(httpx.AsyncByteStream):
    """The answer's body, read as it comes; the connection goes back to the pool only once the
    body was read to its end, otherwise it is closed."""

    def __init__(
        self,
        transport: LeanTransport,
        address: tuple[str, int],
        conn: _Connection,
        length: int | None,
        chunked: bool,
        timeout: float | None,
        request: httpx.Request,
    ) -> None:
        self._transport, self._address, self._conn = transport, address, conn
        self._length, self._chunked, self._timeout, self._request = length, chunked, timeout, request
        self._done = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader, timeout = self._conn.reader, self._timeout
        try:  # asyncio.timeout, not wait_for: no task per read (a stream reads once per chunk)
            if self._chunked:
                while True:
                    async with asyncio.timeout(timeout):
                        line = await reader.readuntil(b"\r\n")
                        size = int(line[:-2].split(b";", 1)[0], 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")  # no trailers from the engine
                            break
                        data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif self._length is None:  # no length and not chunked: the body ends with the connection
                while True:
                    async with asyncio.timeout(timeout):
                        chunk = await reader.read(65536)
                    if not chunk:
                        break
                    yield chunk
                self._release(reuse=False)  # closes it
                return
            else:
                left = self._length
                while left:
                    async with asyncio.timeout(timeout):
                        chunk = await reader.read(min(left, 65536))
                    if not chunk:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(chunk)
                    yield chunk
        except TimeoutError as exc:
            raise httpx.ReadTimeout("the engine stopped sending", request=self._request) from exc
        except (asyncio.IncompleteReadError, ValueError) as exc:
            raise httpx.RemoteProtocolError("the engine's answer ended early", request=self._request) from exc
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=self._request) from exc
        self._done = True

    def _release(self, reuse: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if not reuse:
            self._conn.close()
        self._transport._checkin(self._address, self._conn if reuse else None)

    async def aclose(self) -> None:
        self._release(reuse=self._done)


def _address(url: httpx.URL) -> tuple[str, int]:
    return url.host, url.port or (443 if url.scheme == "https" else 80)


def _head(request: httpx.Request, host: str) -> bytes:
    target = request.url.raw_path
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1\r\nhost: " + host.encode() + b"\r\n"]
    lines += [k + b": " + v + b"\r\n" for k, v in request.headers.raw if k.lower() not in (b"host", b"content-length")]
    lines.append(b"content-length: " + str(len(request.content)).encode() + b"\r\n\r\n")
    return b"".join(lines)


def _parse_head(raw: bytes, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]], int | None, bool]:
    lines = raw[:-4].split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise httpx.RemoteProtocolError(f"not an HTTP answer: {lines[0][:80]!r}", request=request) from exc
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip(), value.strip()
        lower = name.lower()
        if lower == b"content-length":
            length = int(value)
        elif lower == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        headers.append((name, value))
    return status, headers, length, chunked
