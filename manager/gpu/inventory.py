"""The inventory protocol and the factory that picks an implementation by settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from manager.errors import InvalidInput

DeviceKind = Literal["gpu", "mig", "host-memory"]


@dataclass(frozen=True)
class DeviceMemory:
    """One schedulable device: a whole GPU, a MIG instance (kind ``mig``, its own memory and
    ``MIG-...`` UUID), or the host's memory in cpu mode. Each one has a ledger of its own."""

    index: int
    """Its place in ``Inventory.devices()``: what ``--gpu N`` names."""
    uuid: str
    name: str
    kind: DeviceKind
    total: int
    free: int
    used: int
    reserved: int = 0
    """What the driver and firmware keep for themselves (NVML v2 ``reserved``): never usable."""
    node: str = ""
    """The swarm node it is on (its ID); '' on a single host."""
    node_name: str = ""
    """That node's host name, as listings show it."""
    node_address: str = ""
    """That node's address in the swarm (where its tenants' ports are published)."""
    node_index: int | None = None
    """Its index on its node, as that node's NVML (``nvidia-smi``) has it; None on a single host."""

    @property
    def usable(self) -> int:
        """What processes can have: NVML's total less the driver's reservation. It is CUDA's own
        total (``cudaMemGetInfo``), the figure vLLM multiplies ``--gpu-memory-utilization`` by."""
        return self.total - self.reserved

    @property
    def node_label(self) -> str:
        """Its swarm node as listings name it: the host name, else the node's ID; '' on one host."""
        return self.node_name or self.node


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    device_index: int
    used: int | None
    """None where the driver does not tell (MIG, some vGPU): unknown, never 0."""
    node: str = ""
    """The swarm node whose host PID ``pid`` is; '' on a single host."""


def device_label(device: DeviceMemory) -> str:
    """How refusals and listings name a device: ``GPU 1 (GPU-...)``, ``MIG 2 (MIG-...)``; '' in cpu
    mode on a single host; on a swarm with the node's name (``host memory on gpu-host-2``)."""
    where = f" on {device.node_label}" if device.node else ""
    if device.kind == "host-memory":
        return f"host memory{where}" if where else ""
    return f"{'MIG' if device.kind == 'mig' else 'GPU'} {device.index} ({device.uuid}){where}"


def find_device(devices: list[DeviceMemory], wanted: str) -> DeviceMemory:
    """``--gpu``: a device's index in ``capacity`` or its UUID (GPU-... or MIG-...)."""
    for d in devices:
        if wanted in (str(d.index), d.uuid):
            return d
    there = ", ".join(device_label(d) or d.uuid for d in devices)
    raise InvalidInput(f"no device {wanted!r} on this host: it has {there}; pass --gpu with one's index or UUID")


def select_devices(devices: list[DeviceMemory], wanted: str) -> list[DeviceMemory]:
    """``--gpu`` (and ``--node``): one device by its index in ``capacity`` or its UUID; on a swarm
    also every device of a node, ``<node>/`` (its host name or ID), or one of them, ``<node>/<i>``
    (the node's own index ``i``, or a UUID)."""
    if "/" not in wanted:
        return [find_device(devices, wanted)]
    node, _, local = wanted.partition("/")
    there = [d for d in devices if d.node and node in (d.node, d.node_name)]
    if not there:
        known = sorted({f"{d.node_name} ({d.node})" for d in devices if d.node})
        listed = ", ".join(known) if known else "none: this manager drives one host (GTM_RUNTIME=docker)"
        raise InvalidInput(f"no node {node!r} reports devices; those that do: {listed}; pass --node with one of them")
    named = sorted({d.node for d in there})
    if len(named) > 1:
        raise InvalidInput(
            f"{node!r} is the host name of {len(named)} nodes ({', '.join(named)}); pass --node with an ID"
        )
    if not local:
        return there
    for d in there:
        if local in (str(d.node_index), d.uuid):
            return [d]
    own = ", ".join(f"{d.node_index}: {device_label(d) or d.uuid}" for d in there)
    raise InvalidInput(f"node {node!r} has no device {local!r}: it has {own}; pass --gpu with one of its own indexes")


def placed_on(uuid: str, devices: list[DeviceMemory]) -> DeviceMemory | None:
    """The device a tenant was placed on ('' is the first: older releases used GPU 0 alone); None
    when that device is gone from the host."""
    if not uuid:
        return devices[0] if devices else None
    return next((d for d in devices if d.uuid == uuid), None)


@runtime_checkable
class Inventory(Protocol):
    def devices(self) -> list[DeviceMemory]:
        """Every schedulable device, in a stable order (NVML's, MIG instances in place of their
        parent); raises ``GpuUnavailable`` when the devices cannot be read."""
        ...

    def processes(self) -> list[ProcessMemory]:
        """Per-process device memory, host PIDs (empty where the mode cannot tell)."""
        ...

    def close(self) -> None: ...
