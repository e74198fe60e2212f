"""The promises of the ``Runtime`` protocol, as one set of tests.

``tests/unit/test_runtime_memory.py`` runs them against ``MemoryRuntime`` and
``tests/integration/test_runtime_docker.py`` against ``DockerRuntime`` on a real
engine: a subclass provides the ``runtime``, ``instance`` and ``image`` fixtures.
"""

from __future__ import annotations

import socket
import threading

import pytest

from manager import names
from manager.errors import RuntimeUnavailable
from manager.names import Role
from manager.runtime.protocol import Runtime
from manager.runtime.types import ContainerPlan, Mount, NetworkPlan, RuntimeEvent, VolumePlan


def plans(instance: str, tenant: str, image: str, host_port: int) -> tuple[NetworkPlan, VolumePlan, ContainerPlan]:
    net = NetworkPlan(names.network(instance, tenant), names.labels(instance, Role.NETWORK, tenant), internal=True)
    vol = VolumePlan(names.gateway_volume(instance, tenant), names.labels(instance, Role.VOLUME, tenant))
    container = ContainerPlan(
        name=names.gateway(instance, tenant),
        image=image,
        command=["gateway"],
        labels=names.labels(instance, Role.GATEWAY, tenant, spec_hash="h1"),
        network=net.name,
        mounts=[Mount(vol.name, "/data")],
        tmpfs={"/tmp": "rw,size=16m"},
        ports={8000: ("127.0.0.1", host_port)},
        mem_limit=256 * 1024**2,
    )
    return net, vol, container


def one_off(name: str, image: str, code: str, labels: dict[str, str], **plan: object) -> ContainerPlan:
    """A short-lived container running ``code`` in python3 (a warm-up, a prepare step, a port probe)."""
    return ContainerPlan(
        name=name,
        image=image,
        entrypoint=["python3", "-c", code],
        command=[],
        labels=labels,
        **plan,  # type: ignore[arg-type]
    )


JOINER_CODE = """
import pathlib, sys, time
for _ in range(100):
    if pathlib.Path('/dev/shm/pipe').exists():
        sys.exit(0)
    time.sleep(0.1)
sys.exit(3)
"""
"""Exits 0 once it sees the file its IPC donor wrote in /dev/shm."""


class RuntimeContract:
    """Subclasses provide fixtures ``runtime: Runtime``, ``instance: str``, ``image: str``, ``host_port: int``."""

    def test_networks_and_volumes_are_idempotent_and_found_by_label(
        self, runtime: Runtime, instance: str, image: str, host_port: int
    ) -> None:
        net, vol, _ = plans(instance, "alpha", image, host_port)
        for _ in range(2):
            runtime.ensure_network(net)
            runtime.ensure_volume(vol)
        sel = names.selector(instance, tenant="alpha")
        assert [n.name for n in runtime.networks(sel)] == [net.name]
        assert [v.name for v in runtime.volumes(sel)] == [vol.name]
        assert runtime.networks(sel)[0].tenant == "alpha"
        assert runtime.networks(names.selector(instance, tenant="other")) == []
        for _ in range(2):
            runtime.remove_network(net.name)
            runtime.remove_volume(vol.name)
        assert runtime.networks(sel) == [] and runtime.volumes(sel) == []

    def test_container_lifecycle(self, runtime: Runtime, instance: str, image: str, host_port: int) -> None:
        net, vol, plan = plans(instance, "beta", image, host_port)
        runtime.ensure_network(net)
        runtime.ensure_volume(vol)
        first = runtime.run(plan)
        assert first.status == "running" and first.name == plan.name
        assert first.tenant == "beta" and first.role == Role.GATEWAY and first.spec_hash == "h1"

        found = runtime.containers(names.selector(instance, tenant="beta"))
        assert [c.name for c in found] == [plan.name]
        assert runtime.containers(names.selector(instance, role=Role.ENGINE)) == []
        assert runtime.container(plan.name) is not None
        assert runtime.published_ports().get(host_port) == plan.name
        ip = runtime.container_ip(plan.name, net.name)
        assert ip is not None and ip.count(".") == 3
        assert runtime.container_ip(plan.name, "no-such-network") is None

        second = runtime.run(plan)  # a leftover of the same name is replaced, never duplicated
        assert second.id != first.id
        assert [c.id for c in runtime.containers(names.selector(instance, tenant="beta"))] == [second.id]

        runtime.stop_container(plan.name, timeout=1)
        stopped = runtime.container(plan.name)
        assert stopped is not None and stopped.status == "exited" and stopped.exit_code is not None
        assert runtime.memory_usage(plan.name) is None
        assert runtime.container_pids(plan.name) == set()
        assert isinstance(runtime.logs_tail(plan.name), str)

        for _ in range(2):
            runtime.remove_container(plan.name)
        assert runtime.container(plan.name) is None
        assert runtime.published_ports().get(host_port) is None
        runtime.remove_network(net.name)
        runtime.remove_volume(vol.name)

    def test_a_container_that_ends_is_an_event_at_once(
        self, runtime: Runtime, instance: str, image: str, host_port: int
    ) -> None:
        """What the reconciler follows to replace a dead engine or gateway in seconds: its start, its
        end (``die``) and its removal, carrying its labels; other instances' containers stay out."""
        net, vol, plan = plans(instance, "gamma", image, host_port)
        runtime.ensure_network(net)
        runtime.ensure_volume(vol)
        stream = runtime.events(names.selector(instance, tenant="gamma"))
        seen: list[RuntimeEvent] = []
        done = threading.Event()

        def follow() -> None:
            for event in stream:
                seen.append(event)
                if event.action == "destroy":
                    done.set()
            done.set()

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            runtime.run(plan)
            runtime.stop_container(plan.name, timeout=1)
            runtime.remove_container(plan.name)
            assert done.wait(20), f"no destroy event; saw {seen}"
            actions = [e.action for e in seen if e.name == plan.name]
            assert "start" in actions and "die" in actions and actions[-1] == "destroy", actions
            assert actions.index("start") < actions.index("die"), actions
            assert all(e.tenant == "gamma" and e.role == Role.GATEWAY for e in seen)
        finally:
            stream.close()
            thread.join(10)
            runtime.remove_container(plan.name)
            runtime.remove_network(net.name)
            runtime.remove_volume(vol.name)
        assert not thread.is_alive(), "close() did not end the iteration"

    def test_a_network_named_like_the_start_of_another_is_its_own(
        self, runtime: Runtime, instance: str, image: str, host_port: int
    ) -> None:
        """Tenants demo and demo-vl: demo's network is created even when demo-vl's exists (Docker's
        name filter matches parts of names)."""
        longer, _, _ = plans(instance, "pre-vl", image, host_port)
        shorter, _, _ = plans(instance, "pre", image, host_port)
        try:
            runtime.ensure_network(longer)
            runtime.ensure_network(shorter)
            assert [n.name for n in runtime.networks(names.selector(instance, tenant="pre"))] == [shorter.name]
        finally:
            runtime.remove_network(shorter.name)
            runtime.remove_network(longer.name)

    def test_reading_a_missing_container_is_not_a_runtime_error(self, runtime: Runtime, instance: str) -> None:
        missing = f"{instance}-no-such-container"
        assert runtime.container(missing) is None
        assert runtime.memory_usage(missing) is None
        assert runtime.container_pids(missing) == set()
        assert runtime.logs_tail(missing) == ""
        assert runtime.container_ip(missing, "any") is None
        runtime.stop_container(missing)
        runtime.remove_container(missing)
        assert runtime.ping() is True

    def test_a_one_off_container_runs_to_its_end_and_is_gone(self, runtime: Runtime, instance: str, image: str) -> None:
        """With ``log_lines=None`` all of its output comes back (``drain-spool`` prints pages)."""
        code_text = "for i in range(60): print(f'line {i}')"
        plan = one_off(f"{instance}-oneoff", image, code_text, names.labels(instance, Role.WARMUP), network="none")
        code, out = runtime.run_to_completion(plan, timeout_s=60, log_lines=None)
        assert code == 0
        assert runtime.container(plan.name) is None
        assert all(f"line {i}\n" in out for i in range(60)), out

    def test_a_container_joins_the_ipc_namespace_of_a_running_shareable_one(
        self, runtime: Runtime, instance: str, image: str
    ) -> None:
        """What an engine under MPS needs (``plan.mps_daemon_plan``): it joins its device daemon's
        IPC namespace, /dev/shm included, and cannot start while that daemon is not running."""
        labels = names.labels(instance, Role.MPS, device="GPU-contract")
        code = "import pathlib, time; pathlib.Path('/dev/shm/pipe').write_text('daemon'); time.sleep(600)"
        donor = one_off(f"{instance}-ipc-donor", image, code, labels, network="none", ipc_mode="shareable")
        joiner = one_off(
            f"{instance}-ipc-joiner",
            image,
            JOINER_CODE,
            names.labels(instance, Role.PREPARE, "ipc"),
            network="none",
            ipc_mode=f"container:{donor.name}",
        )
        try:
            with pytest.raises(RuntimeUnavailable):
                runtime.run_to_completion(joiner, timeout_s=60)
            assert runtime.container(joiner.name) is None
            runtime.run(donor)
            assert runtime.run_to_completion(joiner, timeout_s=60)[0] == 0  # it saw the donor's /dev/shm
        finally:
            runtime.remove_container(donor.name)
            runtime.remove_container(joiner.name)

    def test_an_image_name_resolves_to_its_id(self, runtime: Runtime, image: str) -> None:
        found = runtime.image_id(image)
        assert found is not None and found.startswith("sha256:")

    def test_a_port_is_probed_without_leaving_anything(
        self, runtime: Runtime, instance: str, image: str, host_port: int
    ) -> None:
        """``publish_error``: None for a free port, the bind error for one a program on the host holds
        (one Docker does not know); the probe container is gone either way."""
        labels = names.labels(instance, Role.PROBE)
        ports = {8000: ("127.0.0.1", host_port)}
        probe = one_off(f"{instance}-port-probe-{host_port}", image, "pass", labels, network="bridge", ports=ports)
        assert runtime.publish_error(probe) is None
        with socket.create_server(("127.0.0.1", host_port)):
            error = runtime.publish_error(probe)
        assert error is not None and "address already in use" in error, error
        assert runtime.container(probe.name) is None
