"""GPU inventory: what memory the host's devices have, and which process uses how much.

The rest of the code sees only the ``Inventory`` protocol; ``nvml`` is the only
module that imports pynvml; ``cpu`` serves hosts without a GPU (host memory).
"""

from collections.abc import Callable

from manager.gpu.inventory import (
    DeviceMemory,
    Inventory,
    ProcessMemory,
    device_label,
    find_device,
    placed_on,
    select_devices,
)
from manager.platform import Platform


def _nvml() -> Inventory:
    from manager.gpu.nvml import NvmlInventory

    return NvmlInventory.open()


def _host_memory() -> Inventory:
    from manager.gpu.cpu import HostMemoryInventory

    return HostMemoryInventory()


OPENERS: dict[str, Callable[[], Inventory]] = {"nvml": _nvml, "host-memory": _host_memory}
"""Each inventory by the name a platform gives (``Platform.inventory``), imported only when chosen:
pynvml is absent where there is no GPU."""


def open_inventory(platform: Platform) -> Inventory:
    """The inventory the platform reads; an unusable one is a start-up error (``GpuUnavailable``)."""
    return OPENERS[platform.inventory]()


__all__ = [
    "DeviceMemory",
    "Inventory",
    "ProcessMemory",
    "device_label",
    "find_device",
    "open_inventory",
    "placed_on",
    "select_devices",
]
