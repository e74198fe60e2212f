"""The runtime contract on the in-memory runtime (the same tests run on Docker in
tests/integration/test_runtime_docker.py)."""

from __future__ import annotations

import pytest

from manager.errors import RuntimeUnavailable
from manager.runtime.memory import MemoryRuntime
from tests.runtime_contract import RuntimeContract, plans


class TestMemoryRuntime(RuntimeContract):
    @pytest.fixture
    def runtime(self) -> MemoryRuntime:
        runtime = MemoryRuntime(bind_check=True)
        # what the contract's one-off prints, were it run
        runtime.effects["gtmu-oneoff"] = lambda _: "".join(f"line {i}\n" for i in range(60))
        return runtime

    @pytest.fixture
    def instance(self) -> str:
        return "gtmu"

    @pytest.fixture
    def image(self) -> str:
        return "gtm-manager:dev"

    @pytest.fixture
    def host_port(self) -> int:
        return 30999


def test_unavailable_runtime_raises_runtime_unavailable() -> None:
    runtime = MemoryRuntime(bind_check=True)
    runtime.available = False
    with pytest.raises(RuntimeUnavailable):
        runtime.containers([])


def test_a_published_port_cannot_be_taken_twice() -> None:
    runtime = MemoryRuntime(bind_check=True)
    net, _, plan = plans("gtmu", "a", "img", 31000)
    _, _, other = plans("gtmu", "b", "img", 31000)
    runtime.ensure_network(net)
    runtime.ensure_network(plans("gtmu", "b", "img", 31000)[0])
    runtime.run(plan)
    with pytest.raises(RuntimeUnavailable, match="already allocated"):
        runtime.run(other)
