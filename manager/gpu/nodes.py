"""Every node's devices, as the node agents report them: one inventory across a swarm.

Nodes come in a stable order (host name, then ID); a device's ``index`` is its place across all of
them, its ``node`` the node's ID. Host memory (cpu mode) is one device per node, its UUID made
unique with the node's ID; GPU and MIG UUIDs are unique already. A node whose agent did not answer
is left out: its devices are unknown, never counted with old figures."""

from __future__ import annotations

from collections.abc import Callable

from manager.errors import GpuUnavailable
from manager.gpu.inventory import DeviceKind, DeviceMemory, ProcessMemory
from manager.node_report import NodeReport

HOST_MEMORY = "host-memory"


def _ordered(reports: dict[str, NodeReport]) -> list[NodeReport]:
    return sorted(reports.values(), key=lambda r: (r.hostname, r.node_id))


def _uuid(report: NodeReport, uuid: str, kind: str) -> str:
    return f"{HOST_MEMORY}@{report.node_id}" if kind == HOST_MEMORY else uuid


def _kind(kind: str) -> DeviceKind:
    if kind not in ("gpu", "mig", HOST_MEMORY):
        raise GpuUnavailable(f"a node agent reported a device of unknown kind {kind!r}")
    return kind  # type: ignore[return-value]


class NodesInventory:
    """``reports``: the agents' reports by node ID; ``addresses``: each node's swarm address, asked
    only when a node not seen before reports (a node keeps its address while it is in the swarm,
    and one that joins again gets a new ID): ``devices`` is on every reconcile's path."""

    def __init__(
        self, reports: Callable[[], dict[str, NodeReport]], addresses: Callable[[], dict[str, str]] = dict
    ) -> None:
        self._reports, self._addresses = reports, addresses
        self._known: dict[str, str] = {}

    def devices(self) -> list[DeviceMemory]:
        reports = _ordered(self._reports())
        if not reports:
            raise GpuUnavailable("no node agent reported: no node's devices can be read")
        out: list[DeviceMemory] = []
        if any(r.node_id not in self._known for r in reports):
            self._known = self._addresses()
        addresses = self._known
        for report in reports:
            for d in sorted(report.devices, key=lambda d: d.index):
                out.append(
                    DeviceMemory(
                        index=len(out), uuid=_uuid(report, d.uuid, d.kind), name=d.name, kind=_kind(d.kind),
                        total=d.total, free=d.free, used=d.used, reserved=d.reserved, node=report.node_id,
                        node_name=report.hostname, node_address=addresses.get(report.node_id, ""),
                        node_index=d.index,
                    )
                )  # fmt: skip
        return out

    def processes(self) -> list[ProcessMemory]:
        """Each node's processes, their device named by its place across the nodes."""
        out: list[ProcessMemory] = []
        offset = 0
        for report in _ordered(self._reports()):
            place = {d.index: offset + i for i, d in enumerate(sorted(report.devices, key=lambda d: d.index))}
            out += [
                ProcessMemory(pid=p.pid, device_index=place[p.device_index], used=p.used, node=report.node_id)
                for p in report.processes
                if p.device_index in place
            ]
            offset += len(place)
        return out

    def close(self) -> None:
        close = getattr(self._reports, "close", None)  # the agents' reader holds connections and threads
        if close is not None:
            close()
