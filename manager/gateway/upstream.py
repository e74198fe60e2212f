"""The gateway's client to its engine: HTTP/1.1 with keep-alive to one upstream, behind a small
interface of its own (``Upstream``: send a request, get an ``UpstreamResponse`` whose body is read whole or
as it comes), with no per-request objects beyond the answer.

Chosen by measurement (``scripts/bench.sh --wire``: a pass-through proxy alone on one core of
the 2-core reference machine, 32 connections; ranges over this release's runs):

- httpx's own transport: 358-583 requests/s, 1,690-2,766 us of CPU each: httpcore checks every
  pooled connection (its expiry, a select() on its socket) on every request;
- aiohttp's client: 3,511-6,679 requests/s, 149-282 us;
- this client behind httpx's ``Request`` and ``Response`` objects (its first form): 3,971-5,141
  requests/s, 192-250 us; behind this interface: 7,419-13,462 requests/s, 73-134 us.

It costs less than half of aiohttp a request and needs no new package in the image (aiohttp
brings eight). ``HttpxUpstream`` puts any httpx transport behind the same interface: the proxy's
tests pass an ``httpx.MockTransport`` through it, and the conformance test
(``tests/unit/test_upstream_transport.py``) runs both against a real server.

What it keeps: streamed bodies; timeouts (connect; read, between any two reads of the answer;
write; pool); a bounded number of connections; failures as ``UpstreamError`` (the proxy answers
them in OpenAI's shape). An answer closed before its end closes its connection: that is how the
engine learns a client went away, and aborts the request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httpx

IDLE_S = 4.0
"""An idle connection is reused for this long at most: uvicorn, vLLM's server, closes keep-alive
connections after 5 s."""
Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float | None
    read: float | None
    """Between any two reads of the answer (its head, then each piece of its body)."""
    write: float | None
    pool: float | None
    """Waiting for a free connection when all are busy."""


class UpstreamError(Exception):
    """The engine could not be reached, or its answer did not come or broke off."""


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamResponse(Protocol):
    """The engine's answer: its head, and its body read whole (``read``) or as it comes
    (``chunks``). ``close`` must be called, also after a whole read."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None: ...
    async def read(self) -> bytes: ...
    def chunks(self) -> AsyncIterator[bytes]: ...
    async def close(self) -> None: ...


class Upstream(Protocol):
    async def send(
        self, method: str, path: str, headers: Headers, body: bytes, timeouts: Timeouts, whole: bool = False
    ) -> UpstreamResponse:
        """The engine's answer once its head has come; ``whole``: once all of it has (read by
        ``read``, under the same timer as the head)."""
        ...

    async def aclose(self) -> None: ...


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


# ---------------------------------------------------------------- the gateway's own client
class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.idle_since = reader, writer, 0.0

    def usable(self, now: float) -> bool:
        return now - self.idle_since < IDLE_S and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class LeanUpstream:
    """Keep-alive HTTP/1.1 to one engine: a stack of idle connections (the most recently used is
    taken first), at most ``max_connections`` in use."""

    def __init__(self, url: str, max_connections: int = 1000, max_idle: int = 100) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the engine's address must be http://host[:port], not {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._host_line = b"host: " + parts.netloc.encode() + b"\r\n"
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._max_idle = max_idle

    async def send(
        self, method: str, path: str, headers: Headers, body: bytes, timeouts: Timeouts, whole: bool = False
    ) -> UpstreamResponse:
        if self._slots.locked():  # every connection busy: wait for one, at most the pool timeout
            try:
                await asyncio.wait_for(self._slots.acquire(), timeouts.pool)
            except TimeoutError as exc:
                raise UpstreamTimeout("no free connection to the engine") from exc
        else:
            await self._slots.acquire()  # at once (wait_for would make a task of it)
        try:
            return await self._send(method, path, headers, body, timeouts, whole)
        except BaseException:
            self._slots.release()
            raise

    async def _send(
        self, method: str, path: str, headers: Headers, body: bytes, timeouts: Timeouts, whole: bool
    ) -> UpstreamResponse:
        head = [method.encode(), b" ", path.encode(), b" HTTP/1.1\r\n", self._host_line]
        for k, v in headers:
            head += (k, b": ", v, b"\r\n")
        head += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        message = b"".join(head)
        for attempt in (0, 1):
            conn, reused = self._checkout(), True
            if conn is None:
                conn, reused = await self._connect(timeouts.connect), False
            answered = False  # the head came: from then on, never sent again
            data: bytes | None = None
            try:
                conn.writer.write(message)
                if conn.writer.transport.get_write_buffer_size():
                    async with asyncio.timeout(timeouts.write):
                        await conn.writer.drain()
                async with asyncio.timeout(timeouts.read):  # one timer for the head and a whole body
                    raw = await conn.reader.readuntil(b"\r\n\r\n")
                    answered = True
                    status, answer_headers, length, chunked = _parse_head(raw)
                    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                        length, chunked = 0, False
                    if whole and length is not None and not chunked:
                        data = await conn.reader.readexactly(length) if length else b""
            except asyncio.IncompleteReadError as exc:
                conn.close()
                if reused and not answered and not exc.partial and attempt == 0:
                    continue  # the engine closed the idle connection as we reused it: once more, on a new one
                raise UpstreamError(
                    "the engine's answer ended early" if answered else "the engine closed the connection"
                ) from exc
            except TimeoutError as exc:
                conn.close()
                raise UpstreamTimeout("the engine did not answer in time") from exc
            except (OSError, asyncio.LimitOverrunError) as exc:
                conn.close()
                if reused and not answered and attempt == 0 and isinstance(exc, ConnectionError):
                    continue
                raise UpstreamError(str(exc) or type(exc).__name__) from exc
            except UpstreamError:
                conn.close()
                raise
            return _LeanAnswer(self, conn, status, answer_headers, length, chunked, timeouts.read, data)
        raise AssertionError("unreachable")

    def _checkout(self) -> _Connection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _connect(self, limit_s: float | None) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), limit_s)
        except TimeoutError as exc:
            raise UpstreamConnectError(f"connecting to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise UpstreamConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(reader, writer)

    def _checkin(self, conn: _Connection | None) -> None:
        self._slots.release()
        if conn is None:
            return
        if len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


class _LeanAnswer:
    """The connection goes back to the pool only once the body was read to its end; an answer
    closed before that closes it."""

    __slots__ = (
        "_chunked",
        "_client",
        "_closed",
        "_conn",
        "_data",
        "_done",
        "_length",
        "_timeout",
        "headers",
        "status",
    )

    def __init__(
        self,
        client: LeanUpstream,
        conn: _Connection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
        chunked: bool,
        timeout: float | None,
        data: bytes | None = None,
    ) -> None:
        self._client, self._conn, self.status, self.headers = client, conn, status, headers
        self._length, self._chunked, self._timeout = length, chunked, timeout
        self._data = data
        """The whole body, when it was read with the head."""
        self._done = data is not None
        self._closed = False

    def header(self, name: bytes) -> bytes | None:
        return _header(self.headers, name)

    async def read(self) -> bytes:
        if self._data is not None:
            return self._data
        if self._length is None or self._chunked:
            return b"".join([c async for c in self.chunks()])
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._conn.reader.readexactly(self._length)
        except TimeoutError as exc:
            raise UpstreamTimeout("the engine stopped sending") from exc
        except asyncio.IncompleteReadError as exc:
            raise UpstreamError("the engine's answer ended early") from exc
        except OSError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        self._done = True
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._data is not None:
            if self._data:
                yield self._data
            return
        reader, timeout = self._conn.reader, self._timeout
        try:  # asyncio.timeout, not wait_for: no task per read (a stream reads once per chunk)
            if self._chunked:  # what has arrived, decoded at once: events sent together pass together
                buf, ended = b"", False
                while not ended:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(65536)
                    if not data:
                        raise asyncio.IncompleteReadError(buf, None)
                    buf += data
                    pieces, buf, ended = _dechunk(buf)
                    if pieces:
                        yield pieces
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
            raise UpstreamTimeout("the engine stopped sending") from exc
        except (asyncio.IncompleteReadError, ValueError) as exc:
            raise UpstreamError("the engine's answer ended early") from exc
        except OSError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        self._done = True

    def _release(self, reuse: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if not reuse:
            self._conn.close()
        self._client._checkin(self._conn if reuse else None)

    async def close(self) -> None:
        self._release(reuse=self._done)


def _dechunk(buf: bytes) -> tuple[bytes, bytes, bool]:
    """The payload of every whole chunk at the start of ``buf`` (HTTP/1.1 chunked encoding), what
    is left of ``buf``, and whether the last chunk (size 0, no trailers) has come."""
    pieces: list[bytes] = []
    at = 0
    while True:
        eol = buf.find(b"\r\n", at)
        if eol < 0:
            break
        size = int(buf[at:eol].split(b";", 1)[0], 16)  # ValueError: not chunked encoding
        start = eol + 2
        if size == 0:
            if len(buf) < start + 2:
                break
            return b"".join(pieces), b"", True
        end = start + size
        if len(buf) < end + 2:
            break
        pieces.append(buf[start:end])
        at = end + 2
    return b"".join(pieces), buf[at:], False


def _parse_head(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]], int | None, bool]:
    lines = raw[:-4].split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise UpstreamError(f"not an HTTP answer: {lines[0][:80]!r}") from exc
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


# ---------------------------------------------------------------- any httpx transport
class HttpxUpstream:
    """An httpx transport behind the same interface: ``httpx.MockTransport`` in the proxy's
    tests, httpx's own in the conformance test."""

    def __init__(self, transport: httpx.AsyncBaseTransport, url: str) -> None:
        self.transport, self.url = transport, url.rstrip("/")

    async def send(
        self, method: str, path: str, headers: Headers, body: bytes, timeouts: Timeouts, whole: bool = False
    ) -> UpstreamResponse:
        request = httpx.Request(method, self.url + path, headers=list(headers), content=body)
        request.extensions["timeout"] = {
            "connect": timeouts.connect,
            "read": timeouts.read,
            "write": timeouts.write,
            "pool": timeouts.pool,
        }
        try:
            return _HttpxAnswer(await self.transport.handle_async_request(request))
        except httpx.TransportError as exc:
            raise _mapped(exc) from exc

    async def aclose(self) -> None:
        await self.transport.aclose()


def _mapped(exc: httpx.TransportError) -> UpstreamError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return UpstreamConnectError(str(exc))
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(str(exc))
    return UpstreamError(str(exc))


class _HttpxAnswer:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = list(response.headers.raw)

    def header(self, name: bytes) -> bytes | None:
        return _header(self.headers, name)

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        except httpx.TransportError as exc:
            raise _mapped(exc) from exc

    async def close(self) -> None:
        await self._response.aclose()
