"""Ten tenants on room for three awake (overcommit), replaying a trace of Poisson arrivals.

    .venv/bin/python -m bench.sleep_trace --duration 300 --seed 1

One run, one machine: a manager (in-process, real Docker, real vLLM CPU engines) with
``GTM_OVERCOMMIT`` and a headroom that leaves room for three reservations of 1536M awake. Ten
tenants are added: three fit awake, seven are admitted asleep. Each tenant then gets requests with
exponential gaps (a Poisson process of ``--rate`` requests a minute each, from ``--seed``), each a
streamed chat completion timed to its first token. A request that finds its tenant asleep waits
while the manager puts the least recently used idle tenant to sleep and starts its engine (cpu
mode: a cold start, one engine at a time).

Figures: the served fraction; time to first token, p50 and p99, of every request and apart for
those that found their tenant awake (the baseline, measured in the same run) and those that woke
it; the ratio of the two p50s; the wakes and evictions the manager counted.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx

from bench.engine_starts import bench_settings, free_port, serve_manager, stop_manager

SIZE = 1536 * 1024**2
TENANTS = 10
AWAKE = 3
BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}


@dataclass
class Outcome:
    tenant: str
    at: float
    """Seconds into the trace when it was sent."""
    status: int
    ttft: float | None
    """Seconds to its first content chunk; None when it got none."""
    woke: bool
    """Its tenant was asleep or waking when it was sent."""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def arrivals(rng: random.Random, duration: float, per_minute: float) -> list[tuple[float, str]]:
    """Every tenant's Poisson arrivals over the trace, merged in time order."""
    out = []
    for i in range(TENANTS):
        t = rng.expovariate(per_minute / 60)
        while t < duration:
            out.append((t, f"t{i}"))
            t += rng.expovariate(per_minute / 60)
    return sorted(out)


def ask(url: str, key: str) -> tuple[int, float | None]:
    started = time.monotonic()
    with httpx.stream("POST", url, json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=400) as answer:
        if answer.status_code != 200:
            answer.read()
            return answer.status_code, None
        for line in answer.iter_lines():
            if line.startswith("data: {") and '"content":"' in line:
                return 200, time.monotonic() - started
    return 200, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of trace")
    parser.add_argument("--rate", type=float, default=1.0, help="requests a minute per tenant")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--models", type=Path, default=Path("/var/cache/gpu-tenant-manager/models"))
    args = parser.parse_args()
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    client = docker.from_env()
    instance = "gtmbench" + secrets.token_hex(3)
    settings = bench_settings(instance, args.models).model_copy(
        update={"overcommit": True, "headroom": total - AWAKE * SIZE - SIZE // 2}
    )
    server, api = serve_manager(settings)
    try:
        keys, ports = {}, {}
        for i in range(TENANTS):
            name, port = f"t{i}", free_port()
            made = api.post("/api/v1/tenants", json={"name": name, "gpu_memory": "1536M", "port": port})
            made.raise_for_status()
            keys[name], ports[name] = made.json()["key"]["api_key"], port
            admitted = "only by overcommit (asleep)" if made.json()["admission"]["by_overcommit"] else "awake"
            print(f"{name}: admitted {admitted}", flush=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            rows = api.get("/api/v1/tenants").json()
            if sum(t["status"] == "running" for t in rows) == AWAKE and all(
                t["status"] in ("running", "asleep") for t in rows
            ):
                break
            time.sleep(1)
        time.sleep(5)  # every asleep tenant's gateway holds its first request
        trace = arrivals(random.Random(args.seed), args.duration, args.rate)
        print(f"trace: {len(trace)} requests over {args.duration:.0f} s, {args.rate:g}/min per tenant", flush=True)
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        start = time.monotonic()

        def one(at: float, name: str) -> None:
            status = api.get(f"/api/v1/tenants/{name}").json()["status"]
            code, ttft = ask(f"http://127.0.0.1:{ports[name]}/v1/chat/completions", keys[name])
            with lock:
                outcomes.append(Outcome(name, at, code, ttft, status in ("asleep", "waking")))

        threads = []
        for at, name in trace:
            time.sleep(max(0.0, start + at - time.monotonic()))
            threads.append(threading.Thread(target=one, args=(at, name)))
            threads[-1].start()
        for t in threads:
            t.join(timeout=600)
        served = [o for o in outcomes if o.status == 200 and o.ttft is not None]
        hits = [o.ttft for o in served if not o.woke and o.ttft is not None]
        wakes = [o.ttft for o in served if o.woke and o.ttft is not None]
        every = [o.ttft for o in served if o.ttft is not None]
        refused: dict[int, int] = {}
        for o in outcomes:
            if o.status != 200:
                refused[o.status] = refused.get(o.status, 0) + 1
        audit = api.get("/api/v1/audit", params={"limit": 5000}).json()
        counted = {a: sum(1 for e in audit if e["action"] == a and e["result"] == "ok") for a in ("wake", "evict")}
        print(f"served {len(served)} of {len(outcomes)} ({len(served) / len(outcomes):.1%}); refused {refused or 0}")
        for label, values in (("all", every), ("tenant awake (baseline)", hits), ("tenant asleep: woke it", wakes)):
            if values:
                print(
                    f"time to first token, {label}: n={len(values)}, p50 {quantile(values, 0.5):.2f} s, "
                    f"p99 {quantile(values, 0.99):.2f} s"
                )
        if hits and every:
            print(f"ratio p50 all / p50 awake: {statistics.median(every) / statistics.median(hits):.1f}")
        print(f"the manager counted {counted['wake']} wakes and {counted['evict']} evictions")
    finally:
        stop_manager(server, client, instance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
