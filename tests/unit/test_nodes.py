"""Several nodes as the manager sees them: the node agents' reports read at once (real agent
servers on loopback), one inventory across the nodes, and a swarm container's memory as its node
reported it."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from manager import names
from manager.agent.server import make_server
from manager.control.records import Reach
from manager.errors import GpuUnavailable
from manager.gpu import device_label
from manager.gpu.nodes import NodesInventory
from manager.node_report import NodeReport, ReportedContainer, ReportedDevice, ReportedProcess
from manager.runtime.nodes import AgentReader
from manager.runtime.swarm import SwarmRuntime
from manager.settings import Settings

G = 1024**3


def host_memory(node_id: str, hostname: str, free: int, *containers: ReportedContainer) -> NodeReport:
    device = ReportedDevice(
        index=0, uuid="host-memory", name="host memory", kind="host-memory", total=64 * G, free=free, used=64 * G - free
    )
    return NodeReport(node_id=node_id, hostname=hostname, at=0, devices=[device], containers=list(containers))


def gpus(node_id: str, hostname: str, *uuids: str, processes: list[ReportedProcess] | None = None) -> NodeReport:
    devices = [
        ReportedDevice(index=i, uuid=u, name="A100", kind="gpu", total=80 * G, free=70 * G, used=10 * G)
        for i, u in enumerate(uuids)
    ]
    return NodeReport(node_id=node_id, hostname=hostname, at=0, devices=devices, processes=processes or [])


def swarm_settings(tmp_path: Path, **over: object) -> Settings:
    """A swarm manager's settings in cpu mode, the demo model written for it (the tests of placement)."""
    from .conftest import write_demo_model

    write_demo_model(tmp_path / "models")
    values: dict[str, Any] = dict(
        gpu_mode="cpu", instance="gtmu", state_dir=tmp_path, models_dir=tmp_path / "models", headroom=G,
        runtime="swarm", volumes_dir=tmp_path / "no-volumes", volume_key_file=None,
    )  # fmt: skip
    return Settings(**{**values, **over})


FIVE_GIB = ReportedDevice(
    index=0, uuid="host-memory", name="host memory", kind="host-memory", total=5 * G, free=5 * G, used=0
)
"""A node's host memory, all of it free."""


def two_nodes() -> dict[str, NodeReport]:
    """Nodes n1 (host a) and n2 (host b), 5 GiB of host memory each."""
    return {n: NodeReport(node_id=n, hostname=h, at=0, devices=[FIVE_GIB]) for n, h in (("n1", "a"), ("n2", "b"))}


def test_one_inventory_across_nodes_in_a_stable_order() -> None:
    reports = {"zz9": host_memory("zz9", "gpu-b", 10 * G), "aa1": host_memory("aa1", "gpu-a", 20 * G)}
    devices = NodesInventory(lambda: reports).devices()
    assert [(d.index, d.node, d.node_name, d.free) for d in devices] == [
        (0, "aa1", "gpu-a", 20 * G),
        (1, "zz9", "gpu-b", 10 * G),
    ]
    assert [d.uuid for d in devices] == ["host-memory@aa1", "host-memory@zz9"]  # one ledger each
    assert device_label(devices[1]) == "host memory on gpu-b"


def test_gpus_keep_their_uuids_and_processes_name_their_device_across_nodes() -> None:
    reports = {
        "n2": gpus("n2", "gpu-b", "GPU-b0", processes=[ReportedProcess(pid=100, device_index=0, used=3 * G)]),
        "n1": gpus("n1", "gpu-a", "GPU-a0", "GPU-a1", processes=[ReportedProcess(pid=100, device_index=1, used=None)]),
    }
    inventory = NodesInventory(lambda: reports)
    devices = inventory.devices()
    assert [(d.index, d.uuid) for d in devices] == [(0, "GPU-a0"), (1, "GPU-a1"), (2, "GPU-b0")]
    assert device_label(devices[2]) == "GPU 2 (GPU-b0) on gpu-b"
    by_node = {(p.node, p.pid): (p.device_index, p.used) for p in inventory.processes()}
    assert by_node == {("n1", 100): (1, None), ("n2", 100): (2, 3 * G)}  # one PID, two hosts


def test_a_node_is_named_by_its_host_name_unless_two_share_it_then_by_its_id() -> None:
    from manager.errors import InvalidInput
    from manager.gpu import select_devices

    reports = {"n1": gpus("n1", "vm", "GPU-a0"), "n2": gpus("n2", "vm", "GPU-b0", "GPU-b1")}
    devices = NodesInventory(lambda: reports).devices()
    with pytest.raises(InvalidInput, match=r"'vm' is the host name of 2 nodes \(n1, n2\); pass --node with an ID"):
        select_devices(devices, "vm/")
    assert [d.uuid for d in select_devices(devices, "n2/")] == ["GPU-b0", "GPU-b1"]
    assert [d.uuid for d in select_devices(devices, "n2/1")] == ["GPU-b1"], "the node's own index"
    assert [d.uuid for d in select_devices(devices, "n2/GPU-b0")] == ["GPU-b0"]
    assert [d.uuid for d in select_devices(devices, "2")] == ["GPU-b1"], "--gpu alone: the index in capacity"


def test_no_report_is_no_inventory_and_an_unknown_kind_is_said() -> None:
    with pytest.raises(GpuUnavailable, match="no node agent reported"):
        NodesInventory(dict).devices()
    odd = host_memory("n1", "a", G).model_copy(
        update={"devices": [ReportedDevice(index=0, uuid="x", name="x", kind="tpu", total=1, free=1, used=0)]}
    )
    with pytest.raises(GpuUnavailable, match="unknown kind 'tpu'"):
        NodesInventory(lambda: {"n1": odd}).devices()


@pytest.fixture
def agents() -> Iterator[dict[str, str]]:
    """Two agents answering on loopback addresses of their own (127.0.0.2, 127.0.0.3), one port."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    servers = []
    for i, (node, host) in enumerate((("n1", "gpu-a"), ("n2", "gpu-b"))):
        report = host_memory(node, host, (10 + i) * G, ReportedContainer(name=f"gtm-t-{host}-engine", memory=i * G))
        server = make_server(f"127.0.0.{i + 2}", port, "agent-token", lambda r=report: r)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield {"n1": "127.0.0.2", "n2": "127.0.0.3", "port": str(port)}
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_every_agent_is_read_at_once_and_a_silent_one_is_left_out_and_logged_once(
    agents: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    port = int(agents.pop("port"))
    addresses = dict(agents)
    now = [0.0]
    reader = AgentReader(lambda: addresses, "agent-token", port, max_age_s=2.0, clock=lambda: now[0])
    try:
        assert {n: r.hostname for n, r in reader().items()} == {"n1": "gpu-a", "n2": "gpu-b"}
        addresses["n3"] = "127.0.0.4"  # a node whose agent does not answer
        assert set(reader()) == {"n1", "n2"}, "read again only after max_age_s"
        with caplog.at_level(logging.WARNING):
            for _ in range(2):
                now[0] += 2.0
                assert set(reader()) == {"n1", "n2"}
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert "the agent of node n3 at 127.0.0.4 did not report" in caplog.records[0].message

        wrong = AgentReader(lambda: addresses, "another-token", port)
        assert wrong() == {}, "a report is only for the agents' token"
        wrong.close()
    finally:
        reader.close()


def test_a_slow_read_is_kept_for_max_age_from_its_end(agents: dict[str, str]) -> None:
    """A silent agent holds a read for the whole timeout; the reports it returned are then fresh
    for ``max_age_s``: the callers behind it do not each wait the timeout out again."""
    port = int(agents.pop("port"))
    now = [0.0]
    reads = []

    def addresses() -> dict[str, str]:
        reads.append(now[0])
        now[0] += 3.0  # the read takes as long as a silent agent's timeout
        return dict(agents)

    reader = AgentReader(addresses, "agent-token", port, max_age_s=2.0, clock=lambda: now[0])
    try:
        assert set(reader()) == {"n1", "n2"}
        now[0] += 1.0
        assert set(reader()) == {"n1", "n2"} and reads == [0.0], "1 s after the read ended: kept"
        now[0] += 1.0
        reader()
        assert reads == [0.0, 5.0], "2 s after: read again"
    finally:
        reader.close()


def test_an_agent_removes_a_volume_for_the_token_and_says_why_one_stays() -> None:
    """``AgentReader.remove_volume`` asks the node's agent (``DELETE /v1/volumes/<name>``): gone
    is None, a volume that stays comes back with the agent's reason; without the token, or with a
    name that is not a volume's, nothing is asked of the remover."""
    asked: list[str] = []

    def remove(name: str) -> str | None:
        asked.append(name)
        return "volume gtm-t-acme-data is in use by container x (running)" if "data" in name else None

    report = host_memory("n1", "a", G)
    server = make_server("127.0.0.2", 0, "agent-token", lambda: report, remove)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    reader = AgentReader(lambda: {"n1": "127.0.0.2"}, "agent-token", port)
    stranger = AgentReader(lambda: {"n1": "127.0.0.2"}, "another-token", port)
    try:
        assert reader.remove_volume("n1", "gtm-t-acme-gw") is None
        assert (
            reader.remove_volume("n1", "gtm-t-acme-data") == "volume gtm-t-acme-data is in use by container x (running)"
        )
        assert reader.remove_volume("n9", "gtm-t-acme-gw") == "no agent of node n9 runs"
        assert stranger.remove_volume("n1", "gtm-t-acme-gw") == "a valid agent token is required"
        assert "only DELETE" in (reader.remove_volume("n1", "..%2Fetc") or "")
        assert asked == ["gtm-t-acme-gw", "gtm-t-acme-data"]
    finally:
        reader.close()
        stranger.close()
        server.shutdown()
        server.server_close()


def test_an_agent_removes_only_its_instances_tenant_volumes_and_their_finished_holders() -> None:
    """What the agent itself removes (``agent.volumes.remove_volume``): a tenant's volume of its
    instance, after the finished containers of the instance that hold it; not one a running (or
    created, about to run) container holds, one another program's container holds, or one that is
    not a tenant's."""
    from manager.agent.volumes import remove_volume
    from manager.runtime.types import ContainerState, Resource

    def state(name: str, status: str, **labels: str) -> ContainerState:
        return ContainerState(
            id=name, name=name, labels=labels, status=status, health=None, exit_code=None, oom_killed=False,
            error="", started_at="", finished_at="",
        )  # fmt: skip

    ours = {names.MANAGED: "true", names.INSTANCE: "gtm"}
    volumes = {
        "gtm-t-acme-gw": Resource("gtm-t-acme-gw", names.labels("gtm", names.Role.VOLUME, "acme")),
        "gtm-t-acme-data": Resource("gtm-t-acme-data", names.labels("gtm", names.Role.VOLUME, "acme")),
        "gtm-state": Resource("gtm-state", names.labels("gtm", names.Role.AGENT)),
    }
    users = {
        "gtm-t-acme-gw": [state("gtm-t-acme-drain.1.x", "exited", **ours)],
        "gtm-t-acme-data": [state("gtm-t-acme-engine.1.y", "running", **ours)],
        "gtm-state": [],
    }
    removed: list[str] = []
    runtime = SimpleNamespace(
        volumes=lambda selector: list(volumes.values()),
        volume_users=lambda name: users[name],
        remove_container=removed.append,
        remove_volume=removed.append,
    )
    assert remove_volume(runtime, "gtm", "gtm-t-acme-gw") is None
    assert removed == ["gtm-t-acme-drain.1.x", "gtm-t-acme-gw"], "the finished one-off, then the volume"
    removed.clear()
    assert "in use by container gtm-t-acme-engine.1.y (running)" in remove_volume(runtime, "gtm", "gtm-t-acme-data")
    users["gtm-t-acme-data"] = [state("gtm-t-acme-engine.2.z", "created", **ours)]  # a task about to start
    assert "in use by container gtm-t-acme-engine.2.z (created)" in remove_volume(runtime, "gtm", "gtm-t-acme-data")
    users["gtm-t-acme-data"] = [state("backup", "exited")]
    assert "not instance gtm's" in remove_volume(runtime, "gtm", "gtm-t-acme-data")
    assert "not a tenant's volume" in remove_volume(runtime, "gtm", "gtm-state")
    assert remove_volume(runtime, "gtm", "gtm-t-gone-gw") is None, "never here: nothing to do"
    assert removed == []


def test_a_swarm_containers_memory_and_pids_are_its_nodes_report() -> None:
    reports = {
        "n1": host_memory("n1", "gpu-a", G, ReportedContainer(name="gtm-t-acme-engine", memory=3 * G, pids=[7, 9])),
        "n2": host_memory("n2", "gpu-b", G, ReportedContainer(name="gtm-t-beta-engine", memory=None)),
    }
    client = SimpleNamespace(api=SimpleNamespace())  # no Docker call is made for these
    runtime = SwarmRuntime(client, reports=lambda: reports)
    assert runtime.memory_usage("gtm-t-acme-engine") == 3 * G
    assert runtime.container_pids("gtm-t-acme-engine") == {7, 9}
    assert runtime.memory_usage("gtm-t-beta-engine") is None  # its node could not read it
    assert runtime.memory_usage("gtm-t-gone-engine") is None and runtime.container_pids("gtm-t-gone-engine") == set()


def test_admission_places_across_nodes_and_a_refusal_names_every_nodes_numbers(tmp_path) -> None:
    """Two nodes of 5 GiB, 4 GiB each to reserve past the headroom (one inventory of both, as their
    agents report them): ``--gpu`` picks a node's device, a tenant goes where it fits tightest, and
    a reservation neither node has room for is refused with each node's numbers."""
    from manager.control.reconciler import Reconciler
    from manager.control.service import TenantService
    from manager.control.sqlite_store import SqliteStore
    from manager.errors import AdmissionRefused, InvalidInput
    from manager.runtime.memory import MemoryRuntime

    from .fakes import FakeGateway

    settings = swarm_settings(tmp_path)

    def node(node_id: str, hostname: str, free: int) -> NodeReport:
        device = ReportedDevice(
            index=0,
            uuid="host-memory",
            name="host memory",
            kind="host-memory",
            total=5 * G,
            free=free,
            used=5 * G - free,
        )
        return NodeReport(node_id=node_id, hostname=hostname, at=0, devices=[device])

    reports = {"n1": node("n1", "gpu-a", 5 * G), "n2": node("n2", "gpu-b", 5 * G)}
    inventory = NodesInventory(lambda: reports, lambda: {"n1": "10.1.0.1", "n2": "10.1.0.2"})
    store, runtime = SqliteStore(tmp_path / "m.db"), MemoryRuntime()
    reconciler = Reconciler(settings, store, runtime, inventory, connect=FakeGateway())
    svc = TenantService(settings, store, runtime, inventory, reconciler)
    try:

        def add(name: str, port: int, size: int, gpu: str | None = None) -> str:
            spec = svc.new_spec(name=name, port=port, gpu_memory=size, model=None, max_model_len=None)
            return svc.create(spec, "admin", gpu=gpu).tenant.device

        with pytest.raises(InvalidInput, match=r"no node 'gpu-c'.*gpu-a \(n1\), gpu-b \(n2\)"):
            add("big", 30001, 2560 * 1024**2, gpu="gpu-c/")
        with pytest.raises(InvalidInput, match="node 'gpu-b' has no device '1': it has 0: host memory on gpu-b"):
            add("big", 30001, 2560 * 1024**2, gpu="gpu-b/1")
        assert add("big", 30001, 2560 * 1024**2, gpu="gpu-b/0") == "host-memory@n2"  # --node gpu-b --gpu 0
        assert add("small", 30002, 1536 * 1024**2) == "host-memory@n2"  # the tightest fit: node 2's last 1.5 GiB
        assert add("third", 30003, 3 * G, gpu="n1/") == "host-memory@n1"  # --node n1 (its ID): room there
        with pytest.raises(AdmissionRefused) as refused:
            add("fourth", 30004, 1536 * 1024**2)  # node 1 has 1 GiB left, node 2 none
        message = refused.value.message
        assert "host memory on gpu-a" in message and "host memory on gpu-b" in message, message
        # each tenant is reached at its node's address
        assert svc.reach(svc.tenants()) == {
            "big": Reach("http://10.1.0.2:30001/v1", "gpu-b"), "small": Reach("http://10.1.0.2:30002/v1", "gpu-b"),
            "third": Reach("http://10.1.0.1:30003/v1", "gpu-a"),
        }  # fmt: skip
    finally:
        store.close()


def test_a_lost_nodes_tenant_is_placed_again_where_it_fits_after_the_grace(tmp_path) -> None:
    """Node 2 stops reporting: for the grace its tenant only says so (its containers may still
    serve); then admission places it on node 1, audited with the numbers, and its next turn makes its
    engine there. A second tenant finds no room left: it fails with the numbers, the refusal audited
    once however often it is tried again."""
    from manager.control.reconciler import Reconciler
    from manager.control.service import TenantService
    from manager.control.sqlite_store import SqliteStore
    from manager.domain import TenantStatus
    from manager.runtime.memory import MemoryRuntime

    from .fakes import FakeGateway

    settings = swarm_settings(tmp_path, node_loss_grace_s=60)
    reports = two_nodes()
    now = [1000.0]
    inventory = NodesInventory(lambda: dict(reports))
    store, runtime = SqliteStore(tmp_path / "m.db"), MemoryRuntime()
    reconciler = Reconciler(settings, store, runtime, inventory, connect=FakeGateway(), clock=lambda: now[0])
    svc = TenantService(settings, store, runtime, inventory, reconciler)
    try:
        for name, port, gpu in (("acme", 30001, "1"), ("beta", 30002, "1"), ("held", 30003, "0")):
            spec = svc.new_spec(name=name, port=port, gpu_memory=2 * G, model=None, max_model_len=None)
            svc.create(spec, "admin", gpu=gpu)  # node 2 full with acme and beta, node 1 half full

        del reports["n2"]
        assert reconciler.reconcile("acme") == pytest.approx(60)
        assert "has not reported for 0 s" in store.tenant("acme").reason
        assert store.tenant("acme").device == "host-memory@n2", "within the grace it stays"

        now[0] += 61
        reconciler.reconcile("acme")
        acme = store.tenant("acme")
        assert acme.device == "host-memory@n1" and acme.status == TenantStatus.PENDING, (acme.device, acme.reason)
        (moved,) = store.audit_log(action="place-again")
        assert moved.actor == "manager" and moved.detail["from"] == "host-memory@n2"
        reconciler.reconcile("acme")  # its engine is made on node 1 now
        assert runtime.container(names.engine("gtmu", "acme")) is not None

        for _ in range(3):  # beta: node 1 is full now
            reconciler.reconcile("beta")
            now[0] += 31
        beta = store.tenant("beta")
        assert beta.status == TenantStatus.FAILED and "no other node has room" in beta.reason, beta.reason
        assert "host memory on a" in beta.reason, "with node 1's numbers"
        refusals = [a for a in store.audit_log(action="place-again") if a.result == "refused"]
        assert [a.tenant for a in refusals] == ["beta"], "audited once, however often it is tried again"
    finally:
        store.close()


def test_a_lost_nodes_spool_is_read_once_the_node_is_back_each_record_once(tmp_path) -> None:
    """acme's gateway on node 2 spooled three records, the manager collected the first, then node 2
    was lost and acme placed on node 1. While node 2 is away, and while its old gateway still runs
    there, its spool waits; then a one-off on node 2 (``manager drain-spool``, run for real on the
    spool here) gives the two records not collected and the request it had in flight, settled as
    interrupted. Read again, nothing is stored twice; a node that left the swarm is audited as lost."""
    import io
    import json
    from pathlib import Path

    from manager.control.drains import SpoolDrainer
    from manager.control.reconciler import Reconciler
    from manager.control.service import TenantService
    from manager.control.sqlite_store import SqliteStore
    from manager.gateway.drain import drain
    from manager.gateway.store import SPOOL_FILE, Begin, GatewayStore, Settle
    from manager.runtime.memory import MemoryRuntime
    from manager.runtime.types import ContainerPlan

    from .fakes import FakeGateway, usage_record

    settings = swarm_settings(tmp_path, node_loss_grace_s=60)
    reports = two_nodes()
    members = {"n1": "10.1.0.1", "n2": "10.1.0.2"}
    now = [1000.0]
    inventory = NodesInventory(lambda: dict(reports))
    store, runtime = SqliteStore(tmp_path / "m.db"), MemoryRuntime()
    reconciler = Reconciler(settings, store, runtime, inventory, connect=FakeGateway(), clock=lambda: now[0])
    svc = TenantService(settings, store, runtime, inventory, reconciler, clock=lambda: now[0])
    removed: list[tuple[str, str]] = []
    turn_held: list[bool] = []

    def remove_volume(node: str, name: str) -> str | None:
        removed.append((node, name))

        def take_turn() -> None:
            with reconciler.tenant_turn("acme"):
                pass

        other = threading.Thread(target=take_turn)
        other.start()
        other.join(0.05)
        turn_held.append(other.is_alive())  # acme's reconcile turn waits until the removal ends
        return "in use by container x (running)" if name == names.volume("gtmu", "acme") else None

    drainer = SpoolDrainer(
        settings,
        store,
        runtime,
        inventory,
        lambda: dict(reports),
        lambda: dict(members),
        remove_volume,
        reconciler.tenant_turn,
    )

    # node 2's spool, and what the manager collected of it
    spool_dir = tmp_path / "node2-gw"
    spool = GatewayStore(spool_dir / SPOOL_FILE, checkpoint_s=None)
    spool.write([Settle(usage_record(f"r{i}").model_dump(), opened=False) for i in range(3)])
    spool.write([Begin(usage_record("in-flight", completion_tokens=5).model_dump())])
    spool_id = spool.spool_id
    spool.close()
    store.add_usage("acme", [usage_record("r0")], 1, spool_id)

    def drain_on_node_2(plan: ContainerPlan) -> str:
        assert plan.node == "n2" and plan.mounts[0].source == names.gateway_volume("gtmu", "acme")
        out = io.StringIO()
        drain(spool_dir, json.loads(plan.command[plan.command.index("--cursors") + 1]), out)
        return "".join(f"acme-drain.1.x@b | {line}\n" for line in out.getvalue().splitlines())  # as logs show it

    runtime.effects[names.drain("gtmu", "acme")] = drain_on_node_2
    try:
        spec = svc.new_spec(name="acme", port=30001, gpu_memory=2 * G, model=None, max_model_len=None)
        svc.create(spec, "admin", gpu="1")
        reconciler.reconcile("acme")
        assert runtime.container(names.gateway("gtmu", "acme")).labels[names.NODE] == "n2"

        del reports["n2"]
        reconciler.reconcile("acme")
        now[0] += 61
        reconciler.reconcile("acme")
        assert store.tenant("acme").device == "host-memory@n1"
        assert [(t, n) for t, n, _ in store.spool_drains()] == [("acme", "n2")]

        runtime.completed.clear()  # warm-up and volume preparation
        drainer.tick()  # node 2 away: nothing to read it with
        for old in (names.gateway("gtmu", "acme"), names.engine("gtmu", "acme")):
            still = [ReportedContainer(name=old, memory=None)]
            reports["n2"] = NodeReport(node_id="n2", hostname="b", at=0, devices=[FIVE_GIB], containers=still)
            drainer.tick()  # back, but its old gateway (or engine, which holds a volume) still runs there
            assert runtime.completed == []

        reports["n2"] = NodeReport(node_id="n2", hostname="b", at=0, devices=[FIVE_GIB])
        drainer.tick()
        assert runtime.completed == [names.drain("gtmu", "acme")]
        assert store.usage_totals("acme", 0).requests == 4, "r0 once, r1, r2, and the one in flight"
        (read,) = store.audit_log(action="drain-spool")
        engine_volume, gateway_volume = names.volume("gtmu", "acme"), names.gateway_volume("gtmu", "acme")
        kept = {engine_volume: "in use by container x (running)"}
        assert read.result == "ok" and read.detail == {
            "node": "n2", "spool": spool_id, "read": 3, "new": 3, "volumes_kept": kept
        }  # fmt: skip
        assert removed == [("n2", gateway_volume), ("n2", engine_volume)], "its old volumes, on node 2, once read"
        assert turn_held == [True, True], "never while acme's containers may be made"
        removed.clear()
        assert store.spool_drains() == []
        assert drainer.drain("acme", "n2") == 0, "read again: nothing new"
        assert store.usage_totals("acme", 0).requests == 4

        ran = len(runtime.completed)
        with store.transaction() as tx:  # placed back on a node: its gateway there reads that spool
            store.add_spool_drain(tx, "acme", "n1", now[0])
        drainer.tick()
        assert store.spool_drains() == [] and len(runtime.completed) == ran, "nothing run for it"
        assert removed == [("n2", gateway_volume), ("n2", engine_volume)], "the read again; none on n1, its node"
        with store.transaction() as tx:  # a node that leaves the swarm takes its spool with it
            store.add_spool_drain(tx, "acme", "n3", now[0])
        drainer.tick()
        lost = [a for a in store.audit_log(action="drain-spool") if a.result == "lost"]
        assert [a.detail["node"] for a in lost] == ["n3"] and store.spool_drains() == []

        # placed back on node 2 while its spool there is read: those volumes are its own again
        def placed_back_meanwhile(plan: ContainerPlan) -> str:
            with store.transaction() as tx:
                store.update_spec(tx, store.tenant("acme").spec, device="host-memory@n2")
            return drain_on_node_2(plan)

        runtime.effects[names.drain("gtmu", "acme")] = placed_back_meanwhile
        removed.clear()
        assert drainer.drain("acme", "n2") == 0
        assert removed == [], "nothing removed on the node it is placed on"
        again = store.audit_log(action="drain-spool")[0].detail["volumes_kept"]
        assert again[gateway_volume] == "acme is placed on node n2 again: they are its volumes there"
        assert set(again) == {gateway_volume, engine_volume}
        assert Path(spool_dir / SPOOL_FILE).exists()
    finally:
        store.close()


def test_drain_spool_prints_nothing_without_a_spool_and_pages_of_its_size(tmp_path) -> None:
    import io

    from manager.contract import DRAINED_PAGE
    from manager.control.drains import drained_pages
    from manager.gateway.drain import drain
    from manager.gateway.store import SPOOL_FILE, GatewayStore, Settle

    from .fakes import usage_record

    out = io.StringIO()
    assert drain(tmp_path / "empty", {}, out) == 0 and out.getvalue() == ""
    assert not (tmp_path / "empty").exists(), "nothing made where no gateway was"

    spool = GatewayStore(tmp_path / SPOOL_FILE, checkpoint_s=None)
    spool.write([Settle(usage_record(f"r{i}").model_dump(), opened=False) for i in range(5)])
    spool.close()
    assert drain(tmp_path, {"another-spool": 4}, out, page_records=2) == 5, "another spool's cursor is not its own"
    pages = drained_pages("noise\n" + out.getvalue())
    assert [len(p.records) for p in pages] == [2, 2, 1, 0] and [p.cursor for p in pages] == [2, 4, 5, 5]
    assert all(line.startswith(DRAINED_PAGE) for line in out.getvalue().splitlines())


def test_the_cli_names_a_node_and_lists_where_each_tenant_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from manager import cli

    args = cli.build_parser().parse_args(["add-tenant", "--name", "acme", "--gpu-memory", "1G", "--port", "30001"])
    assert cli._tenant_body(args).get("gpu") is None
    for given, device in ((["--node", "gpu-b"], "gpu-b/"), (["--node", "gpu-b", "--gpu", "1"], "gpu-b/1")):
        args = cli.build_parser().parse_args(
            ["add-tenant", "--name", "acme", "--gpu-memory", "1G", "--port", "1", *given]
        )
        assert cli._tenant_body(args)["gpu"] == device
    tenant = {"name": "acme", "port": 30001, "model": "demo", "gpu_memory": G, "status": "running", "reason": ""}
    cli._print_tenants([{**tenant, "node": "gpu-b"}, {**tenant, "name": "beta", "node": ""}])
    header, acme, beta = capsys.readouterr().out.splitlines()[:3]
    assert header.split()[3] == "NODE" and acme.split()[3] == "gpu-b" and beta.split()[3] == "-"


def test_node_addresses_are_asked_only_when_a_node_not_seen_before_reports() -> None:
    reports, asked = two_nodes(), []

    def addresses() -> dict[str, str]:
        asked.append(1)
        return {n: f"10.1.0.{n[1]}" for n in reports}

    inventory = NodesInventory(lambda: dict(reports), addresses)
    for _ in range(3):
        assert [d.node_address for d in inventory.devices()] == ["10.1.0.1", "10.1.0.2"]
    assert len(asked) == 1, "devices() is on every reconcile's path"
    reports["n3"] = NodeReport(node_id="n3", hostname="c", at=0, devices=[FIVE_GIB])
    assert inventory.devices()[-1].node_address == "10.1.0.3" and len(asked) == 2
