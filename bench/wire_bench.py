"""The gateway at wire speed: wrk drives the load (it needs almost no CPU), the proxy under test
is pinned alone on one core, and wrk and the upstream share the other.

    .venv/bin/python -m bench.wire_bench            # scripts/bench.sh --wire

Reported in one run, for each path:
- direct: wrk to the upstream (nginx returning a fixed chat answer);
- nginx: nginx proxying to it (keep-alive pool): what a C proxy costs;
- passthrough: ``bench/passthrough.py``, the least a Python proxy on the gateway's own stack
  (uvicorn, httptools, uvloop, httpx's transport) does;
- gateway: the product's gateway, a member's key with nested quotas, durable metering on;

requests/s at 32 connections, the proxy's CPU per request (its process's user + system time over
the requests it served), added p50/p99 latency at one connection, and for a streamed answer of 64
chunks (bench/fast_upstream.py) the added time to first byte and the proxy's CPU per chunk, the
chunks sent back to back and paced 2 ms apart. It
checks that the gateway metered every request exactly once (its spool against wrk's count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.fast_upstream import ANSWER
from bench.gateway_bench import bench_config, free_port, wait_port
from bench.passthrough import CLIENTS
from manager import keys

ROOT = Path(__file__).resolve().parents[1]
PROXY_CORE, LOAD_CORE = "1", "0"
CONNECTIONS = 32
STREAM_CHUNKS = 64
GATEWAY_CLIENT = "lean"
"""The forwarding client the gateway uses (``manager.gateway.proxy``)."""
BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
STREAM_BODY = json.dumps(
    {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 64, "stream": True}
)
PACE_MS = 2
PACED_BODY = json.dumps({**json.loads(STREAM_BODY), "bench_pace_ms": PACE_MS})
"""The same stream with a chunk every 2 ms, as an engine generates: chunks never arrive together,
so nothing is coalesced and each costs the proxy its whole round (read, parse, meter, send)."""
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of a process (0 for none: the direct path has no proxy)."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class Run:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float


def wrk(url: str, body: str, headers: dict[str, str], connections: int, seconds: float) -> Run:
    """One wrk run on the load core, with ``body`` POSTed; its latency percentiles and count."""
    script = "wrk.method = 'POST'\nwrk.body = " + json.dumps(body) + "\n"
    script += "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    try:
        out = subprocess.run(
            [
                "taskset",
                "-c",
                LOAD_CORE,
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                fh.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(fh.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors from {url}:\n{out}")
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(name: str) -> float:
        value, unit = re.search(rf"^\s+{name}%\s+([\d.]+)(us|ms|s)", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return Run(count, rps, pct("50"), pct("99"))


@contextmanager
def pinned(core: str, args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["taskset", "-c", core, *args], env={**os.environ, **(env or {})}, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx-{name}.pid;
error_log {dir}/error-{name}.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body-{name};
  proxy_temp_path {dir}/proxy-{name};
  fastcgi_temp_path {dir}/fcgi-{name};
  uwsgi_temp_path {dir}/uwsgi-{name};
  scgi_temp_path {dir}/scgi-{name};
  keepalive_requests 1000000;
  {body}
}}
"""

UPSTREAM_SERVER = """
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{answer}'; }}
  }}
"""

PROXY_SERVER = """
  upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
"""


def nginx(directory: Path, name: str, body: str) -> list[str]:
    conf = directory / f"nginx-{name}.conf"
    conf.write_text(NGINX.format(dir=directory, name=name, body=body))
    return [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(directory)]


def worker_pid(master: int) -> int:
    """nginx's one worker (the process that does the work), or the process itself."""
    children = Path(f"/proc/{master}/task/{master}/children")
    for _ in range(50):
        pids = children.read_text().split() if children.exists() else []
        if pids:
            return int(pids[0])
        time.sleep(0.1)
    return master


def measure(
    label: str, port: int, pid: int, headers: dict[str, str], seconds: float, results: dict[str, dict[str, float]]
) -> None:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    warm = wrk(url, BODY, headers, CONNECTIONS, 1)  # warm-up: pools, caches, the allocator
    before = cpu_seconds(pid)
    loaded = wrk(url, BODY, headers, CONNECTIONS, seconds)
    used = cpu_seconds(pid) - before
    quiet = wrk(url, BODY, headers, 1, seconds)
    results[label] = {
        "rps": round(loaded.rps),
        "cpu_us_per_request": round(used / loaded.requests * 1e6, 1) if pid else 0.0,
        "p50_ms_at_1_connection": round(quiet.p50_ms, 3),
        "p99_ms_at_1_connection": round(quiet.p99_ms, 3),
        "requests": warm.requests + loaded.requests + quiet.requests,
    }


def stream_cost(port: int, pid: int, headers: dict[str, str], seconds: float) -> dict[str, float]:
    """A streamed answer of ``STREAM_CHUNKS`` chunks against a plain answer, both at 4 connections
    from the same upstream: the proxy's CPU per chunk is the difference over the chunks; sent back
    to back (chunks may arrive together) and paced at ``PACE_MS`` (each arrives alone)."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    counts = 0
    cpu: dict[str, float] = {}
    for name, body in (("plain", BODY), ("stream", STREAM_BODY), ("paced", PACED_BODY)):
        counts += wrk(url, body, headers, 4, 1).requests
        before = cpu_seconds(pid)
        loaded = wrk(url, body, headers, 4, seconds)
        cpu[name] = (cpu_seconds(pid) - before) / loaded.requests * 1e6 if pid else 0.0
        counts += loaded.requests
    quiet = wrk(url, STREAM_BODY, headers, 1, seconds)
    return {
        "cpu_us_per_chunk": round((cpu["stream"] - cpu["plain"]) / STREAM_CHUNKS, 2),
        "cpu_us_per_chunk_paced": round((cpu["paced"] - cpu["plain"]) / STREAM_CHUNKS, 2),
        "cpu_us_per_stream": round(cpu["stream"], 1),
        "p50_ms": quiet.p50_ms,
        "requests": counts + quiet.requests,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("nginx"):
        print("needs wrk and nginx (Debian: apt-get install wrk nginx-light)", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("needs two cores: one for the proxy, one for wrk and the upstream", file=sys.stderr)
        return 2
    issued = keys.issue()
    auth = {"Authorization": f"Bearer {issued.secret_key}", "Content-Type": "application/json"}
    plain = {"Content-Type": "application/json"}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up_port, nginx_port, gw_port, admin_port = (free_port() for _ in range(4))
        stream_port, stream_gw_port, stream_admin = (free_port() for _ in range(3))
        pass_ports = {client: (free_port(), free_port()) for client in CLIENTS}
        answer = ANSWER.decode().replace("'", "\\'")
        upstream = nginx(work, "upstream", UPSTREAM_SERVER.format(port=up_port, answer=answer))
        proxy = nginx(work, "proxy", PROXY_SERVER.format(port=nginx_port, upstream=up_port))
        admin_token = keys.issue().secret_key

        def gateway_env(upstream_url: str, public: int, admin: int, data: str) -> dict[str, str]:
            return {
                "GTM_GATEWAY_UPSTREAM": upstream_url,
                "GTM_GATEWAY_HOST": "127.0.0.1",
                "GTM_GATEWAY_PUBLIC_PORT": str(public),
                "GTM_GATEWAY_ADMIN_PORT": str(admin),
                "GTM_GATEWAY_ADMIN_TOKEN": admin_token,
                "GTM_GATEWAY_DATA_DIR": data,
            }

        def configure(admin: int) -> None:
            httpx.put(
                f"http://127.0.0.1:{admin}/admin/config",
                headers={"Authorization": f"Bearer {admin_token}"},
                json=bench_config(issued, members=True),
            ).raise_for_status()

        data, stream_data = work / "gw", work / "gw-stream"
        data.mkdir()
        stream_data.mkdir()
        py = sys.executable
        up_url = f"http://127.0.0.1:{up_port}"
        stream_url = f"http://127.0.0.1:{stream_port}"
        streams: dict[str, dict[str, float]] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(pinned(LOAD_CORE, upstream))
            chunks = {"BENCH_STREAM_CHUNKS": str(STREAM_CHUNKS)}
            stack.enter_context(pinned(LOAD_CORE, [py, "-m", "bench.fast_upstream", str(stream_port)], chunks))
            ngx = stack.enter_context(pinned(PROXY_CORE, proxy))
            gw = stack.enter_context(
                pinned(
                    PROXY_CORE,
                    [py, "-m", "manager.cli", "gateway"],
                    gateway_env(up_url, gw_port, admin_port, str(data)),
                )
            )
            stream_gw = stack.enter_context(
                pinned(
                    PROXY_CORE,
                    [py, "-m", "manager.cli", "gateway"],
                    gateway_env(stream_url, stream_gw_port, stream_admin, str(stream_data)),
                )
            )
            passes = {
                client: (
                    stack.enter_context(pinned(PROXY_CORE, [py, "-m", "bench.passthrough", str(a), up_url, client])),
                    stack.enter_context(
                        pinned(PROXY_CORE, [py, "-m", "bench.passthrough", str(b), stream_url, client])
                    ),
                )
                for client, (a, b) in pass_ports.items()
            }
            for port in (up_port, nginx_port, gw_port, admin_port, stream_port, stream_gw_port, stream_admin):
                wait_port(port)
            for a, b in pass_ports.values():
                wait_port(a)
                wait_port(b)
            configure(admin_port)
            configure(stream_admin)
            measure("direct", up_port, 0, plain, args.seconds, results)
            measure("nginx", nginx_port, worker_pid(ngx.pid), plain, args.seconds, results)
            for client, (a, _) in pass_ports.items():
                measure(f"passthrough/{client}", a, passes[client][0].pid, plain, args.seconds, results)
            measure("gateway", gw_port, gw.pid, auth, args.seconds, results)
            streams["direct"] = stream_cost(stream_port, 0, plain, args.seconds)
            for client, (_, b) in pass_ports.items():
                streams[f"passthrough/{client}"] = stream_cost(b, passes[client][1].pid, plain, args.seconds)
            streams["gateway"] = stream_cost(stream_gw_port, stream_gw.pid, auth, args.seconds)
        metered = sqlite3.connect(data / "gateway.db").execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        stream_metered = sqlite3.connect(stream_data / "gateway.db").execute("SELECT COUNT(*) FROM usage").fetchone()[0]

    # wrk does not count the requests in flight when it stops (at most its connections per run);
    # the gateway meters each of them once too
    served, stream_served = results["gateway"]["requests"], streams["gateway"]["requests"]
    exact = served <= metered <= served + 3 * CONNECTIONS and stream_served <= stream_metered <= stream_served + 7 * 4
    gw, pt = results["gateway"], results[f"passthrough/{GATEWAY_CLIENT}"]
    direct_p50 = results["direct"]["p50_ms_at_1_connection"]
    report = {
        "load": f"wrk, 1 thread, {CONNECTIONS} connections, {args.seconds:.0f} s; proxy alone on core {PROXY_CORE}",
        "paths": results,
        "gateway_vs_passthrough_on_its_client_rps": round(gw["rps"] / pt["rps"], 3),
        "gateway_added_p50_ms": round(gw["p50_ms_at_1_connection"] - direct_p50, 3),
        "gateway_added_p99_ms": round(gw["p99_ms_at_1_connection"] - results["direct"]["p99_ms_at_1_connection"], 3),
        "stream_64_chunks": {
            name: {
                "p50_ms": round(v["p50_ms"], 3),
                "added_p50_ms": round(v["p50_ms"] - streams["direct"]["p50_ms"], 3),
                "cpu_us_per_chunk": v["cpu_us_per_chunk"],
                f"cpu_us_per_chunk_at_{PACE_MS}_ms_pacing": v["cpu_us_per_chunk_paced"],
            }
            for name, v in streams.items()
        },
        "metered": {
            "gateway_records": metered,
            "wrk_answers": served,
            "stream_records": stream_metered,
            "wrk_stream_answers": stream_served,
        },
    }
    per_chunk = max(streams["gateway"]["cpu_us_per_chunk"], streams["gateway"]["cpu_us_per_chunk_paced"])
    targets = {
        "gateway rps >= 4000": gw["rps"] >= 4000,
        "gateway >= 0.4 of passthrough on its client": report["gateway_vs_passthrough_on_its_client_rps"] >= 0.4,
        "added p50 <= 0.3 ms": report["gateway_added_p50_ms"] <= 0.3,
        "stream <= 20 us per chunk (back to back and paced)": per_chunk <= 20,
        "every answer metered once": exact,
    }
    print(json.dumps({**report, "targets_met": targets}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
