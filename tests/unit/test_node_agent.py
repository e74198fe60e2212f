"""The node agent: what its report holds (built from the real host-memory inventory and the
in-memory runtime), and what its server answers whom. On a real swarm, one agent per node:
tests/integration/test_swarm.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from manager import names
from manager.agent.report import SERVICE_LABEL, node_report
from manager.agent.server import make_server
from manager.gpu.cpu import HostMemoryInventory
from manager.names import Role
from manager.node_report import REPORT_PATH, NodeReport
from manager.runtime.memory import MemoryRuntime
from manager.runtime.types import ContainerPlan

MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n"


def container(name: str, instance: str, **labels: str) -> ContainerPlan:
    return ContainerPlan(
        name=name,
        image="gtm-manager:dev",
        command=["gateway"],
        labels={**names.labels(instance, Role.GATEWAY, "acme"), **labels},
        network="none",
    )


def test_the_report_holds_the_nodes_memory_and_the_instances_running_containers(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    runtime = MemoryRuntime()
    runtime.run(container("gtm-t-acme-gateway.1.x7q", "gtm", **{SERVICE_LABEL: "gtm-t-acme-gateway"}))
    runtime.set_pids("gtm-t-acme-gateway.1.x7q", {4242, 17})
    runtime.run(container("gtm-t-solo-gateway", "gtm"))  # a container outside a swarm: its own name
    runtime.run(container("other-t-acme-gateway", "other"))  # another instance's: not reported
    runtime.run(container("gtm-t-gone-gateway", "gtm"))
    runtime.stop_container("gtm-t-gone-gateway")  # not running: not reported

    report = node_report("n1id", "gpu-host-1", "gtm", HostMemoryInventory(meminfo), runtime, clock=lambda: 99.0)

    assert (report.node_id, report.hostname, report.at) == ("n1id", "gpu-host-1", 99.0)
    (device,) = report.devices
    assert (device.kind, device.total, device.free) == ("host-memory", 16000000 * 1024, 12000000 * 1024)
    assert device.used == device.total - device.free and report.processes == []
    by_name = {c.name: c for c in report.containers}
    assert set(by_name) == {"gtm-t-acme-gateway", "gtm-t-solo-gateway"}
    assert by_name["gtm-t-acme-gateway"].pids == [17, 4242]
    assert by_name["gtm-t-acme-gateway"].memory is None  # the in-memory runtime measures nothing: unknown, not 0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, list[bool]]]:
    """An agent on a loopback port; ``failing[0] = True`` makes its next reports fail."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    failing = [False]

    def report() -> NodeReport:
        if failing[0]:
            raise RuntimeError("dockerd went away")
        return node_report("n1id", "gpu-host-1", "gtm", HostMemoryInventory(meminfo), MemoryRuntime())

    server = make_server("127.0.0.1", 0, "agent-token", report)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", failing
    finally:
        server.shutdown()
        server.server_close()


def test_the_agent_answers_its_report_only_to_its_token_and_survives_a_failed_read(
    agent: tuple[str, list[bool]],
) -> None:
    url, failing = agent
    good = {"Authorization": "Bearer agent-token"}
    assert httpx.get(url + REPORT_PATH).status_code == 401
    assert httpx.get(url + REPORT_PATH, headers={"Authorization": "Bearer agent-token2"}).status_code == 401
    assert httpx.get(url + "/v1/other", headers=good).status_code == 404
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}  # its health check needs no token
    answer = httpx.get(url + REPORT_PATH, headers=good)
    assert answer.status_code == 200
    assert NodeReport.model_validate_json(answer.content).hostname == "gpu-host-1"
    failing[0] = True
    failed = httpx.get(url + REPORT_PATH, headers=good)
    assert failed.status_code == 503 and failed.json() == {"error": "RuntimeError"}
    failing[0] = False
    assert httpx.get(url + REPORT_PATH, headers=good).status_code == 200


def test_an_agent_without_a_token_answers_no_one(tmp_path: Path) -> None:
    server = make_server("127.0.0.1", 0, "", lambda: NodeReport(node_id="", hostname="", at=0, devices=[]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{REPORT_PATH}"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer"}).status_code == 401
    finally:
        server.shutdown()
        server.server_close()


def test_a_gpu_node_is_told_what_to_advertise_to_swarm_and_a_cpu_node_nothing() -> None:
    """What ``manager node-agent --resources`` prints: each device's usable memory in MiB as the
    generic resource its engines reserve, NVIDIA's runtime the default; host memory needs none."""
    from manager.agent.main import advertised
    from manager.gpu import DeviceMemory

    G = 1024**3
    a100 = DeviceMemory(index=0, uuid="GPU-a", name="A100", kind="gpu", total=80 * G, free=80 * G, used=0, reserved=G)
    mig = DeviceMemory(index=1, uuid="MIG-b", name="1g.10gb", kind="mig", total=10 * G, free=10 * G, used=0)
    assert advertised([a100, mig]) == {
        "default-runtime": "nvidia",
        "node-generic-resources": [f"gpumem-GPU-a={79 * 1024}", f"gpumem-MIG-b={10 * 1024}"],
    }
    host = DeviceMemory(index=0, uuid="host-memory", name="host memory", kind="host-memory", total=G, free=G, used=0)
    assert advertised([host]) == {}
