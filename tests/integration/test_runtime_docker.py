"""The runtime contract on the real Docker engine (the same tests run in memory in
tests/unit/test_runtime_memory.py), and reads racing a removal."""

from __future__ import annotations

import threading

import docker
import pytest

from manager import names
from manager.runtime.docker import DockerRuntime
from tests.runtime_contract import RuntimeContract, plans

from .conftest import MANAGER_IMAGE, free_port


class TestDockerRuntime(RuntimeContract):
    @pytest.fixture
    def runtime(self, docker_client: docker.DockerClient) -> DockerRuntime:
        return DockerRuntime(docker_client)

    @pytest.fixture
    def image(self) -> str:
        return MANAGER_IMAGE

    @pytest.fixture
    def host_port(self) -> int:
        return free_port()


def test_reads_racing_a_removal_never_report_the_runtime_down(
    docker_client: docker.DockerClient, instance: str
) -> None:
    """list-tenants lists and measures every tenant's containers; one being removed at that moment
    (an engine replaced, a tenant removed) must read as gone or as 'no figure', not as 'the Docker
    engine did not answer' (which failed the whole listing with 503)."""
    runtime = DockerRuntime(docker_client)
    net, vol, plan = plans(instance, "racer", MANAGER_IMAGE, free_port())
    runtime.ensure_network(net)
    runtime.ensure_volume(vol)
    errors: list[BaseException] = []
    for _ in range(8):
        runtime.run(plan)
        remover = threading.Thread(target=runtime.remove_container, args=(plan.name,))
        remover.start()
        while remover.is_alive():
            try:
                runtime.memory_usage(plan.name)
                runtime.container_pids(plan.name)
                runtime.containers(names.selector(instance))
            except Exception as exc:
                errors.append(exc)
        remover.join()
    assert errors == []
