"""A soak of one tenant under mixed load and four faults, on the stack ``scripts/up.sh`` runs.

    .venv/bin/python -m bench.soak --minutes 10

One tenant with five members; four workers per member send plain chats, whole streams and
streams abandoned after their second chunk. Spread over the run: a manager restart, a gateway
SIGKILL, an engine SIGKILL and a dockerd restart. Every answer's ``x-request-id`` is kept, and
at the end every client request is reconciled with the usage records the manager collected:
lost (answered 200 or streamed, without a record), doubled, invented (a record no client
request names) and token mismatches on completed requests. It prints the outage each fault
caused (from the fault until the next answered request) and whether the engine was OOM-killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TENANT, PORT, MEMBERS, WORKERS = "soak", 30090, 5, 4
WORDS = [
    "the",
    "a",
    "model",
    "tenant",
    "engine",
    "quota",
    "stream",
    "token",
    "gateway",
    "answer",
    "story",
]


@dataclass
class Seen:
    """What one client request saw."""

    kind: str
    status: int | None = None
    request_id: str | None = None
    completed: bool = False
    usage: tuple[int, int] | None = None


@dataclass
class Run:
    seen: list[Seen] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)  # monotonic times of answered requests


def sh(*args: str, check: bool = True) -> str:
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def manager(*args: str, check: bool = True) -> str:
    return sh("docker", "exec", "manager", *args, check=check)


def setup() -> list[str]:
    """A fresh tenant and its members; their keys (the tenant's first member's first)."""
    manager("remove-tenant", "--name", TENANT, check=False)
    created = json.loads(
        manager("add-tenant", "--name", TENANT, "--gpu-memory", "1536M", "--port", str(PORT), "--wait", "--json")
    )
    keys = [created["key"]["api_key"]]
    for i in range(1, MEMBERS):
        added = json.loads(manager("add-member", "--tenant", TENANT, "--name", f"m{i}", "--json"))
        keys.append(added["key"]["api_key"])
    return keys


async def worker(client: httpx.AsyncClient, key: str, until: float, run: Run) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < until:
        kind = random.choice(("plain", "stream", "abandon"))
        body: dict[str, object] = {
            "model": "demo",
            "messages": [{"role": "user", "content": " ".join(random.choices(WORDS, k=random.randint(3, 30)))}],
            "max_tokens": random.randint(8, 64),
        }
        seen = Seen(kind)
        run.seen.append(seen)
        try:
            if kind == "plain":
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                seen.status, seen.request_id = r.status_code, r.headers.get("x-request-id")
                if r.status_code == 200:
                    usage = r.json()["usage"]
                    seen.usage, seen.completed = (usage["prompt_tokens"], usage["completion_tokens"]), True
            else:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                    seen.status, seen.request_id = r.status_code, r.headers.get("x-request-id")
                    chunks = 0
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            seen.completed = line == "data: [DONE]" and kind == "stream"
                            continue
                        chunks += 1
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            seen.usage = (event["usage"]["prompt_tokens"], event["usage"]["completion_tokens"])
                        if kind == "abandon" and chunks == 2:
                            break
            if seen.status == 200:
                run.answered_at.append(time.monotonic())
            else:
                await asyncio.sleep(0.5)
        except (httpx.HTTPError, ValueError, KeyError):
            await asyncio.sleep(0.5)


def restart_dockerd() -> None:
    sh("pkill", "-TERM", "-x", "dockerd")
    for _ in range(120):
        if subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, check=False).returncode != 0:
            break
        time.sleep(0.5)
    sh("bash", str(ROOT / "scripts" / "bootstrap-host.sh"))


FAULTS = {
    "manager restart": lambda: sh("docker", "restart", "manager"),
    "gateway SIGKILL": lambda: sh("docker", "kill", "-s", "KILL", f"gtm-t-{TENANT}-gateway"),
    "engine SIGKILL": lambda: sh("docker", "kill", "-s", "KILL", f"gtm-t-{TENANT}-engine"),
    "dockerd restart": restart_dockerd,
}


async def faults(seconds: float, run: Run, outages: dict[str, float | None]) -> None:
    step = seconds / (len(FAULTS) + 1)
    for name, fault in FAULTS.items():
        await asyncio.sleep(step)
        at = time.monotonic()
        await asyncio.to_thread(fault)
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        outages[name] = at  # replaced by the outage once a request is answered after it
    await asyncio.sleep(step)


def outage_after(at: float, until: float, answered: list[float]) -> float | None:
    """The longest time without an answered request between a fault and ``until`` (the next fault
    or the end of the load); None when nothing was answered after the fault."""
    times = sorted(t for t in answered if at < t <= until)
    if not times:
        return None
    return max(b - a for a, b in zip([at, *times], times, strict=False))


RECORDS_CODE = """
import json, sqlite3, sys
db = sqlite3.connect("/var/lib/gtm/manager.db")
rows = db.execute(
    "SELECT request_id, outcome, prompt_tokens, completion_tokens FROM usage WHERE tenant = ? AND at >= ?",
    (sys.argv[1], float(sys.argv[2])),
)
print(json.dumps(list(rows)))
"""


def records(since: float) -> dict[str, list[tuple[str, int, int]]]:
    """Every usage record of the tenant the manager holds from ``since`` on, by request id (the
    records of an earlier soak's tenant of the same name stay, for cost sharing)."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    rows = json.loads(manager("python3", "-c", RECORDS_CODE, TENANT, str(since)))
    for request_id, outcome, prompt, completion in rows:
        out.setdefault(request_id, []).append((outcome, prompt, completion))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    args = parser.parse_args()
    seconds = args.minutes * 60
    since = time.time()
    keys = setup()
    run = Run()
    outages: dict[str, float | None] = {}

    async def drive() -> None:
        until = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=MEMBERS * WORKERS * 2)
        timeout = httpx.Timeout(60.0, connect=5.0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=timeout, limits=limits) as client:
            await asyncio.gather(
                faults(seconds, run, outages),
                *(worker(client, key, until, run) for key in keys for _ in range(WORKERS)),
            )

    started = time.time()
    asyncio.run(drive())
    load_end = time.monotonic()
    print(f"load ended after {time.time() - started:.0f} s; waiting for the usage to be collected", flush=True)
    manager("wait-tenant", "--name", TENANT, "--timeout", "300", check=False)
    stable, last = 0, -1
    while stable < 3:  # the manager collects every few seconds: three equal counts in a row
        time.sleep(5)
        count = sum(len(v) for v in records(since).values())
        stable, last = (stable + 1, last) if count == last else (0, count)
    got = records(since)
    ids = {s.request_id for s in run.seen if s.request_id}
    served = [s for s in run.seen if s.status == 200 and s.request_id]
    lost = [s for s in served if s.request_id not in got]
    doubled = [rid for rid, rows in got.items() if len(rows) > 1]
    # a record no client saw the id of: invented, unless the gateway died before its answer's headers
    # went out (then it is interrupted, and the client saw a connection error)
    invented = [rid for rid, rows in got.items() if rid not in ids and rows[0][0] != "interrupted"]
    unanswered = [rid for rid, rows in got.items() if rid not in ids and rows[0][0] == "interrupted"]
    mismatched = [
        s for s in served if s.completed and s.usage and s.request_id in got and got[s.request_id][0][1:] != s.usage
    ]
    oom = sh("docker", "inspect", "-f", "{{.State.OOMKilled}}", f"gtm-t-{TENANT}-engine", check=False).strip()
    outcomes: dict[str, int] = {}
    for rows in got.values():
        outcomes[rows[0][0]] = outcomes.get(rows[0][0], 0) + 1
    statuses: dict[str, int] = {}
    for s in run.seen:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    print(f"client requests: {len(run.seen)} ({json.dumps(statuses)}); records: {len(got)} ({json.dumps(outcomes)})")
    print(f"lost {len(lost)}, doubled {len(doubled)}, invented {len(invented)}, token mismatches {len(mismatched)}")
    print(f"interrupted before the client saw an answer: {len(unanswered)}")
    for s in (lost + mismatched)[:5]:
        print("  e.g.", s, got.get(s.request_id or ""))
    starts = [at for at in outages.values() if at is not None] + [load_end]
    for (name, at), until in zip(outages.items(), starts[1:], strict=False):
        gap = outage_after(at, until, run.answered_at) if at is not None else None
        print(f"outage after {name}: " + (f"{gap:.1f} s" if gap is not None else "no answer after it"))
    print(f"engine OOM-killed: {oom}")
    manager("remove-tenant", "--name", TENANT, check=False)
    return 0 if not (lost or doubled or invented or mismatched) and oom != "true" else 1


if __name__ == "__main__":
    sys.exit(main())
