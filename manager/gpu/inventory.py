"""The inventory protocol and the factory that picks an implementation by settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from manager.errors import GpuUnavailable

DeviceKind = Literal["gpu", "mig", "host-memory"]


@dataclass(frozen=True)
class DeviceMemory:
    """One schedulable device. A MIG slice is a device of kind ``mig`` with its own
    memory; the ledger does not care which kind it counts."""

    index: int
    uuid: str
    name: str
    kind: DeviceKind
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    device_index: int
    used: int


@runtime_checkable
class Inventory(Protocol):
    mode: str

    def devices(self) -> list[DeviceMemory]: ...

    def processes(self) -> list[ProcessMemory]:
        """Per-process device memory, host PIDs (empty where the mode cannot tell)."""
        ...

    def close(self) -> None: ...


def open_inventory(mode: str | None) -> Inventory:
    """The inventory for ``GTM_GPU_MODE``; an unset or unusable mode is a start-up error."""
    if mode == "nvml":
        from manager.gpu.nvml import NvmlInventory

        return NvmlInventory.open()
    if mode == "cpu":
        from manager.gpu.cpu import HostMemoryInventory

        return HostMemoryInventory()
    raise GpuUnavailable(
        "GTM_GPU_MODE is not set: set GTM_GPU_MODE=nvml on a host with NVIDIA GPUs, "
        "or GTM_GPU_MODE=cpu to serve small models from host memory"
    )
