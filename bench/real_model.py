"""The quick start's real model, end to end: its GGUF conversion, its engine's start, and what a
tenant gets from it.

    .venv/bin/python -m bench.real_model --gguf FILE.gguf [--memory 1536M] [--streams 8]

One run, one machine: a manager (in-process, real Docker, a real vLLM CPU engine) imports the
file (import-model: the converter job), admits a tenant on it, and the tenant's port is asked
through the OpenAI SDK. Figures: conversion time; add-tenant -> first answer; time to first
token and decode tokens/s of one stream, then of N streams at once, with the ratio of their
throughput to the one stream's (the baseline, measured in the same run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import secrets
import shutil
import statistics
import time
from pathlib import Path

import docker
import openai

from bench.engine_starts import bench_settings, first_answer, free_port, serve_manager, stop_manager

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]


def one_stream(
    client: openai.OpenAI, model: str, max_tokens: int, messages: list[dict[str, str]] = PROMPT
) -> tuple[float, int, float]:
    """Seconds to the first token, tokens written, and seconds in all, of one streamed answer."""
    started, first, tokens = time.monotonic(), float("nan"), 0
    chunks = client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in chunks:
        if first != first and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - started
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first, tokens, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--memory", default="1536M")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=Path("/var/cache/gpu-tenant-manager"))
    args = parser.parse_args()

    instance = "gtmbench" + secrets.token_hex(3)
    models = args.cache / f"bench-models-{instance}"
    models.mkdir(parents=True)
    source = models.parent / f"bench-{instance}.gguf"
    shutil.copyfile(args.gguf, source)  # the manager links it into the volume (one filesystem)
    settings = bench_settings(instance, models)
    client = docker.from_env()
    server, api = serve_manager(settings)
    try:
        t0 = time.monotonic()
        imported = api.post("/api/v1/models", json={"source": str(source), "name": "smollm2"}, timeout=3600)
        converted = time.monotonic() - t0
        assert imported.status_code == 201, imported.text
        port = free_port()
        body = {"name": "real", "gpu_memory": args.memory, "port": port, "model": "smollm2"}
        t0 = time.monotonic()
        added = api.post("/api/v1/tenants", json={**body, "max_model_len": args.max_model_len})
        assert added.status_code == 201, added.text
        key = added.json()["key"]["api_key"]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        chat = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        started = first_answer(url, {"Authorization": f"Bearer {key}"}, time.monotonic() + 600, chat) - t0
        tenant = api.get("/api/v1/tenants/real").json()
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=600)
        one_stream(sdk, "smollm2", 16)  # the first request's one-time costs stay out of the figures
        first, tokens, took = one_stream(sdk, "smollm2", args.max_tokens)
        single = tokens / took
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
            runs = list(pool.map(lambda _: one_stream(sdk, "smollm2", args.max_tokens), range(args.streams)))
        many = sum(r[1] for r in runs) / (time.monotonic() - t0)
        print(f"model: {imported.json()['origin']}, {imported.json()['parameters'] / 1e6:.1f}M parameters")
        print(f"conversion (import-model, the converter job): {converted:.1f} s")
        print(
            f"add-tenant -> first answer: {started:.1f} s "
            f"({args.memory}, --max-model-len {args.max_model_len}, {tenant['concurrency']} sequences at once)"
        )
        print(f"1 stream: first token {first * 1000:.0f} ms, {single:.1f} tokens/s ({tokens} tokens)")
        firsts = statistics.median(r[0] for r in runs)
        print(
            f"{args.streams} streams: first token median {firsts * 1000:.0f} ms, {many:.1f} tokens/s in all, "
            f"{many / args.streams:.1f} each; ratio to 1 stream {many / single:.2f}"
        )
    finally:
        stop_manager(server, client, instance)
        shutil.rmtree(models, ignore_errors=True)
        source.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
