"""Waking a sleeping tenant against starting a new one, in the same run.

    .venv/bin/python -m bench.sleep_bench --rounds 3

One run, one machine: a manager (in-process, real Docker, real vLLM CPU engines). Each round:

- the baseline: ``add-tenant`` of a new tenant, timed to its first answer, then removed;
- the wake: a tenant with ``--idle-sleep 5s`` is left idle until it is asleep (its engine
  removed), then one chat request is timed from when it was sent to its answer (the gateway
  holds it while the engine starts again).

Figures: each time, their medians and the ratio wake / cold start. In cpu mode a wake is a cold
start of the engine behind a gateway that is already up, so the ratio is about 1: what a sleeping
tenant's first client waits.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from pathlib import Path

import docker
import httpx

from bench.engine_starts import CHAT, bench_settings, first_answer, free_port, serve_manager, stop_manager


def wait_status(api: httpx.Client, name: str, status: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.get(f"/api/v1/tenants/{name}").json()["status"] == status:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} not {status} after {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path("/var/cache/gpu-tenant-manager/models"))
    args = parser.parse_args()
    client = docker.from_env()
    instance = "gtmbench" + secrets.token_hex(3)
    server, api = serve_manager(bench_settings(instance, args.models))
    cold: list[float] = []
    wakes: list[float] = []
    try:
        port = free_port()
        r = api.post("/api/v1/tenants", json={"name": "napper", "gpu_memory": "1536M", "port": port, "idle_sleep_s": 5})
        r.raise_for_status()
        headers = {"Authorization": f"Bearer {r.json()['key']['api_key']}"}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        first_answer(url, headers, time.monotonic() + 300)
        for i in range(args.rounds):
            cold_port = free_port()
            t0 = time.monotonic()
            made = api.post("/api/v1/tenants", json={"name": f"cold{i}", "gpu_memory": "1536M", "port": cold_port})
            made.raise_for_status()
            key = {"Authorization": f"Bearer {made.json()['key']['api_key']}"}
            cold.append(first_answer(f"http://127.0.0.1:{cold_port}/v1/chat/completions", key, t0 + 300) - t0)
            api.delete(f"/api/v1/tenants/cold{i}").raise_for_status()
            wait_status(api, "napper", "asleep")
            while any(c.name.endswith("napper-engine") for c in client.containers.list(all=True)):
                time.sleep(0.2)  # asleep: its engine is removed
            t0 = time.monotonic()
            answer = httpx.post(url, json=CHAT, headers=headers, timeout=300)
            wakes.append(time.monotonic() - t0)
            assert answer.status_code == 200, answer.text
            print(
                f"round {i + 1}: cold add-tenant -> first answer {cold[-1]:.1f} s, wake {wakes[-1]:.1f} s", flush=True
            )
        row = api.get("/api/v1/tenants/napper").json()
        print(
            f"napper: {row['sleeps']} sleeps, {row['wakes']} wakes, "
            f"last wake (the manager's count) {row['last_wake_s']:.1f} s"
        )
        c, w = statistics.median(cold), statistics.median(wakes)
        print(f"median cold start {c:.1f} s (the baseline), median wake {w:.1f} s, ratio wake/cold {w / c:.2f}")
    finally:
        stop_manager(server, client, instance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
