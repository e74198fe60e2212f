"""What a node agent tells the manager about its node: the wire format between ``manager
node-agent`` (on a swarm, a global service of the manager's image: one task on every node) and the
manager, which reads it over the control overlay (``GET /v1/node``).

A manager sees the swarm through a manager node's Docker API: services, tasks and nodes. What only
a node itself can measure comes from its agent: its devices' memory (NVML, or meminfo in cpu
mode), the device memory of each process, and the memory and host PIDs of the manager's
containers running there. The agent reports what it measured and nothing else; a figure it could
not read is None, never 0.

Compatibility: agents and the manager upgrade at different moments, so every field added after the
first release has a default, and unknown fields are ignored (``Contract``).
"""

from __future__ import annotations

from pydantic import Field

from manager.contract import Contract

AGENT_PORT = 8002
"""The port an agent serves its report on, inside the control overlay (nothing is published)."""
REPORT_PATH = "/v1/node"
HEALTH_PATH = "/healthz"
VOLUMES_PATH = "/v1/volumes/"
"""``DELETE /v1/volumes/<name>``: the agent removes that volume of its instance on its node (first
the finished containers of its instance that still hold it, a one-off's): 200 when it is
gone (or was never there), 409 with why it stays. The one thing an agent changes: Swarm's API
reaches only the manager node's volumes, so a tenant's old volumes on a node it left are removed
this way once their spool is read (``control.drains``)."""


class ReportedDevice(Contract):
    """One device of the node, as ``gpu.DeviceMemory`` has it (its ``index`` is the node's own)."""

    index: int
    uuid: str
    name: str
    kind: str
    total: int
    free: int
    used: int
    reserved: int = 0


class ReportedProcess(Contract):
    pid: int
    """A host PID of the node (PIDs of different nodes may be equal)."""
    device_index: int
    used: int | None


class ReportedContainer(Contract):
    """One of the manager's containers on the node, by the name the manager gave it (on a swarm:
    its service's name)."""

    name: str
    memory: int | None
    """Its cgroup's memory use less inactive file pages; None when it could not be read."""
    pids: list[int] = Field(default_factory=list)
    """Host PIDs of its processes on the node."""


class NodeReport(Contract):
    node_id: str
    """The node's swarm ID (what a placement constraint names)."""
    hostname: str
    at: float
    """When the agent measured, seconds since the epoch (the node's clock)."""
    devices: list[ReportedDevice]
    processes: list[ReportedProcess] = Field(default_factory=list)
    containers: list[ReportedContainer] = Field(default_factory=list)
