"""Several hosts on a real Docker Swarm of two nodes on this machine (``scripts/swarm-nodes.sh``:
Docker >= 23 extracted from Debian, each node a dockerd in its own network namespace, torn down by
PID, pass or fail): the runtime contract ``DockerRuntime`` and ``MemoryRuntime`` pass, through
``SwarmRuntime``; the node agents' reports; Swarm's own accounting of reservations; and the
manager on the swarm end to end, with real engines: a tenant on node 2, node 2 lost and back, its
spool read and its volumes removed there.

The nodes start with the manager and engine images already in their stores, seeded from the
system dockerd: hard links, seconds. The module runs as root, in the suite (``GTM_SWARM_TESTS=0``
leaves it out; ``GTM_SWARM_E2E=0`` keeps the engine-free tests only). On a 2-core machine it
costs 160-210 s: nodes 8 s, runtime contract 21 s, agents 16 s, and the end-to-end test 110-155 s
(two engine starts, a node's loss and return). When a test fails, each node's dockerd log is
printed.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from manager import names
from manager.control.plan import control_network_plan, node_agent_plan
from manager.names import Role
from manager.runtime.swarm import GPU_MEMORY_RESOURCE, SwarmRuntime
from manager.runtime.types import ContainerPlan, NetworkPlan
from manager.settings import Settings
from tests.runtime_contract import RuntimeContract

from .conftest import ENGINE_IMAGE, MANAGER_IMAGE, TEST_PREFIX, free_port, wait_for
from .probes import CONNECT
from .test_stack import KEY_LINE

ROOT = Path(__file__).resolve().parents[2]
NODES = ROOT / "scripts" / "swarm-nodes.sh"
SWARM_DOCKER = Path(os.environ.get("GTM_CACHE", "/var/cache/gpu-tenant-manager")) / "swarm-docker"
SWARM_LOGS = Path(os.environ.get("GTM_SWARM_LOGS", "/var/log/gtm-swarm"))
E2E = os.environ.get("GTM_SWARM_E2E", "1") != "0"

pytestmark = pytest.mark.skipif(
    os.environ.get("GTM_SWARM_TESTS", "1") == "0" or os.geteuid() != 0,
    reason="a swarm of two nodes on this machine: needs root (namespaces, cgroups); GTM_SWARM_TESTS=0 leaves it out",
)


def nodes(*argv: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["bash", str(NODES), *argv], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/swarm-nodes.sh {' '.join(argv)} failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout.strip()


def last_json(out: str) -> Any:
    """The JSON a one-off printed last, past any prefix the logs put before it."""
    last = out.strip().splitlines()[-1]
    return json.loads(last[last.index("{") :])


def remove_instance(runtime: SwarmRuntime, inst: str) -> None:
    """Every service, then every network, of the instance ``inst`` on the swarm."""
    for c in runtime.containers(names.selector(inst)):
        runtime.remove_container(c.name)
    for n in runtime.networks(names.selector(inst)):
        runtime.remove_network(n.name)


def node_logs(lines: int = 40) -> str:
    """Each node's dockerd log (kept past ``down``), its last lines, and the kernel's OOM kills."""
    out = []
    for log in sorted(SWARM_LOGS.glob("n*-dockerd.log")):
        out.append(f"--- {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    kernel = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout.splitlines()
    oom = [line for line in kernel if "oom" in line.lower()]
    out.append("--- dmesg, OOM kills:\n" + "\n".join(oom[-10:]))
    return "\n".join(out)


@pytest.fixture(scope="module")
def swarm(request: pytest.FixtureRequest) -> Iterator[docker.DockerClient]:
    """Two nodes, n1 the manager, the manager image (and for the end-to-end test the engine's) on
    both, seeded from the system dockerd; each advertises a GPU of 1 GiB (``gpumem-GPU-fake-n<i>``:
    no GPU behind it, Swarm's accounting only). Torn down by PID, pass or fail. When a test
    failed, each node's dockerd log is printed."""
    nodes("down")
    failed = request.session.testsfailed
    try:
        generic = f"{GPU_MEMORY_RESOURCE.format(uuid='GPU-fake-n@')}=1024"
        images = [MANAGER_IMAGE, ENGINE_IMAGE] if E2E else [MANAGER_IMAGE]
        nodes("up", "2", *images, env={"GTM_SWARM_GENERIC": generic})
        client = docker.DockerClient(base_url=nodes("host", "1"), timeout=120)
        yield client
        client.close()
    finally:
        if request.session.testsfailed > failed:
            print(node_logs(), file=sys.stderr)
        nodes("down")


class TestSwarmRuntime(RuntimeContract):
    @pytest.fixture
    def runtime(self, swarm: docker.DockerClient) -> SwarmRuntime:
        return SwarmRuntime(swarm)

    @pytest.fixture
    def instance(self, swarm: docker.DockerClient) -> Iterator[str]:
        inst = TEST_PREFIX + secrets.token_hex(4)
        yield inst
        runtime = SwarmRuntime(swarm)
        remove_instance(runtime, inst)

    @pytest.fixture
    def image(self) -> str:
        return MANAGER_IMAGE

    @pytest.fixture
    def host_port(self) -> int:
        return free_port()

    def test_a_port_is_probed_without_leaving_anything(  # type: ignore[override]
        self, runtime: SwarmRuntime, instance: str, image: str, host_port: int
    ) -> None:
        pytest.skip("the nodes run in network namespaces of their own: a program holding a port here holds none there")

    def test_a_container_joins_the_ipc_namespace_of_a_running_shareable_one(  # type: ignore[override]
        self, runtime: SwarmRuntime, instance: str, image: str
    ) -> None:
        pytest.skip("Swarm services take no IPC mode: MPS (which needs it) is for a single host")


def test_swarm_itself_never_places_a_reservation_where_it_does_not_fit(swarm: docker.DockerClient) -> None:
    """Swarm's own accounting backs the ledger: on node 2's GPU of 1 GiB (its ``gpumem-<uuid>``
    generic resource) an engine of 600 MiB runs and a second waits, pending, Swarm saying why; host
    memory beyond what the node has waits too."""
    inst = TEST_PREFIX + secrets.token_hex(4)
    runtime = SwarmRuntime(swarm)
    node2 = {n.attrs["Description"]["Engine"]["Labels"]["gtm.swarm-node"]: n.id for n in swarm.nodes.list()}["n2"]

    def engine(name: str, **over: Any) -> ContainerPlan:
        return ContainerPlan(
            name=f"{inst}-t-{name}-engine", image=MANAGER_IMAGE, entrypoint=["sleep", "600"], command=[],
            labels=names.labels(inst, Role.ENGINE, name), network="none", node=node2, **over,
        )  # fmt: skip

    try:
        on_gpu = {"gpu_device_ids": ["GPU-fake-n2"], "reserved": 600 * 1024**2}
        runtime.run(engine("first", **on_gpu))
        wait_for(lambda: (c := runtime.container(f"{inst}-t-first-engine")) and c.status == "running", 60, "the first")
        for name, over in (("second", on_gpu), ("huge", {"reserved": 1024**5})):
            assert runtime.run(engine(name, **over)).status == "created", "pending: run does not wait it out"
            state = wait_for(
                lambda n=name: (c := runtime.container(f"{inst}-t-{n}-engine")) and c.error and c, 30, name
            )
            assert state.status == "created" and "insufficient resources" in state.error, state
    finally:
        remove_instance(runtime, inst)


READ_AGENTS = """
import json, sys
from manager.runtime.nodes import AgentReader
reader = AgentReader(lambda: json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
print(json.dumps({node: report.model_dump() for node, report in reader().items()}))
"""
"""Run on the control overlay: the manager's own reader, asking every agent at its task's address."""

HOLD_MEMORY = "import time; held = bytearray(96 * 1024 * 1024); held[::4096] = b'x' * 24576; time.sleep(600)"


def test_an_agent_on_every_node_reports_its_node_and_the_containers_there(
    swarm: docker.DockerClient, tmp_path: Path
) -> None:
    """The node agents run as one global service; read over the control overlay by the manager's
    reader, each reports its own node (its swarm ID, its host memory) and the memory and PIDs of
    the instance's containers on it: a task holding 96 MiB on node 2 is in node 2's report only."""
    inst = TEST_PREFIX + secrets.token_hex(4)
    runtime = SwarmRuntime(swarm)
    settings = Settings(
        gpu_mode="cpu", instance=inst, state_dir=tmp_path, manager_image=MANAGER_IMAGE, docker_socket=nodes("socket")
    )
    control = control_network_plan(settings)
    token = secrets.token_urlsafe(24)
    node_ids = {n.attrs["Description"]["Engine"]["Labels"]["gtm.swarm-node"]: n.id for n in swarm.nodes.list()}
    try:
        runtime.ensure_network(control)
        runtime.run_everywhere(node_agent_plan(settings, token))
        agent = names.node_agent(inst)
        addresses = wait_for(
            lambda: len(a := runtime.task_addresses(agent, control.name)) == 2 and a,
            60,
            "an agent on each node",
            interval=0.5,
        )
        assert set(addresses) == set(node_ids.values())
        holder = ContainerPlan(
            name=f"{inst}-t-acme-engine",
            image=MANAGER_IMAGE,
            entrypoint=["python3", "-c", HOLD_MEMORY],
            command=[],
            labels=names.labels(inst, Role.ENGINE, "acme"),
            network=control.name,
            node=node_ids["n2"],
        )
        runtime.run(holder)

        def read() -> dict[str, Any] | None:
            reader = ContainerPlan(
                name=f"{inst}-read-agents",
                image=MANAGER_IMAGE,
                entrypoint=["python3", "-c", READ_AGENTS, json.dumps(addresses), token, str(settings.agent_port)],
                command=[],
                labels=names.labels(inst, Role.PROBE),
                network=control.name,
                node=node_ids["n1"],
            )
            code, out = runtime.run_to_completion(reader, timeout_s=60)
            assert code == 0, out
            reports: dict[str, Any] = last_json(out)
            held = [c for c in reports.get(node_ids["n2"], {}).get("containers", []) if c["name"] == holder.name]
            return reports if len(reports) == 2 and held and (held[0]["memory"] or 0) > 96 * 1024**2 else None

        reports = wait_for(read, 60, "both reports, node 2's with the 96 MiB task", interval=1)
        for node, report in reports.items():
            assert report["node_id"] == node
            (device,) = report["devices"]
            assert device["kind"] == "host-memory" and 0 < device["free"] <= device["total"]
        (held,) = [c for c in reports[node_ids["n2"]]["containers"] if c["name"] == holder.name]
        assert held["pids"], "its processes' host PIDs on node 2"
        assert holder.name not in {c["name"] for c in reports[node_ids["n1"]]["containers"]}
    finally:
        remove_instance(runtime, inst)


# ------------------------------------------------------------------ the manager on the swarm

CHAT_FROM_NODE = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
print(answer.usage.completion_tokens)
"""
"""The OpenAI SDK, run in a node's network namespace: the tenant's port is published on its node."""

CONSOLE_FROM_NODE = """
import json, sys, httpx
with httpx.Client(base_url=sys.argv[1]) as browser:
    assert browser.post("/login", data={"username": "admin", "password": sys.argv[2]}).status_code == 303
    print(json.dumps({page: browser.get(page).text for page in sys.argv[3:]}))
"""
"""The admin's console pages, read in node 1's namespace, where the manager publishes it."""


def on_node(i: int, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The swarm's own docker CLI against node ``i``'s engine."""
    env = {**os.environ, "PATH": f"{SWARM_DOCKER}/usr/bin:{os.environ['PATH']}", "DOCKER_HOST": nodes("host", str(i))}
    return subprocess.run(["docker", *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(not E2E, reason="GTM_SWARM_E2E=0 leaves out the manager on the swarm with real engines")
def test_the_manager_on_the_swarm_places_a_tenant_on_another_node_where_it_serves(
    swarm: docker.DockerClient, models_dir: Path
) -> None:
    """An admin's path: ``scripts/swarm-up.sh`` on node 1 runs the manager as a swarm service;
    ``docker exec`` into it adds a tenant on node 2's device; its engine and gateway run on node 2,
    a chat through the OpenAI SDK at node 2's address is served and metered, the manager measures
    the engine's memory through node 2's agent, and the engine reaches neither the manager nor
    anything outside its tenant's network (another tenant's engine on node 1 included)."""
    inst = TEST_PREFIX + secrets.token_hex(4)
    other = TEST_PREFIX + secrets.token_hex(4)  # another manager's tenant: this one leaves it alone
    runtime = SwarmRuntime(swarm)
    node_ids = {n.attrs["Description"]["Engine"]["Labels"]["gtm.swarm-node"]: n.id for n in swarm.nodes.list()}
    t0 = time.monotonic()

    def lap(what: str) -> None:
        print(f"{time.monotonic() - t0:6.1f} s  {what}", file=sys.stderr)

    env = {
        **os.environ,
        "PATH": f"{SWARM_DOCKER}/usr/bin:{os.environ['PATH']}",
        "DOCKER_HOST": nodes("host", "1"),
        "GTM_SWARM_STACK": inst,
        "GTM_INSTANCE": inst,
        "GTM_STATE_VOLUME": f"{inst}-state",
        "GTM_CONTROL_NETWORK": f"{inst}-control",
        "GTM_CONSOLE_PORT": str(free_port()),
        "GTM_MODELS_PATH": str(models_dir),
        "GTM_MANAGER_IMAGE": MANAGER_IMAGE,
        "GTM_ENGINE_IMAGE": ENGINE_IMAGE,
        "GTM_DOCKER_SOCKET": nodes("socket"),
        "GTM_NODE_LOSS_GRACE_S": "5",
        "GTM_USAGE_INTERVAL_S": "5",
        "GTM_RECONCILE_INTERVAL_S": "5",
    }
    try:
        up = subprocess.run(
            ["bash", "scripts/swarm-up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert up.returncode == 0, up.stderr[-3000:] + up.stdout[-2000:]
        manager = on_node(1, "ps", "-q", "-f", f"label=com.docker.swarm.service.name={inst}_manager").stdout.split()[0]
        lap("the manager serves")

        def dexec(*argv: str) -> subprocess.CompletedProcess[str]:
            return on_node(1, "exec", manager, *argv, timeout=600)

        capacity = json.loads(dexec("capacity", "--json").stdout)
        devices = {d["device"]["node"]: d["device"] for d in capacity["devices"]}
        assert set(devices) == set(node_ids.values()), capacity
        there = devices[node_ids["n2"]]
        assert there["uuid"] == f"host-memory@{node_ids['n2']}" and there["node_index"] == 0
        # a reservation no node has room for: refused with every node's numbers, nothing made
        huge = dexec("add-tenant", "--name", "huge", "--gpu-memory", "4T", "--port", str(free_port()))
        assert huge.returncode != 0, huge.stdout
        assert huge.stderr.count("host memory on ") >= len(devices), huge.stderr  # each node's numbers
        assert json.loads(dexec("list-tenants", "--json").stdout) == []
        port = free_port()
        added = dexec(
            "add-tenant", "--name", "acme", "--gpu-memory", "1536M", "--port", str(port), "--node", node_ids["n2"]
        )
        assert added.returncode == 0, added.stderr
        key = KEY_LINE.findall(added.stdout)[0]
        lap("acme added on node 2")
        # another tenant's engine on node 1, meanwhile: a listener on an internal overlay of its own
        beta_net = NetworkPlan(names.network(other, "beta"), names.labels(other, Role.NETWORK, "beta"), internal=True)
        runtime.ensure_network(beta_net)
        listener = ["python3", "-m", "http.server", "8000"]
        runtime.run(
            ContainerPlan(
                name=names.engine(other, "beta"), image=MANAGER_IMAGE, entrypoint=listener, command=[],
                labels=names.labels(other, Role.ENGINE, "beta"), network=beta_net.name, node=node_ids["n1"],
                # the image's own check asks for the manager's API, which this listener is not:
                # swarm would end it as unhealthy 45 s on, before a slow run reaches the probe
                healthcheck={"test": ["NONE"]},
            )
        )  # fmt: skip
        url = f"http://127.10.0.2:{port}/v1"  # node 2's swarm address: the client's URL names its node
        assert f"its OpenAI base URL: {url}" in added.stdout, added.stdout
        waited = dexec("wait-tenant", "--name", "acme", "--timeout", "400")
        assert waited.returncode == 0, waited.stdout[-2000:] + waited.stderr[-2000:]
        lap("acme serves on node 2")

        # both of its containers run on node 2
        for service in (names.engine(inst, "acme"), names.gateway(inst, "acme")):
            running = swarm.api.tasks(filters={"service": service, "desired-state": "running"})
            assert [t["NodeID"] for t in running] == [node_ids["n2"]], service

        chat = subprocess.run(
            ["ip", "netns", "exec", "gtmsw-n2", sys.executable, "-c", CHAT_FROM_NODE, url, key],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert chat.returncode == 0 and int(chat.stdout.strip()) > 0, chat.stderr[-2000:]

        def metered_and_measured() -> dict[str, Any] | None:
            listing = {t["name"]: t for t in json.loads(dexec("list-tenants", "--json").stdout)}
            acme = listing["acme"]
            done = acme["requests_today"] >= 1 and (acme.get("measured") or 0) > 100 * 1024**2
            return acme if done else None

        acme = wait_for(metered_and_measured, 60, "the chat metered and the engine's memory measured on node 2", 2)
        lap("the chat metered")
        assert acme["node"] and acme["device"] == there["uuid"], acme
        # the console names the node too: on the overview (every node has a "host memory") and on
        # the tenant's page, with its URL there
        token = dexec("cat", "/var/lib/gtm/admin-token").stdout.strip()
        console = f"http://127.10.0.1:{env['GTM_CONSOLE_PORT']}"
        read = ["ip", "netns", "exec", "gtmsw-n1", sys.executable, "-c", CONSOLE_FROM_NODE, console, token]
        pages = subprocess.run([*read, "/", "/tenants/acme"], capture_output=True, text=True, timeout=60, check=False)
        assert pages.returncode == 0, pages.stderr[-2000:]
        overview, tenant_page = json.loads(pages.stdout).values()
        assert f"<td>host memory on {acme['node']}</td>" in overview, overview
        assert f'data-testid="node">{acme["node"]}<' in tenant_page and url in tenant_page, tenant_page

        # the engine, on node 2, reaches neither the manager (on node 1's overlay address), nor
        # another tenant's engine on node 1, nor the host; a probe on that tenant's own network on
        # node 2 reaches its engine, so the check can tell
        manager_ip = runtime.container_ip(f"{inst}_manager", f"{inst}-control")
        beta = wait_for(lambda: runtime.container_ip(names.engine(other, "beta"), beta_net.name), 60, "beta's engine")
        targets = [f"{manager_ip}:8080", f"{beta}:8000", "127.10.0.1:2377"]
        connect = ["python3", "-c", CONNECT.format(targets=targets[1:2])]
        probe = ContainerPlan(
            name=f"{other}-probe", image=MANAGER_IMAGE, entrypoint=connect, command=[],
            labels=names.labels(other, Role.PROBE), network=beta_net.name, node=node_ids["n2"],
        )  # fmt: skip
        code, out = runtime.run_to_completion(probe, timeout_s=60)
        assert code == 0 and last_json(out) == {targets[1]: "connected"}, out
        engine = on_node(2, "ps", "-q", "-f", f"label=com.docker.swarm.service.name={names.engine(inst, 'acme')}")
        reached = on_node(2, "exec", engine.stdout.split()[0], "python3", "-c", CONNECT.format(targets=targets))
        assert reached.returncode == 0, reached.stderr
        assert "connected" not in last_json(reached.stdout).values(), reached.stdout

        # node 2 is cut off, a second chat there (from node 2 itself) is served but out of the
        # manager's reach, then its dockerd dies: after the grace the tenant is placed on node 1 and
        # serves there; node 2 comes back, its old containers go, and its spool is read: each chat
        # metered once
        nodes("cut", "2")
        chat = subprocess.run(
            ["ip", "netns", "exec", "gtmsw-n2", sys.executable, "-c", CHAT_FROM_NODE, url, key],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr[-2000:]
        nodes("kill", "2")
        lap("node 2 killed")
        moved = wait_for(
            lambda: (t := json.loads(dexec("list-tenants", "--json").stdout)[0])["device"] != there["uuid"] and t,
            120,
            "acme to be placed again",
        )
        assert moved["device"] == devices[node_ids["n1"]]["uuid"], moved
        lap("acme placed again on node 1")
        waited = dexec("wait-tenant", "--name", "acme", "--timeout", "400")
        assert waited.returncode == 0, waited.stdout[-2000:] + waited.stderr[-2000:]
        url = f"http://127.10.0.1:{port}/v1"
        lap("acme serves on node 1")
        assert json.loads(dexec("list-tenants", "--json").stdout)[0]["url"] == url
        chat = subprocess.run(
            ["ip", "netns", "exec", "gtmsw-n1", sys.executable, "-c", CHAT_FROM_NODE, url, key],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert chat.returncode == 0 and int(chat.stdout.strip()) > 0, chat.stderr[-2000:]
        audit = json.loads(dexec("audit", "--json").stdout)
        assert any(a["action"] == "place-again" and a["result"] == "ok" for a in audit), audit[:5]
        nodes("start", "2")
        lap("node 2 started")
        mine = ["ps", "-aq", "-f", f"label={names.TENANT}=acme"]
        wait_for(lambda: on_node(2, *mine).returncode == 0 and not on_node(2, *mine).stdout.strip(), 120,
                 "node 2's old containers of acme to go")  # fmt: skip
        lap("node 2's old containers gone")

        def drained() -> dict[str, Any] | None:
            audit = json.loads(dexec("audit", "--json", "--action", "drain-spool").stdout)
            ok = [a for a in audit if a["result"] == "ok"]
            metered = json.loads(dexec("list-tenants", "--json").stdout)[0]["requests_today"]
            return ok[0] if ok and metered == 3 else None

        # the spool is read once node 2's old gateway is gone: the second chat, which the manager
        # could not collect while node 2 was cut off, is found there and metered once
        drained_ok = wait_for(drained, 90, "node 2's spool read and the three chats metered, once each")
        lap("node 2's spool read")
        assert drained_ok["detail"]["node"] == node_ids["n2"], drained_ok
        print("node 2's spool read on its return:", drained_ok["detail"])
        assert drained_ok["detail"]["new"] == 1, drained_ok
        # then node 2's agent removed acme's old volumes there
        assert drained_ok["detail"]["volumes_kept"] == {}, drained_ok
        left = on_node(2, "volume", "ls", "-q", "-f", f"label={names.TENANT}=acme")
        assert left.returncode == 0 and not left.stdout.strip(), left.stdout
        assert json.loads(dexec("list-tenants", "--json").stdout)[0]["requests_today"] == 3, "nothing doubled"
    finally:  # the admin's way down: the manager, what it made, its networks; then anything left
        down = subprocess.run(
            ["bash", "scripts/swarm-down.sh"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        remove_instance(runtime, inst)
        remove_instance(runtime, other)
        assert down.returncode == 0, down.stderr[-3000:]
        assert not runtime.containers(names.selector(inst)) and not runtime.networks(names.selector(inst))
        assert not on_node(1, "network", "ls", "-q", "-f", f"label=com.docker.stack.namespace={inst}").stdout.strip()
