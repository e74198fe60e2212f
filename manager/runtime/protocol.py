"""What the control plane needs from a container runtime.

``DockerRuntime`` is the implementation on a real host; ``MemoryRuntime`` keeps the
same state in memory for fast tests of the code above it. Both pass the same
conformance test (``tests/runtime_contract.py``), so a test that passes
on one means the same on the other. Every method raises ``RuntimeUnavailable`` when
the runtime does not answer; ``ensure_*`` and ``remove_*`` are idempotent; a
container that disappears while it is being read reads as absent, never as an
unavailable runtime.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from manager.runtime.types import ContainerPlan, ContainerState, NetworkPlan, Resource, RuntimeEvent, VolumePlan


class EventStream(Protocol):
    """Events from the moment the stream was opened. Iterating blocks until the next event; it
    ends when ``close`` is called (from any thread) and raises ``RuntimeUnavailable`` when the
    runtime goes away (a dockerd restart): open a new stream then."""

    def __iter__(self) -> Iterator[RuntimeEvent]: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    def ping(self) -> bool: ...

    def ensure_network(self, plan: NetworkPlan) -> None: ...

    def ensure_volume(self, plan: VolumePlan) -> None: ...

    def networks(self, selector: list[str]) -> list[Resource]:
        """Networks carrying every ``key=value`` label of ``selector``."""
        ...

    def volumes(self, selector: list[str]) -> list[Resource]: ...

    def remove_network(self, name: str) -> None: ...

    def remove_volume(self, name: str) -> None: ...

    def containers(self, selector: list[str]) -> list[ContainerState]:
        """Containers in any state carrying every ``key=value`` label of ``selector``."""
        ...

    def container(self, name: str) -> ContainerState | None: ...

    def image_id(self, name: str) -> str | None:
        """The ID an image name (tag) points at now; None when there is no such image."""
        ...

    def run(self, plan: ContainerPlan) -> ContainerState:
        """Creates and starts a container; a leftover of the same name is replaced."""
        ...

    def run_to_completion(self, plan: ContainerPlan, timeout_s: float, log_lines: int | None = 20) -> tuple[int, str]:
        """Runs a one-off container to its end and removes it: (exit code, its last ``log_lines``
        lines of output, all of it with None); -1 on timeout."""
        ...

    def container_ip(self, name: str, network: str) -> str | None: ...

    def stop_container(self, name: str, timeout: int = 5) -> None: ...

    def remove_container(self, name: str) -> None: ...

    def logs_tail(self, name: str, lines: int = 40) -> str: ...

    def memory_usage(self, name: str) -> int | None:
        """Memory in use by a running container (bytes); None when it has no figure (gone, stopping)."""
        ...

    def container_pids(self, name: str) -> set[int]:
        """Host PIDs of a container's processes; empty when it is not running."""
        ...

    def publish_error(self, plan: ContainerPlan) -> str | None:
        """Whether Docker can publish ``plan``'s host ports now: starts a container from it only to
        see, and removes it. Docker's error when a port cannot be bound (held by another program
        or container), else None."""
        ...

    def published_ports(self) -> dict[int, str]:
        """Host ports published by any container of the runtime, with the container's name."""
        ...

    def events(self, selector: list[str]) -> EventStream:
        """The events of containers carrying every ``key=value`` label of ``selector``."""
        ...
