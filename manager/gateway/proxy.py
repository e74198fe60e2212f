"""The public side of a gateway: a small raw ASGI app (the hot path, kept lean).

Flow of one request: allowlist -> key -> body (size-limited) -> quota decision
-> forward to the engine (streaming passes through event by event) -> usage
record committed -> quota settled. Errors use OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

from manager.gateway.fairq import Queued, Ticket
from manager.gateway.hold import Held
from manager.gateway.http import BODY_COMPLETE
from manager.gateway.images import check_images, count_images
from manager.gateway.quotas import Ticket as QuotaTicket
from manager.gateway.quotas import admit
from manager.gateway.settings import GatewaySettings
from manager.gateway.state import GatewayState, KeyEntry
from manager.gateway.upstream import HttpxUpstream, LeanUpstream, Timeouts, Upstream, UpstreamError, UpstreamResponse

Scope = MutableMapping[str, Any]
log = logging.getLogger(__name__)
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

POST_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
GET_PATHS = {"/v1/models"}
HEALTH_PATHS = {"/health", "/healthz"}
MODEL_PATH = re.compile(r"^/v1/models/[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$")
PLAIN_PATH = re.compile(rb"^(?:/[A-Za-z0-9_:-][A-Za-z0-9._:-]*)+$")
"""A path as clients of the OpenAI API send it: no percent-escapes, no empty, ``.`` or
``..`` segments, nothing an upstream would normalise into another path."""
MAX_JSON_DEPTH = 64
LARGE_BODY = 1024 * 1024
"""Bodies above this (images as data: URLs) take one of the gateway's few large-body slots."""
SALTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""Requests that use the engine's prefix cache: each carries its member's own ``cache_salt``."""
STARTING_RETRY_S = 5
BUSY_RETRY_S = 5
"""Retry-After of a request that found every engine slot taken and the queue full (or waited too long)."""
CANNOT_WAKE_RETRY_S = 30
"""Retry-After of a request whose tenant cannot wake now: the manager looks again at its next one."""
"""Retry-After of a request that came while the tenant starts (its engine loads in tens of seconds)."""
CONNECT_TIMEOUT_S = 2.0
"""The engine is on the tenant's own bridge network: a connect takes well under a millisecond.
What takes seconds is resolving the name of an engine container that is gone."""
PROGRESS_S = 1.0
"""How often a stream's progress is saved to the spool (what an interrupted request is metered with)."""
PROBE_INTERVAL_S = 0.25
"""How often, while the engine is down, one probe asks whether it takes connections again."""


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


ENGINE_OPTIONS_OFF = (
    (
        re.compile(r"--enable-auto-tool-choice|--tool-call-parser"),
        "tool_calls_not_enabled",
        "Tool calling is not enabled for this tenant; an admin enables it with "
        "`update-tenant --name {tenant} --tool-call-parser auto` (list-models shows what auto picks for "
        "the model; where it picks none, the admin names a parser, such as hermes).",
    ),
    (
        re.compile(r"--reasoning-parser"),
        "reasoning_not_enabled",
        "Reasoning output is not enabled for this tenant; an admin enables it with "
        "`update-tenant --name {tenant} --reasoning-parser auto` (for a model that thinks; list-models "
        "shows what auto picks).",
    ),
)
"""Engine errors that name the engine's own flags, in the tenant's words: what to ask the admin for."""
ENGINE_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+(=\S+)?")


def in_tenant_words(message: str, tenant: str) -> tuple[str, str | None]:
    """An engine's error message as the tenant may read it, and its code when it was reworded: a
    tenant never sees a flag of the engine, which only its admin can set."""
    for pattern, code, words in ENGINE_OPTIONS_OFF:
        if pattern.search(message):
            return words.format(tenant=tenant), code
    if ENGINE_FLAG.search(message):
        text = ENGINE_FLAG.sub("an engine option", message)
        return f"{text} (an engine option of tenant {tenant} that its admin sets)", "engine_option_not_enabled"
    return message, None


def openai_error(status: int, content: bytes, path: str, tenant: str = "this tenant") -> bytes:
    """An engine's error answer in OpenAI's shape: vLLM's own errors already are (one that names the
    engine's flags is reworded: ``in_tenant_words``); anything else (a framework's
    ``{"detail": "Not Found"}`` for a path this model does not serve, a plain-text 500) is wrapped,
    its text kept in the message."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]:
        message, code = in_tenant_words(str(body["error"]["message"]), tenant)
        if code is None:
            return content
        return error_body(message, "invalid_request_error", code, body["error"].get("param"))
    detail = body.get("detail") if isinstance(body, dict) else None
    text = str(detail if detail is not None else content.decode(errors="replace"))[:500]
    if status == 404:
        return error_body(
            f"{path} is not served by this tenant's model ({text}); /v1/models lists what it serves",
            "invalid_request_error",
            "not_found",
        )
    kind = "invalid_request_error" if status < 500 else "server_error"
    return error_body(f"The model engine answered {status}: {text}", kind, "engine_error")


def canonical_path(raw_path: bytes) -> str | None:
    """The path exactly as it will be forwarded, or None when the raw path is not plain
    (escapes, dot segments, ``//``): the engine would normalise those into another path
    than the one the allowlist saw, so they are refused before the allowlist."""
    if not PLAIN_PATH.match(raw_path) or any(seg in (b".", b"..") for seg in raw_path.split(b"/")):
        return None
    return raw_path.decode("ascii")


def allowed(method: str, path: str) -> bool:
    """Exact matches only: three POST paths, the model list and one model by its id."""
    if method == "POST":
        return path in POST_PATHS
    if method == "GET":
        return path in GET_PATHS or MODEL_PATH.match(path) is not None
    return False


def content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def route_of(path: str) -> str:
    """The metrics label of an allowed path: model ids are folded so the label set stays bounded."""
    return "/v1/models/{id}" if path.startswith("/v1/models/") else path


def json_depth_exceeds(value: Any, limit: int, body: bytes | None = None) -> bool:
    """True when ``value`` nests containers deeper than ``limit`` (iterative: no recursion). With
    the ``body`` it was read from: a body with no more brackets than ``limit`` is not walked."""
    if body is not None and body.count(b"{") + body.count(b"[") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def cache_salt(tenant: str, key: KeyEntry) -> str:
    """The engine's prefix cache is shared by every request it serves; a salt per member keeps one
    member's cached prompts out of reach of another's (who could otherwise learn them from how fast
    an answer starts: vLLM's advisory for CVE-2025-46570). Clients cannot set it: the gateway
    replaces theirs, so it needs no secret."""
    return _salt(tenant, f"member:{key.member}" if key.member else f"key:{key.id}")


@functools.lru_cache(maxsize=4096)
def _salt(tenant: str, who: str) -> str:
    return hashlib.sha256(f"gtm-cache-salt|{tenant}|{who}".encode()).hexdigest()[:32]


def with_field(body: bytes, payload: dict[str, Any], name: str, value: str) -> bytes:
    """``body`` with ``payload[name] = value`` (``payload`` is changed too). When the client did
    not send the field, it is put in front of the body's first byte, without writing again a body
    of megabytes (images); otherwise the whole object is written again, so no duplicate key
    survives."""
    start = len(body) - len(body.lstrip())
    utf8 = b"\x00" not in body[:4] and not body.startswith(codecs.BOM_UTF8)  # json.loads also reads UTF-16/32
    plain = utf8 and body[start : start + 1] == b"{"
    spliced = name not in payload and plain
    had_fields = bool(payload)
    payload[name] = value  # a streamed request is written again from the payload
    if spliced:
        field = json.dumps({name: value})[1:-1].encode()
        return body[: start + 1] + field + (b"," if had_fields else b"") + body[start + 1 :]
    return json.dumps(payload).encode()


def thinking_switch(payload: dict[str, Any]) -> bytes | None:
    """A chat request's top-level ``enable_thinking`` (how Qwen's own API and the guides that use it
    from LangChain's ``extra_body`` switch thinking) as the chat template argument vLLM reads,
    ``chat_template_kwargs.enable_thinking``; None when there is none to move. ``payload`` is
    changed, and the body written again from it."""
    switch = payload.get("enable_thinking")
    if not isinstance(switch, bool):
        return None
    kwargs = payload.get("chat_template_kwargs")
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    kwargs.setdefault("enable_thinking", switch)
    del payload["enable_thinking"]
    payload["chat_template_kwargs"] = kwargs
    return json.dumps(payload).encode()


_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_CONTENT = re.compile(rb'"content"\s*:\s*"')
_DECODER = json.JSONDecoder()


def take_usage(event: bytes, record: dict[str, Any], keep: bool) -> tuple[bool, bytes]:
    """Reads the engine's usage from an SSE event into ``record``: (whether the event is the final
    usage-only one, the event to pass on). A content chunk's running usage (``continuous_usage_stats``,
    which the gateway always asks for) is cut out of it unless ``keep``: only the small usage object
    is decoded, never the whole chunk."""
    found = _USAGE_KEY.search(event)
    if found is None:
        return False, event
    at = found.start()
    try:
        tail = event[found.end() :].decode()  # starts at a character: the key before it is ASCII
        usage, length = _DECODER.raw_decode(tail)
    except ValueError:
        return False, event
    if not isinstance(usage, dict):  # "usage":null
        return False, event
    record["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
    record["completion_tokens"] = int(usage.get("completion_tokens") or 0)
    if _NO_CHOICES.search(event):
        return True, event
    if keep:
        return False, event
    start = event.rfind(b",", 0, at)  # the comma before "usage" (vLLM writes it after "choices")
    if start < 0 or event[start + 1 : at].strip():
        return False, event
    end = found.end() + len(tail[:length].encode())
    return False, event[:start] + event[end:]


def is_error_event(event: bytes) -> bool:
    """An engine's in-stream error (``data: {"error": {...}}`` or ``{"object": "error", ...}``)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data: {"):
            try:
                data = json.loads(line[6:])
            except ValueError:
                return False
            return isinstance(data, dict) and ("error" in data or data.get("object") == "error")
    return False


def usage_in(answer: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an engine's whole answer, decoding only its usage object:
    the last ``"usage":`` key, the top-level one (vLLM writes it after the choices). A quote in a
    string is escaped, so generated text never looks like the key."""
    at = answer.rfind(b'"usage"')
    found = _USAGE_KEY.match(answer, at) if at >= 0 else None
    usage: Any = None
    try:
        if found is not None:
            usage, _ = _DECODER.raw_decode(answer[found.end() :].decode())
        elif at >= 0:  # the last "usage" is not the key (a value after it): read the whole answer
            whole = json.loads(answer)
            usage = whole.get("usage") if isinstance(whole, dict) else None
    except ValueError:
        return None
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


async def _until_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()


def stream_request(payload: dict[str, Any], record: dict[str, Any], state: GatewayState) -> tuple[bytes, Relay]:
    """What the engine is asked for a streamed request, and the relay of its answer. The engine's
    own running count comes in every chunk, so what was generated is known however the stream
    ends (the client leaves, the engine dies); the client sees only what it asked for."""
    options = payload.get("stream_options") or {}
    options = options if isinstance(options, dict) else {}
    wants_usage = bool(options.get("include_usage"))
    relay = Relay(record, state, wants_usage, wants_usage and bool(options.get("continuous_usage_stats")))
    body = {**payload, "stream_options": {**options, "include_usage": True, "continuous_usage_stats": True}}
    return json.dumps(body).encode(), relay


class Relay:
    """One streamed answer on its way to the client: the events taken from the engine's bytes,
    what was delivered, the progress saved for a gateway killed mid-stream, and the ``[DONE]``
    held back until the usage record is written."""

    def __init__(self, record: dict[str, Any], state: GatewayState, wants_usage: bool, wants_running: bool) -> None:
        self.record = record
        self.state = state
        self.wants_usage = wants_usage
        self.wants_running = wants_running
        self.delivered = 0  # content chunks sent: the count when the engine never gave its own
        self.buffer = b""
        self.closing = b""  # the [DONE] event, sent with the last byte once the record is written
        self.saved_at: float | None = None  # None until the first generated token is saved

    def take(self, chunk: bytes) -> list[bytes]:
        """The whole events the stream holds now that go to the client, usage taken from each."""
        self.buffer += chunk
        out: list[bytes] = []
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            usage_only, event = take_usage(event, self.record, keep=self.wants_running)
            if usage_only and not self.wants_usage:
                continue  # the usage-only event the client did not ask for
            if event.strip() == b"data: [DONE]":
                self.closing += event + b"\n\n"
                continue
            if b'"error"' in event and is_error_event(event):
                self.record["outcome"] = "engine_error"
            elif _CONTENT.search(event):
                self.delivered += 1
            out.append(event + b"\n\n")
        return out

    async def deliver(self, send: Send, out: list[bytes], stall: asyncio.Timeout, deadline: float) -> bool:
        """Sends events on, their progress saved first (``save_progress``), with the stream's stall
        timer armed at ``deadline`` while the send waits for the client to read; False when the
        client is gone."""
        saving = self.save_progress()
        if saving is not None:
            await saving
        stall.reschedule(deadline)
        try:
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        except OSError:
            self.record["outcome"] = "client_disconnected"
            return False
        stall.reschedule(None)  # only after the send: an expired timer cancelled it and ends the stream
        return True

    def save_progress(self) -> asyncio.Future[bool] | None:
        """At the first generated token, then about once a second: what a gateway killed now
        would meter (as ``interrupted``). Saved before the chunk goes to the client."""
        record = self.record
        counted = record["completion_tokens"] or (0 if record["prompt_tokens"] else self.delivered)
        if self.saved_at is None and not counted:
            return None
        if self.saved_at is None or time.monotonic() - self.saved_at >= PROGRESS_S:
            self.saved_at = time.monotonic()
            return self.state.progress(record["request_id"], record["prompt_tokens"], counted, 200)
        return None

    def count_delivered(self) -> None:
        if not self.record["completion_tokens"] and not self.record["prompt_tokens"]:
            self.record["completion_tokens"] = self.delivered  # no usage from the engine: what was delivered

    def rest(self) -> bytes:
        """The stream's last bytes: the held ``[DONE]`` and whatever followed it."""
        return self.closing + self.buffer


class Proxy:
    """Speaks to the engine through the gateway's own keep-alive client
    (``manager.gateway.upstream``, chosen by measurement); tests pass an httpx transport (an
    ``httpx.MockTransport``), put behind the same interface."""

    def __init__(
        self, settings: GatewaySettings, state: GatewayState, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        self.state = state
        self.upstream: Upstream = (
            HttpxUpstream(transport, settings.upstream)
            if transport is not None
            else LeanUpstream(settings.upstream, max_connections=1000, max_idle=100)
        )
        self.large_slots = asyncio.Semaphore(settings.large_bodies)
        self.image_slots = asyncio.Semaphore(settings.image_requests) if settings.image_requests > 0 else None
        t = settings.upstream_timeout_s
        self.timeouts = Timeouts(connect=CONNECT_TIMEOUT_S, read=t, write=t, pool=t)
        self.engine_down = False
        """Set when the engine failed to take a request: until a probe reaches it again, requests
        are answered 503 at once instead of each waiting for a connect (or a name lookup) to fail."""
        self._probe: asyncio.Task[None] | None = None

    def _engine_lost(self) -> None:
        """The engine did not take a request or dropped one: answer at once from now on, and probe."""
        self.engine_down = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_engine())

    async def _probe_engine(self) -> None:
        """Until the engine answers HTTP again (any answer: it takes connections), one request at a
        time, every ``PROBE_INTERVAL_S``."""
        timeouts = Timeouts(connect=CONNECT_TIMEOUT_S, read=CONNECT_TIMEOUT_S, write=1.0, pool=1.0)
        while self.engine_down:
            try:
                answer = await self.upstream.send("GET", "/health", (), b"", timeouts)
                await answer.close()
            except UpstreamError:
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            except Exception:  # never leave the gateway refusing for good: a bug here is logged, retried
                log.exception("probing the engine failed unexpectedly")
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            self.engine_down = False

    async def _send_upstream(
        self, method: str, path: str, request_id: str, body: bytes, accept: bytes = b"application/json"
    ) -> UpstreamResponse:
        headers = ((b"content-type", b"application/json"), (b"accept", accept), (b"x-request-id", request_id.encode()))
        return await self.upstream.send(
            method, path, headers, body, self.timeouts, whole=accept != b"text/event-stream"
        )

    # ---------------------------------------------------------------- ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        path = canonical_path(scope.get("raw_path") or scope["path"].encode())
        if path in HEALTH_PATHS:
            await self._send(send, 200, b'{"status":"ok"}')
            return
        if path is None or not allowed(method, path):
            path = scope["path"]
            await self._send(
                send,
                404,
                error_body(
                    f"{method} {path} is not served on this port; the tenant API "
                    "offers /v1/models, /v1/chat/completions, /v1/completions "
                    "and /v1/embeddings",
                    "invalid_request_error",
                    "not_found",
                ),
            )
            self.state.metrics.requests.add("other", "404")
            self.state.metrics.refused.add("not_found")
            return
        if not self.state.version:  # no keys yet: a key given at add-tenant is not refused as wrong
            await self._refuse(
                send,
                path,
                503,
                f"Tenant {self.settings.tenant} is starting; retry in a few seconds.",
                "tenant_starting",
                {"retry-after": str(STARTING_RETRY_S)},
            )
            return
        key = self._authenticate(scope)
        if key is None:
            await self._refuse(
                send,
                path,
                401,
                "Incorrect API key provided. Send 'Authorization: Bearer <key>' with a key from your administrator.",
                "invalid_api_key",
            )
            return
        self.state.last_request_at = time.time()  # held ones too: the tenant is in use
        limit = self.state.max_body or self.settings.max_body_bytes
        length = content_length(scope)
        if length is not None and length > limit:
            await self._too_large(send, path, limit)
            return
        if length is not None and length <= LARGE_BODY:
            await self._read_and_forward(scope, method, path, receive, send, key, limit)
            return
        try:  # an image, or a body of unknown length: wait for one of the few large-body slots
            await asyncio.wait_for(self.large_slots.acquire(), self.settings.body_idle_timeout_s)
        except TimeoutError:
            await self._refuse(
                send,
                path,
                503,
                f"Too many large requests (over {LARGE_BODY // 1024 // 1024} MiB) on this port at once; retry shortly.",
                "too_many_large_requests",
                {"retry-after": "5"},
            )
            return
        try:
            await self._read_and_forward(scope, method, path, receive, send, key, limit)
        finally:
            self.large_slots.release()

    async def _refuse(
        self,
        send: Send,
        path: str,
        status: int,
        message: str,
        code: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        """An error in OpenAI's shape, counted in the request metrics and by its code; 5xx are server errors."""
        m = self.state.metrics
        m.requests.add(route_of(path), str(status))
        m.refused.add(code)
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        await self._send(send, status, error_body(message, type_, code, param), headers)

    async def _too_large(self, send: Send, path: str, limit: int) -> None:
        await self._refuse(
            send,
            path,
            413,
            f"Request body larger than this API's limit of {limit / 1024 / 1024:.1f} MiB ({limit} bytes); "
            "send a smaller request (for example a smaller image) or ask your administrator to raise it "
            "(update-tenant --max-body).",
            "request_too_large",
            {"connection": "close"},
        )

    async def _read_and_forward(
        self, scope: Scope, method: str, path: str, receive: Receive, send: Send, key: KeyEntry, limit: int
    ) -> None:
        try:
            body = await self._read_body(scope, receive, limit)
        except TimeoutError:
            await self._refuse(
                send,
                path,
                408,
                f"The request body stopped arriving for {self.settings.body_idle_timeout_s:.0f} s; send the "
                "whole body (Content-Length bytes) without pausing.",
                "request_timeout",
                {"connection": "close"},
            )
            return
        if body is None:
            await self._too_large(send, path, limit)
            return
        await self._forward(method, path, receive, send, key, body)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.upstream.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---------------------------------------------------------------- helpers
    def _authenticate(self, scope: Scope) -> KeyEntry | None:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and token:
                    return self.state.authenticate(token.strip())
        return None

    async def _read_body(self, scope: Scope, receive: Receive, limit: int) -> bytes | None:
        """The whole body; None when it exceeds the limit. A client that stops sending for
        ``body_idle_timeout_s`` (a body shorter than its Content-Length) gets TimeoutError."""
        chunks: list[bytes] = []
        size = 0
        if scope.get(BODY_COMPLETE):  # all of it has arrived: receive() returns it at once, no timer
            message = await receive()
            if message["type"] == "http.disconnect":
                return b""
            chunk = message.get("body", b"")
            if len(chunk) > limit:
                return None
            if not message.get("more_body"):
                return chunk  # type: ignore[no-any-return]
            chunks.append(chunk)
            size = len(chunk)
        idle_s = self.settings.body_idle_timeout_s
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(idle_s) as idle:  # one timer, moved on at each piece (no task per read)
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return b""
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
                if not message.get("more_body"):
                    return b"".join(chunks)
                idle.reschedule(loop.time() + idle_s)

    @staticmethod
    async def _send(
        send: Send,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        content_type: bytes = b"application/json",
    ) -> None:
        raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    # ---------------------------------------------------------------- forwarding
    async def _forward(self, method: str, path: str, receive: Receive, send: Send, key: KeyEntry, body: bytes) -> None:
        payload: dict[str, Any] = {}
        if method == "POST":
            try:
                payload = json.loads(body or b"{}")
                if not isinstance(payload, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                await self._send(
                    send,
                    400,
                    error_body("The request body is not a JSON object.", "invalid_request_error", "invalid_json"),
                )
                return
            if json_depth_exceeds(payload, MAX_JSON_DEPTH, body):
                await self._send(
                    send,
                    400,
                    error_body(
                        f"The request body nests objects or arrays deeper than {MAX_JSON_DEPTH} levels.",
                        "invalid_request_error",
                        "invalid_json",
                    ),
                )
                return
            problem = check_images(
                payload,
                self.settings.max_images if self.state.max_images is None else self.state.max_images,
                self.state.max_image_pixels or self.settings.max_image_pixels,
            )
            if problem is not None:
                self.state.metrics.images_refused.add(problem.code)
                await self._refuse(send, path, 400, problem.message, problem.code, param=problem.param)
                return
            if path == "/v1/chat/completions":
                body = thinking_switch(payload) or body
            if path in SALTED_PATHS:
                body = with_field(body, payload, "cache_salt", cache_salt(self.settings.tenant, key))
        # asleep or waking: the request waits here, checked but not yet admitted (no quota counts
        # it) and holding no image slot (another image request then waits in the hold, not for it)
        if self.state.hold.on:
            held = await self.state.hold.wait()
            if held is not Held.RELEASED:
                await self._waking(send, path, held)
                return
        if self.image_slots is not None and count_images(payload):
            await self._with_image_slot(method, path, receive, send, key, body, payload)
            return
        await self._admit_and_forward(method, path, receive, send, key, body, payload)

    async def _with_image_slot(
        self, method: str, path: str, receive: Receive, send: Send, key: KeyEntry, body: bytes, payload: dict[str, Any]
    ) -> None:
        """A request carrying images waits for one of the tenant's image slots (cpu mode: one; the
        engine's reservation holds the decode of one request's images, not of several at once)."""
        try:
            await asyncio.wait_for(self.image_slots.acquire(), self.settings.body_idle_timeout_s)  # type: ignore[union-attr]
        except TimeoutError:
            await self._refuse(
                send,
                path,
                503,
                "Too many requests with images on this API at once (its engine decodes one request's images "
                "at a time); retry shortly.",
                "too_many_image_requests",
                {"retry-after": "5"},
            )
            return
        try:
            await self._admit_and_forward(method, path, receive, send, key, body, payload)
        finally:
            self.image_slots.release()  # type: ignore[union-attr]

    async def _spool_full(self, send: Send, path: str) -> None:
        """Never serve what cannot be metered: the spool's volume is full (or failing)."""
        await self._refuse(
            send,
            path,
            503,
            "The gateway cannot record usage right now (its storage is full); the request was not served. Retry later.",
            "usage_spool_full",
            {"retry-after": "30"},
        )

    async def _waking(self, send: Send, path: str, held: Held) -> None:
        hold = self.state.hold
        if held is Held.REFUSED:
            await self._refuse(
                send,
                path,
                503,
                f"Tenant {self.settings.tenant} is asleep and cannot wake now: {hold.refusal} "
                "Retry later, or ask the host's admin.",
                "tenant_cannot_wake",
                {"retry-after": str(CANNOT_WAKE_RETRY_S)},
            )
            return
        if held is Held.FULL:
            why = f"{hold.max_waiting} requests are already waiting for it"
        else:
            why = f"this request waited {hold.timeout_s:.0f} s for it"
        await self._refuse(
            send,
            path,
            503,
            f"Tenant {self.settings.tenant} is waking up (its engine was asleep after a while without "
            f"requests, and is starting again); {why}. Retry in a few seconds.",
            "tenant_waking",
            {"retry-after": str(STARTING_RETRY_S)},
        )

    async def _admit_and_forward(
        self, method: str, path: str, receive: Receive, send: Send, key: KeyEntry, body: bytes, payload: dict[str, Any]
    ) -> None:
        if self.state.unwritten and not self.state.flush():
            await self._spool_full(send, path)
            return
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if path == "/v1/embeddings":
            max_tokens = 0
        # a byte-level token is at least one byte: prompt tokens <= body bytes; and prompt plus
        # completion never exceed the engine's context, so an image in a data: URL (megabytes of
        # base64, a few hundred tokens) reserves at most max_model_len, never its size in bytes
        reserve = (int(max_tokens) if isinstance(max_tokens, int) else self.settings.default_max_tokens) + len(body)
        if self.state.max_model_len is not None:
            reserve = min(reserve, self.state.max_model_len)
        states = self.state.quota_states(key)
        if states is None:  # the key's member was removed while this request was read
            await self._refuse(send, path, 401, "This API key's member was removed.", "invalid_api_key")
            return
        verdict = admit(states, reserve if method == "POST" else 0)
        if verdict.refusal is not None:
            r = verdict.refusal
            m = self.state.metrics
            m.limited.add(r.reason, r.scope)
            m.refused.add(r.code)
            m.requests.add(route_of(path), "429")
            if key.member:
                m.member_requests.add(key.member, "429")
            await self._send(send, 429, error_body(r.message, r.type, r.code), verdict.headers)
            return
        assert verdict.ticket is not None
        ticket = verdict.ticket
        request_id = "req_" + os.urandom(16).hex()
        started = time.time()
        record: dict[str, Any] = dict(
            request_id=request_id,
            key_id=key.id,
            member=key.member,
            model=str(payload.get("model", "")),
            path=path,
            prompt_tokens=0,
            completion_tokens=0,
            status=0,
            outcome="ok",
            at=started,
            queue_ms=0.0,
            first_token_ms=None,
        )
        headers = {**verdict.headers, "x-request-id": request_id}
        slot = None
        if method == "POST":
            try:
                slot, waited = await self._engine_slot(send, path, receive, key, headers)
                record["queue_ms"] = round(waited * 1000, 3)
            finally:
                if slot is None:
                    ticket.cancel()  # it waited and left (or was answered 503): nothing counts it
            if slot is None:
                return
        try:
            await self._serve(method, path, receive, send, body, payload, record, headers, ticket, slot, started)
        finally:
            if slot is not None:
                self.state.fair_queue.leave(slot, int(record["prompt_tokens"]), int(record["completion_tokens"]))

    async def _engine_slot(
        self, send: Send, path: str, receive: Receive, key: KeyEntry, headers: dict[str, str]
    ) -> tuple[Ticket | None, float]:
        """One of the engine's slots, at once or after waiting in the member's queue (fair
        queuing, ``manager.gateway.fairq``), and the seconds it waited; no slot when the request
        was answered or its client left."""
        queue, m = self.state.fair_queue, self.state.metrics
        member = key.member or f"key:{key.id}"
        slot = queue.enter_now(member)
        if slot is not None:
            m.queued.observe(0.0, key.member)
            return slot, 0.0
        gone = asyncio.Event()
        watcher = asyncio.create_task(_until_disconnect(receive, gone))
        since = time.monotonic()
        try:
            queued, slot = await queue.wait(member, gone)
        finally:
            watcher.cancel()
        waited = time.monotonic() - since
        m.queued.observe(waited, key.member)
        if slot is not None:
            return slot, waited
        if queued is Queued.GONE:
            m.refused.add("client_left_queue")
            return None, waited
        why = (
            f"{queue.max_waiting} requests already wait for it"
            if queued is Queued.FULL
            else f"this request waited {queue.max_wait_s:.0f} s for one"
        )
        await self._refuse(
            send,
            path,
            503,
            f"Tenant {self.settings.tenant}'s engine is busy: every one of its {queue.slots} slots is taken and {why}. "
            "Retry shortly.",
            "engine_busy",
            {**headers, "retry-after": str(BUSY_RETRY_S)},
        )
        return None, waited

    async def _serve(
        self,
        method: str,
        path: str,
        receive: Receive,
        send: Send,
        body: bytes,
        payload: dict[str, Any],
        record: dict[str, Any],
        headers: dict[str, str],
        ticket: QuotaTicket,
        slot: Ticket | None,
        started: float,
    ) -> None:
        """The admitted request, sent to the engine (``slot``: its place there, for fair queuing);
        its usage record written and quotas settled exactly once, however it ends."""
        streamed = payload.get("stream") is True
        # a stream is served piece by piece: begun durably, or not served at all. A plain answer is
        # served whole at its last byte, after its record: a gateway killed before served nothing
        if streamed and not await self.state.begin(record):
            ticket.cancel()
            await self._spool_full(send, path)
            return

        async def commit() -> None:
            """Writes the usage record and settles the quota, once. Awaited before the response's
            last byte, so a client that got a whole answer is always metered (a SIGKILL of the
            gateway included); on errors and disconnects, when the request ends."""
            if ticket.settled:
                return
            used = int(record["prompt_tokens"]) + int(record["completion_tokens"])
            try:
                written = self._finish(record, started, streamed)
            finally:  # a failed record write must not leak the in-flight slot
                ticket.settle(used)
            await written

        def unserved() -> None:
            """The engine did not answer: no usage record, and no quota counts the request."""
            ticket.cancel()
            self.state.drop(record["request_id"])

        try:
            if streamed:
                await self._stream(receive, send, payload, headers, record, commit, unserved, slot)
            else:
                await self._plain(method, path, body, send, headers, record, commit, unserved)
        finally:
            if not ticket.settled:  # an error or a disconnect: the record is written with this turn's
                self._finish(record, started, streamed)  # (not awaited: the task may be ending)
                ticket.settle(int(record["prompt_tokens"]) + int(record["completion_tokens"]))

    def _finish(self, record: dict[str, Any], started: float, opened: bool) -> asyncio.Future[bool]:
        elapsed = time.time() - started
        record["latency_ms"] = round(elapsed * 1000, 3)
        written = self.state.record(record, opened)
        m = self.state.metrics
        status, member = str(record["status"]), record["member"]
        prompt, completion = int(record["prompt_tokens"]), int(record["completion_tokens"])
        m.requests.add(route_of(record["path"]), status)
        m.latency.observe(elapsed)
        if prompt:
            m.tokens.add("prompt", by=prompt)
        if completion:
            m.tokens.add("completion", by=completion)
        if member:
            m.member_requests.add(member, status)
            m.member_tokens.add(member, "prompt", by=prompt)
            m.member_tokens.add(member, "completion", by=completion)
        return written

    async def _unavailable(
        self, send: Send, path: str, headers: dict[str, str], unserved: Callable[[], None], tried: bool = True
    ) -> None:
        """The engine did not take the request (starting, restarting or gone): never metered.
        ``tried``: it was sent and failed (the engine is then probed); else refused at once."""
        if tried:
            self.state.metrics.upstream_errors.add()
            self._engine_lost()
        unserved()
        await self._refuse(
            send,
            path,
            503,
            f"Tenant {self.settings.tenant} is starting (its model engine is not serving yet); retry in a few seconds.",
            "engine_unavailable",
            {**headers, "retry-after": str(STARTING_RETRY_S)},
        )

    async def _plain(
        self,
        method: str,
        path: str,
        body: bytes,
        send: Send,
        headers: dict[str, str],
        record: dict[str, Any],
        commit: Callable[[], Awaitable[None]],
        unserved: Callable[[], None],
    ) -> None:
        if self.engine_down:
            await self._unavailable(send, path, headers, unserved, tried=False)
            return
        try:
            upstream = await self._send_upstream(method, path, record["request_id"], body if method == "POST" else b"")
            try:
                content = await upstream.read()
            finally:
                await upstream.close()
        except UpstreamError:
            await self._unavailable(send, path, headers, unserved)
            return
        record["status"] = upstream.status
        if upstream.status >= 500:
            self.state.metrics.upstream_errors.add()
        if upstream.status == 200 and method == "POST":
            tokens = usage_in(content)
            if tokens:
                record["prompt_tokens"], record["completion_tokens"] = tokens
        else:
            record["outcome"] = "ok" if upstream.status < 400 else "error"
        ctype = upstream.header(b"content-type") or b"application/json"
        if upstream.status >= 400:
            content, ctype = openai_error(upstream.status, content, path, self.settings.tenant), b"application/json"
        await commit()
        await self._send(send, upstream.status, content, headers, ctype)

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        payload: dict[str, Any],
        headers: dict[str, str],
        record: dict[str, Any],
        commit: Callable[[], Awaitable[None]],
        unserved: Callable[[], None],
        slot: Ticket | None = None,
    ) -> None:
        """Events pass through as they come; the closing ``data: [DONE]`` is held back until the
        usage record is written, so a client that saw the whole stream is always metered."""
        body, relay = stream_request(payload, record, self.state)
        upstream = await self._open_stream(send, body, headers, record, commit, unserved)
        if upstream is None:
            return
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_until_disconnect(receive, disconnected))
        raw_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        raw_headers += [(k.encode(), v.encode()) for k, v in headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
            self.state.progress(record["request_id"], 0, 0, 200)
            first_at = await self._relay(upstream, relay, send, disconnected, slot)
            if not disconnected.is_set():
                relay.count_delivered()
                generated = int(record["completion_tokens"])
                if first_at is not None and generated > 1:
                    per_token = (time.time() - first_at) / (generated - 1)
                    self.state.metrics.per_token.observe(per_token, record["member"])
                await commit()
                await send({"type": "http.response.body", "body": relay.rest(), "more_body": False})
        except UpstreamError:
            record["outcome"] = "client_disconnected" if disconnected.is_set() else "engine_error"
            self._engine_lost()  # the next requests are answered at once until a probe reaches it
            if not disconnected.is_set():
                relay.count_delivered()
                await commit()
                await self._stream_broke(send)
        finally:
            watcher.cancel()
            await upstream.close()
            relay.count_delivered()  # the caller writes the record now if it was not written before the last byte

    async def _relay(
        self,
        upstream: UpstreamResponse,
        relay: Relay,
        send: Send,
        disconnected: asyncio.Event,
        slot: Ticket | None,
    ) -> float | None:
        """Passes the engine's chunks on until its stream ends, the client leaves (``disconnected``
        set) or reads nothing for ``stall_timeout_s``; returns when the first token went out (None:
        none did)."""
        record = relay.record
        first_at: float | None = None
        loop, stall_s = asyncio.get_running_loop(), self.settings.stall_timeout_s
        try:
            # one timer for the stream, armed while a send waits for the client to read (a timer
            # per chunk, as asyncio.wait_for makes, costs 35 us a chunk; this, 4)
            async with asyncio.timeout(None) as stall:
                async for chunk in upstream.chunks():
                    out = relay.take(chunk)
                    if disconnected.is_set():
                        # the client left: close the engine's stream now, so the engine aborts the
                        # request; it is metered with the engine's count up to the last chunk
                        record["outcome"] = "client_disconnected"
                        break
                    saved_at = relay.saved_at
                    if out and not await relay.deliver(send, out, stall, loop.time() + stall_s):
                        disconnected.set()
                        break
                    if slot is not None and relay.saved_at != saved_at:  # about once a second
                        self.state.fair_queue.progress(
                            slot, int(record["prompt_tokens"]), int(record["completion_tokens"])
                        )
                    if first_at is None and relay.delivered:
                        first_at = time.time()
                        record["first_token_ms"] = round((first_at - record["at"]) * 1000, 3)
                        self.state.metrics.first_token.observe(first_at - record["at"], record["member"])
        except TimeoutError:
            if not stall.expired():
                raise
            # the client read nothing for stall_s: the engine's stream is closed, so it aborts the
            # request; it is metered with the engine's count up to the last chunk read
            record["outcome"] = "client_stalled"
            disconnected.set()
        return first_at

    async def _open_stream(
        self,
        send: Send,
        body: bytes,
        headers: dict[str, str],
        record: dict[str, Any],
        commit: Callable[[], Awaitable[None]],
        unserved: Callable[[], None],
    ) -> UpstreamResponse | None:
        """The engine's stream once it answered 200; None when the client has its answer already
        (the engine is down or unreachable: a 503; the engine refused: its error, metered)."""
        if self.engine_down:
            await self._unavailable(send, record["path"], headers, unserved, tried=False)
            return None
        try:
            upstream = await self._send_upstream(
                "POST", record["path"], record["request_id"], body, b"text/event-stream"
            )
        except UpstreamError:
            await self._unavailable(send, record["path"], headers, unserved)
            return None
        record["status"] = upstream.status
        if upstream.status == 200:
            return upstream
        try:
            content = await upstream.read()
        except UpstreamError:
            content = b""
        finally:
            await upstream.close()
        record["outcome"] = "error"
        await commit()
        error = openai_error(upstream.status, content, record["path"], self.settings.tenant)
        await self._send(send, upstream.status, error, headers)
        return None

    async def _stream_broke(self, send: Send) -> None:
        """The engine went away mid-answer: the stream ends with an error event (the OpenAI SDK
        raises it as an APIError) instead of a cut connection."""
        self.state.metrics.upstream_errors.add()
        text = "The model engine stopped in the middle of the answer; retry shortly."
        event = b"data: " + error_body(text, "server_error", "engine_unavailable") + b"\n\n"
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": event, "more_body": False})
