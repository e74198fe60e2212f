"""A node's report, built from its inventory and its Docker engine: what the agent serves."""

from __future__ import annotations

import time
from collections.abc import Callable

from manager import names
from manager.gpu import Inventory
from manager.node_report import NodeReport, ReportedContainer, ReportedDevice, ReportedProcess
from manager.runtime.protocol import Runtime

SERVICE_LABEL = "com.docker.swarm.service.name"
"""Swarm names a task's container ``<service>.<slot>.<task id>``; the manager knows it by its
service's name, which Swarm puts on the container as this label."""


def node_report(
    node_id: str,
    hostname: str,
    instance: str,
    inventory: Inventory,
    runtime: Runtime,
    clock: Callable[[], float] = time.time,
) -> NodeReport:
    """The node's devices and device processes, and the memory and PIDs of the instance's running
    containers on it. A container that goes away while it is read is reported without figures."""
    devices = [
        ReportedDevice(
            index=d.index, uuid=d.uuid, name=d.name, kind=d.kind, total=d.total, free=d.free, used=d.used,
            reserved=d.reserved,
        )
        for d in inventory.devices()
    ]  # fmt: skip
    processes = [ReportedProcess(pid=p.pid, device_index=p.device_index, used=p.used) for p in inventory.processes()]
    containers = []
    for state in runtime.containers(names.selector(instance)):
        if state.status != "running":
            continue
        containers.append(
            ReportedContainer(
                name=state.labels.get(SERVICE_LABEL, state.name),
                memory=runtime.memory_usage(state.name),
                pids=sorted(runtime.container_pids(state.name)),
            )
        )
    return NodeReport(
        node_id=node_id, hostname=hostname, at=clock(), devices=devices, processes=processes, containers=containers
    )
