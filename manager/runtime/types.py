"""What the control plane hands a runtime (plans) and what it reads back (states).

Plain data, no SDK: the control plane builds plans with pure code, any ``Runtime``
implementation turns them into containers, networks and volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from manager.names import ROLE, SPEC_HASH, TENANT


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False

    @property
    def kind(self) -> Literal["bind", "volume"]:
        return "bind" if self.source.startswith("/") else "volume"


@dataclass(frozen=True)
class NetworkPlan:
    name: str
    labels: dict[str, str]
    internal: bool = True
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VolumePlan:
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    image: str
    command: list[str]
    labels: dict[str, str]
    network: str
    aliases: list[str] = field(default_factory=list)
    extra_networks: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    tmpfs: dict[str, str] = field(default_factory=dict)
    user: str = "1000:1000"
    read_only: bool = True
    cap_drop: list[str] = field(default_factory=lambda: ["ALL"])
    cap_add: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=lambda: ["no-new-privileges:true"])
    pids_limit: int | None = 512
    mem_limit: int | None = None
    shm_size: int | None = None
    nano_cpus: int | None = None
    cpu_shares: int | None = None
    gpu_device_ids: list[str] | None = None
    ports: dict[int, tuple[str, int]] = field(default_factory=dict)
    restart_policy: str = "no"
    healthcheck: dict[str, object] | None = None
    entrypoint: list[str] | None = None
    working_dir: str | None = None
    ipc_mode: str | None = None
    """Docker's IPC mode: None is private; ``shareable`` lets ``container:<name>`` join it."""
    node: str | None = None
    """The ID of the swarm node the container must run on; None: any (a single host has one)."""
    reserved: int | None = field(default=None, repr=False)
    """Bytes admission reserved for it on its device (an engine). On a swarm Swarm's own accounting
    holds them too, so that no task lands where they are not free: a GPU's as the node's
    ``gpumem-<uuid>`` generic resource (MiB), host memory as a memory reservation. One host has the
    ledger alone. Not in ``repr``: an engine's identity (``plan.engine_identity``) stays as it was."""


class Labelled:
    """The tenant and role a runtime object's labels name (containers, their events, networks,
    volumes)."""

    labels: dict[str, str]

    @property
    def tenant(self) -> str | None:
        return self.labels.get(TENANT)

    @property
    def role(self) -> str | None:
        return self.labels.get(ROLE)


@dataclass(frozen=True)
class ContainerState(Labelled):
    id: str
    name: str
    labels: dict[str, str]
    status: str  # created, running, restarting, exited, dead, paused, removing
    health: str | None  # starting, healthy, unhealthy, or None without a health check
    exit_code: int | None
    oom_killed: bool
    error: str
    started_at: str
    finished_at: str
    ports: dict[str, Any] = field(default_factory=dict)

    @property
    def spec_hash(self) -> str | None:
        return self.labels.get(SPEC_HASH)


@dataclass(frozen=True)
class RuntimeEvent(Labelled):
    """Something that happened to a container, as the runtime reports it: ``die`` (its process
    ended: crashed, killed, stopped), ``oom``, ``health_status``, ``start``, ``destroy``."""

    name: str
    labels: dict[str, str]
    action: str


@dataclass(frozen=True)
class Resource(Labelled):
    """A network or a volume, as found by label."""

    name: str
    labels: dict[str, str]
