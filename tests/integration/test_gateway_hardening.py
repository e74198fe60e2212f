"""The public port of a real gateway container under abuse: path tricks, deep JSON,
slow clients, header floods, and no outbound network. The gateway runs alone (no
engine behind it): anything it forwarded would come back 503 'engine unavailable', so a
404/400/408/431 of its own proves the request never left it."""

from __future__ import annotations

import base64
import secrets
import struct
import threading
from dataclasses import dataclass, replace
from typing import Any

import docker
import httpx
import pytest

from manager import keys, names
from manager.contract import GatewayConfig
from manager.control.gateway_client import GatewayClient
from manager.control.plan import control_network_name, control_network_plan, tenant_plan
from manager.control.sizing import Sizing
from manager.domain import TenantSpec
from manager.names import Role
from manager.runtime.docker import DockerRuntime
from manager.runtime.types import ContainerPlan
from tests.rawhttp import exchange

from .conftest import free_port, run_probe, wait_for

MIB, GIB = 1024**2, 1024**3


@dataclass
class LoneGateway:
    port: int
    key: str
    container: str
    admin_ip: str
    admin_token: str


STAND_IN_ENGINE = """
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
message = {"role": "assistant", "content": "ok"}
BODY = json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": message}], "usage": usage}).encode()
class Engine(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", 8000), Engine).serve_forever()
"""
"""An engine that answers every chat at once, with usage: requests it answers are metered."""


def start_lone_gateway(
    docker_client: docker.DockerClient,
    settings: Any,
    volume_opts: dict[str, str] | None = None,
    config: dict[str, Any] | None = None,
    engine: bool = False,
    env: dict[str, str] | None = None,
) -> LoneGateway:
    """A gateway container with one key (removed with the test's instance label); no engine, or with
    ``engine`` a stand-in that answers (``STAND_IN_ENGINE``). ``volume_opts``: driver options of its
    data volume (e.g. a small tmpfs); ``config``: more of the config the manager would push (e.g.
    the tenant's body limit); ``env``: more of the gateway's settings (``GTM_GATEWAY_*``)."""
    runtime = DockerRuntime(docker_client)
    spec = TenantSpec(name="hard", port=free_port(), gpu_memory=1536 * MIB, model="demo", max_model_len=512)
    token = secrets.token_urlsafe(32)
    plan = tenant_plan(spec, settings, 24 * GIB, Sizing(settings).fit(spec), gateway_token=token)
    runtime.ensure_network(control_network_plan(settings))
    runtime.ensure_network(plan.network)
    if volume_opts:
        docker_client.volumes.create(
            plan.gateway_volume.name, driver="local", driver_opts=volume_opts, labels=plan.gateway_volume.labels
        )
    runtime.ensure_volume(plan.gateway_volume)
    if engine:
        runtime.run(
            ContainerPlan(
                name=f"{plan.engine.name}-stand-in",
                image=settings.manager_image,
                entrypoint=["python3", "-c", STAND_IN_ENGINE],
                command=[],
                labels=names.labels(settings.instance, Role.PROBE, spec.name),
                network=plan.network.name,
                aliases=[names.ENGINE_ALIAS],
            )
        )
    runtime.run(replace(plan.gateway, env={**plan.gateway.env, **(env or {})}))
    ip = wait_for(
        lambda: runtime.container_ip(plan.gateway.name, control_network_name(settings)), 30, "the gateway's address"
    )
    issued = keys.issue()

    def pushed() -> bool:
        try:
            with GatewayClient(ip, token, timeout=2) as gw:
                gw.push(
                    GatewayConfig.model_validate(
                        {
                            "version": "v1",
                            "keys": [{"id": issued.id, "hash": issued.hash, "expires_at": None}],
                            "limits": {},
                            **(config or {}),
                        }
                    )
                )
            return True
        except Exception:
            return False

    wait_for(pushed, 60, "the gateway's admin port", interval=0.5)
    return LoneGateway(spec.port, issued.secret_key, plan.gateway.name, ip, token)


@pytest.fixture
def gateway(docker_client: docker.DockerClient, manager_settings) -> LoneGateway:
    return start_lone_gateway(docker_client, manager_settings())


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/../../metrics",
        "/v1/models/%2e%2e/%2e%2e/metrics",
        "/v1/models/..%2f..%2fmetrics",
        "/v1/models/../../openapi.json",
        "/v1/models/../../load",
        "/v1/models/%2E%2E/%2E%2E/version",
    ],
)
def test_dot_segments_never_reach_the_engine(gateway: LoneGateway, path: str) -> None:
    """What ``curl --path-as-is`` sends: before the fix these were forwarded (and answered 503 here)."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.key}\r\nConnection: close\r\n\r\n"
    ).encode()
    out, _ = exchange(gateway.port, request)
    assert out.startswith(b"HTTP/1.1 404"), out[:200]
    assert b"is not served on this port" in out


def test_deeply_nested_json_is_400(gateway: LoneGateway) -> None:
    body = b'{"model": "demo", "messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    r = httpx.post(
        f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {gateway.key}", "content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"


def test_header_floods_get_431(gateway: LoneGateway) -> None:
    many = b"".join(b"X-Flood-%d: 1\r\n" % i for i in range(500))
    out, _ = exchange(gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431"), out[:200]
    big = b"X-Big: " + b"a" * 100_000 + b"\r\n"
    out, _ = exchange(gateway.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431"), out[:200]


def test_slow_clients_are_cut_off(docker_client: docker.DockerClient, manager_settings) -> None:
    """100 connections that never finish their headers and one body shorter than its
    Content-Length: every one is answered 408 and closed (10 s and 30 s by default; 3 s and 5 s
    here, through the gateway's own settings, so the test waits less)."""
    gateway = start_lone_gateway(
        docker_client,
        manager_settings(),
        env={"GTM_GATEWAY_HEADER_TIMEOUT_S": "3", "GTM_GATEWAY_BODY_IDLE_TIMEOUT_S": "5"},
    )
    results: list[tuple[bytes, float]] = []
    lock = threading.Lock()

    def slow(data: bytes) -> None:
        out = exchange(gateway.port, data, timeout=60)
        with lock:
            results.append(out)

    half = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
    short = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gateway.key}\r\n"
        'Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"model"'
    ).encode()
    threads = [threading.Thread(target=slow, args=(half,)) for _ in range(100)]
    threads.append(threading.Thread(target=slow, args=(short,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 101
    statuses = sorted(out.split(b"\r\n", 1)[0] for out, _ in results)
    assert statuses == [b"HTTP/1.1 408 Request Timeout"] * 101, set(statuses)
    header_waits = sorted(elapsed for out, elapsed in results if b"headers did not arrive" in out)
    assert len(header_waits) == 100 and header_waits[-1] < 10
    assert any(b"within 3 s" in out for out, _ in results)
    # the port still serves (the gateway waits up to its 5 s connect timeout for the missing engine:
    # the client waits longer than that)
    r = httpx.get(
        f"http://127.0.0.1:{gateway.port}/v1/models", headers={"Authorization": f"Bearer {gateway.key}"}, timeout=30
    )
    assert r.status_code == 503  # no engine behind this gateway: forwarded, and said so


def test_gateways_have_no_outbound_network(
    gateway: LoneGateway, docker_client: docker.DockerClient, instance: str
) -> None:
    code = """
import socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=5).close()
    print("reachable")
except OSError as exc:
    print("blocked", exc)
"""
    # the same probe on a plain bridge shows whether this host has an outside route at all
    net = docker_client.networks.create(
        f"{instance}-plain", labels={"org.gtm.managed": "true", "org.gtm.instance": instance}
    )
    try:
        baseline = run_probe(docker_client, instance, net.name, code)
    finally:
        net.remove()
    if "reachable" not in baseline:
        pytest.skip(f"no outbound route from containers on this host at all ({baseline.strip()})")
    result = docker_client.containers.get(gateway.container).exec_run(["python3", "-c", code])
    assert b"blocked" in result.output, result.output


def test_a_full_usage_volume_refuses_requests_and_loses_no_record(
    docker_client: docker.DockerClient, manager_settings
) -> None:
    """The gateway's volume fills up (here a 4 MiB tmpfs): requests are refused with 503
    rather than served unmetered; once space is back, every record is there, none twice."""
    gw = start_lone_gateway(
        docker_client,
        manager_settings(),
        {"type": "tmpfs", "device": "tmpfs", "o": "size=4m,uid=1000,gid=1000"},
        engine=True,
    )
    container = docker_client.containers.get(gw.container)
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {gw.key}"}
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def send() -> str:
        answer = httpx.post(url, json=body, headers=headers, timeout=30)
        return "served" if answer.status_code == 200 else str(answer.json()["error"]["code"])

    wait_for(lambda: send() == "served", 30, "the stand-in engine to answer", interval=0.5)
    forwarded = [send() for _ in range(3)]  # answered by the engine: served and recorded
    assert forwarded == ["served"] * 3
    container.exec_run(["sh", "-c", "cat /dev/zero > /data/filler"])
    codes = []
    for _ in range(50):
        codes.append(send())
        if codes[-1] == "usage_spool_full":
            break
    assert codes[-1] == "usage_spool_full", codes
    served_while_full = codes.count("served")
    container.exec_run(["rm", "-f", "/data/filler"])
    assert send() == "served"  # writable again: served, and the kept record written first
    with GatewayClient(gw.admin_ip, gw.admin_token) as admin:
        records = admin.usage(0).records
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids)) == 1 + 3 + served_while_full + 1  # the first answer waited for, too


def test_an_image_sized_body_passes_up_to_the_tenants_limit(
    docker_client: docker.DockerClient, manager_settings
) -> None:
    """A 15 MB image as a data: URL reaches the engine (here: none, so 503 engine_unavailable);
    over the tenant's 20 MiB limit the gateway answers 413 and names the limit."""
    gw = start_lone_gateway(docker_client, manager_settings(), config={"max_body": 20 * 1024 * 1024})
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {gw.key}"}

    def ask(image_bytes: int) -> httpx.Response:
        # a PNG header the door reads (640 x 480), then the bulk of a large image
        raw = b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sII", 13, b"IHDR", 640, 480) + bytes(image_bytes - 24)
        image = "data:image/png;base64," + base64.b64encode(raw).decode()
        content = [
            {"type": "text", "text": "what is on this photo?"},
            {"type": "image_url", "image_url": {"url": image}},
        ]
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 16}
        return httpx.post(url, json=body, headers=headers, timeout=60)

    forwarded = ask(11_000_000)  # about 15 MB as base64
    assert forwarded.status_code == 503 and forwarded.json()["error"]["code"] == "engine_unavailable"
    refused = ask(19_000_000)  # about 25 MB as base64
    assert refused.status_code == 413
    assert "20.0 MiB" in refused.json()["error"]["message"]
