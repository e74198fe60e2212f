"""Twenty clients on the least reservation that runs twenty sequences at once: the engine's peak
stays inside its reservation (no OOM kill), and every request is answered. Used by
``test_faults.test_twenty_clients_then_the_engine_killed_mid_stream`` (one engine for both).

The load runs ``GTM_LOAD_S`` seconds (20 by default: the engine's memory reaches its plateau
within the first 15 s of load); ``GTM_LOAD_S=180`` is the three-minute run."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import docker
import httpx

from manager import names

CLIENTS = 20
LOAD_S = float(os.environ.get("GTM_LOAD_S", "20"))


def cgroup_file(container_id: str, v1: str, v2: str) -> Path | None:
    """The container's memory cgroup file (cgroup v1 with the cgroupfs driver, or v2)."""
    for path in (
        Path(f"/sys/fs/cgroup/memory/docker/{container_id}/{v1}"),
        Path(f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/{v2}"),
        Path(f"/sys/fs/cgroup/docker/{container_id}/{v2}"),
    ):
        if path.exists():
            return path
    return None


def oom_kills(container_id: str) -> int | None:
    """The kernel's count of OOM kills in the container's cgroup (None where it cannot be read)."""
    path = cgroup_file(container_id, "memory.oom_control", "memory.events")
    if path is None:
        return None
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


def client_loop(key: str, port: int, until: float, outcomes: Counter[str], lock: threading.Lock) -> None:
    """One client: a plain chat, a whole stream, and a stream it abandons after two chunks, in turn."""
    headers = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    turn = 0
    with httpx.Client(timeout=120, headers=headers) as http:
        while time.monotonic() < until:
            kind = ("plain", "stream", "abandoned")[turn % 3]
            turn += 1
            body = {
                "model": "demo",
                "messages": [{"role": "user", "content": f"client load {turn}: tell me a story"}],
                "max_tokens": 24,
                "stream": kind != "plain",
            }
            try:
                if kind == "plain":
                    r = http.post(url, json=body)
                    outcome = f"{kind} {r.status_code}"
                else:
                    with http.stream("POST", url, json=body) as r:
                        chunks = 0
                        for line in r.iter_lines():
                            if line.startswith("data: "):
                                chunks += 1
                                if kind == "abandoned" and chunks == 2:
                                    break
                        outcome = f"{kind} {r.status_code}"
            except httpx.HTTPError as exc:
                outcome = f"{kind} {type(exc).__name__}"
            with lock:
                outcomes[outcome] += 1


def create_at_least_for_twenty(api: httpx.Client, name: str, port: int) -> str:
    """Creates the tenant at the least reservation that holds twenty sequences (admission's refusal
    says it) without --max-num-seqs: that reservation buys the same twenty. Its key."""
    body = {"name": name, "port": port, "max_num_seqs": CLIENTS, "max_model_len": 512}
    refused = api.post("/api/v1/tenants", json={**body, "gpu_memory": "1G"})
    assert refused.status_code == 409, refused.text
    least = refused.json()["error"]["details"]["numbers"]["model_minimum"]
    r = api.post("/api/v1/tenants", json={**body, "max_num_seqs": None, "gpu_memory": least})
    assert r.status_code == 201, r.text
    assert r.json()["tenant"]["concurrency"] == CLIENTS, r.json()["tenant"]
    return str(r.json()["key"]["api_key"])


def twenty_clients(
    api: httpx.Client, docker_client: docker.DockerClient, instance: str, name: str, port: int, key: str
) -> None:
    """Twenty clients for ``LOAD_S`` on the running tenant; its engine must never be OOM-killed."""
    engine = docker_client.containers.get(names.engine(instance, name))
    command = engine.attrs["Config"]["Cmd"]
    assert command[command.index("--max-num-seqs") + 1] == str(CLIENTS)
    limit = engine.attrs["HostConfig"]["Memory"]
    kills_before = oom_kills(engine.id)

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    until = time.monotonic() + LOAD_S
    threads = [threading.Thread(target=client_loop, args=(key, port, until, outcomes, lock)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LOAD_S + 180)

    engine.reload()
    peak_file = cgroup_file(engine.id, "memory.max_usage_in_bytes", "memory.peak")
    peak = int(peak_file.read_text()) if peak_file else None
    print(f"{sum(outcomes.values())} requests in {LOAD_S:.0f} s: {dict(outcomes)}; cgroup peak {peak} of {limit}")
    assert engine.attrs["State"]["Running"] and not engine.attrs["State"]["OOMKilled"], engine.attrs["State"]
    assert engine.attrs["RestartCount"] == 0
    assert docker_client.containers.get(names.engine(instance, name)).id == engine.id, "the engine was replaced"
    if kills_before is not None:
        assert oom_kills(engine.id) == kills_before, "the kernel OOM-killed a process in the engine"
    failed = {k: v for k, v in outcomes.items() if not k.endswith(" 200")}
    assert not failed, outcomes
    assert sum(outcomes.values()) >= CLIENTS * 3, outcomes
    assert api.get(f"/api/v1/tenants/{name}").json()["status"] == "running"
