"""Gateway vs direct: the proxy's added latency, throughput ratio, streaming time to
first byte and memory, measured in one run on this machine.

    .venv/bin/python -m bench.gateway_bench               # fast upstream (the proxy's own cost)
    .venv/bin/python -m bench.gateway_bench --upstream http://127.0.0.1:18000 --requests 200   # a real engine
    .venv/bin/python -m bench.gateway_bench --image 15     # a chat request carrying a 15 MB PNG (door check)

Both paths (direct and through the gateway) use the same client and the same
upstream in the same run, so the figures are ratios and differences against that
baseline. Targets: <= 1 ms p50 and <= 5 ms p99 added, >= 0.9 of direct throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from manager import keys

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}).encode()
STREAM_BODY = json.dumps(
    {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "stream": True}
).encode()


def image_body(megabytes: float) -> bytes:
    """A chat request with one PNG of ``megabytes`` as a data: URL: a real header the gateway's door
    reads (4000 x 3000) and incompressible bytes after it, as a photo's would be."""
    import base64
    import struct

    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", 4000, 3000)
    raw = header + os.urandom(int(megabytes * 1e6) - len(header))
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is on this photo?"}]
    return json.dumps({"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()


def bench_config(issued: keys.IssuedKey, members: bool) -> dict[str, object]:
    """The config pushed to the gateway: a plain key, or a member's key with limits high enough
    never to refuse, so every request takes the nested decision (member, then tenant)."""
    if not members:
        return {"version": "bench", "keys": [{"id": issued.id, "hash": issued.hash}], "limits": {}}
    high = {"rpm_limit": 10**9, "tokens_per_day": 10**15, "requests_per_month": 10**12, "max_in_flight": 10**6}
    return {
        "version": "bench-members",
        "keys": [{"id": issued.id, "hash": issued.hash, "member": "alice"}],
        "limits": high,
        "members": [{"name": "alice", "limits": high}, {"name": "bob", "limits": high}],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env={**os.environ, **(env or {})}, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sequential(port: int, headers: dict[str, str], n: int, body: bytes, first_byte: bool = False) -> list[float]:
    """Latency of n sequential requests on one kept-alive connection, in ms: to the whole
    response, or (``first_byte``) to its first body byte, as a streaming client sees it."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json", **headers})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        if first_byte:
            resp.read1(1)
        else:
            resp.read()
        out.append((time.perf_counter() - t0) * 1000)
        resp.read()
    conn.close()
    return out


async def throughput(port: int, headers: dict[str, str], seconds: float, concurrency: int) -> float:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=headers, limits=httpx.Limits(max_connections=concurrency)
    ) as client:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                r = await client.post(
                    "/v1/chat/completions", content=BODY, headers={"content-type": "application/json"}
                )
                assert r.status_code == 200
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", help="an OpenAI-compatible server (default: start bench/fast_upstream.py)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=3.0, help="per round and path")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--members",
        action="store_true",
        help="the key belongs to a member with limits of its own inside the tenant's (the nested quota path)",
    )
    parser.add_argument(
        "--image", type=float, metavar="MB", help="requests carry one PNG of MB megabytes (sequential latency only)"
    )
    args = parser.parse_args()

    issued = keys.issue()
    gw_port, admin_port = free_port(), free_port()
    admin_token = keys.issue().secret_key
    with tempfile.TemporaryDirectory() as data:
        up_proc = None
        if args.upstream:
            upstream = args.upstream
        else:
            up_port = free_port()
            upstream = f"http://127.0.0.1:{up_port}"
            up_proc = subprocess.Popen([sys.executable, "-m", "bench.fast_upstream", str(up_port)], cwd=ROOT)
            wait_port(up_port)
        direct_port = int(upstream.rsplit(":", 1)[1])
        env = {
            "GTM_GATEWAY_UPSTREAM": upstream,
            "GTM_GATEWAY_HOST": "127.0.0.1",
            "GTM_GATEWAY_PUBLIC_PORT": str(gw_port),
            "GTM_GATEWAY_ADMIN_PORT": str(admin_port),
            "GTM_GATEWAY_ADMIN_TOKEN": admin_token,
            "GTM_GATEWAY_DATA_DIR": data,
        }
        try:
            with process([sys.executable, "-m", "manager.cli", "gateway"], env) as gw:
                wait_port(gw_port)
                wait_port(admin_port)
                httpx.put(
                    f"http://127.0.0.1:{admin_port}/admin/config",
                    headers={"Authorization": f"Bearer {admin_token}"},
                    json=bench_config(issued, args.members),
                ).raise_for_status()
                auth = {"Authorization": f"Bearer {issued.secret_key}"}
                n = args.requests
                if args.image:
                    return image_report(direct_port, gw_port, auth, args.image, min(n, 30))
                sequential(direct_port, {}, min(50, n), BODY)  # warm-up both paths
                sequential(gw_port, auth, min(50, n), BODY)
                direct = sequential(direct_port, {}, n, BODY)
                via = sequential(gw_port, auth, n, BODY)
                direct_ttfb = sequential(direct_port, {}, min(n, 500), STREAM_BODY, first_byte=True)
                via_ttfb = sequential(gw_port, auth, min(n, 500), STREAM_BODY, first_byte=True)
                # alternate the two paths over several rounds: a 2-core VM's noise hits both alike
                ratios, directs, vias = [], [], []
                for _ in range(args.rounds):
                    directs.append(asyncio.run(throughput(direct_port, {}, args.seconds, args.concurrency)))
                    vias.append(asyncio.run(throughput(gw_port, auth, args.seconds, args.concurrency)))
                    ratios.append(vias[-1] / directs[-1])
                rps_direct, rps_via = statistics.median(directs), statistics.median(vias)
                rss = rss_mib(gw.pid)
        finally:
            if up_proc:
                up_proc.terminate()
                up_proc.wait(timeout=10)
    result = {
        "upstream": "fast (bench/fast_upstream.py)" if not args.upstream else args.upstream,
        "quotas": "member inside tenant (nested)" if args.members else "tenant only, no limits",
        "requests": n,
        "direct_p50_ms": round(pct(direct, 50), 3),
        "gateway_p50_ms": round(pct(via, 50), 3),
        "added_p50_ms": round(pct(via, 50) - pct(direct, 50), 3),
        "direct_p99_ms": round(pct(direct, 99), 3),
        "gateway_p99_ms": round(pct(via, 99), 3),
        "added_p99_ms": round(pct(via, 99) - pct(direct, 99), 3),
        "stream_ttfb_added_p50_ms": round(pct(via_ttfb, 50) - pct(direct_ttfb, 50), 3),
        "direct_rps": round(rps_direct, 1),
        "gateway_rps": round(rps_via, 1),
        "throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "gateway_rss_mib": round(rss, 1),
    }
    targets = {
        "added_p50_ms <= 1": result["added_p50_ms"] <= 1,
        "added_p99_ms <= 5": result["added_p99_ms"] <= 5,
        "throughput_ratio >= 0.9": result["throughput_ratio"] >= 0.9,
    }
    print(json.dumps({**result, "targets_met": targets}, indent=2))
    return 0


def image_report(direct_port: int, gw_port: int, auth: dict[str, str], megabytes: float, n: int) -> int:
    """The gateway's added latency for a request carrying one image: reading a body of megabytes, the
    door's header check and the cache salt, against the same request sent straight to the upstream."""
    body = image_body(megabytes)
    sequential(direct_port, {}, 3, body)
    sequential(gw_port, auth, 3, body)
    direct = sequential(direct_port, {}, n, body)
    via = sequential(gw_port, auth, n, body)
    result = {
        "image_mb": megabytes,
        "body_mb": round(len(body) / 1e6, 1),
        "requests": n,
        "direct_p50_ms": round(statistics.median(direct), 2),
        "gateway_p50_ms": round(statistics.median(via), 2),
        "added_p50_ms": round(statistics.median(via) - statistics.median(direct), 2),
        "ratio_p50": round(statistics.median(via) / statistics.median(direct), 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
