"""A fast OpenAI-compatible upstream for benchmarks: fixed answers with usage, streaming
included, so what a benchmark measures is the proxy in front of it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from typing import Any

import uvicorn

USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
ANSWER = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "chat.completion",
        "model": "demo",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "one two three four"}, "finish_reason": "length"}
        ],
        "usage": USAGE,
    }
).encode()
WORDS = int(os.environ.get("BENCH_STREAM_CHUNKS", "4"))
"""Content chunks of a streamed answer (the wire benchmark streams 64)."""
CHUNKS = [json.dumps({"choices": [{"index": 0, "delta": {"content": f"w{i}"}}]}).encode() for i in range(WORDS)]
RUNNING = [
    json.dumps(
        {
            "choices": [{"index": 0, "delta": {"content": f"w{i}"}}],
            "usage": {"prompt_tokens": 9, "total_tokens": 10 + i, "completion_tokens": 1 + i},
        }
    ).encode()
    for i in range(WORDS)
]
"""The same chunks with the running usage vLLM adds to each when asked (``continuous_usage_stats``,
which the gateway always asks for)."""
LAST = json.dumps({"choices": [], "usage": USAGE}).encode()
PACE = re.compile(rb'"bench_pace_ms":\s*(\d+)')


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    chunks = []  # joined once: a body of megabytes (an image) read in pieces costs no more than it must
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = b"".join(chunks)
    stream = b'"stream": true' in body or b'"stream":true' in body
    if not stream:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": ANSWER})
        return
    paced = PACE.search(body)  # a benchmark's own field: seconds between chunks, as an engine generates
    pace_s = int(paced.group(1)) / 1000 if paced else 0.0
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    running = b'"continuous_usage_stats": true' in body or b'"continuous_usage_stats":true' in body
    for chunk in RUNNING if running else CHUNKS:
        await send({"type": "http.response.body", "body": b"data: " + chunk + b"\n\n", "more_body": True})
        if pace_s:
            await asyncio.sleep(pace_s)
    await send({"type": "http.response.body", "body": b"data: " + LAST + b"\n\ndata: [DONE]\n\n"})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", loop="uvloop", http="httptools")
