"""GPU inventory: what memory the host's devices have, and which process uses how much.

The rest of the code sees only the ``Inventory`` protocol; ``nvml`` is the only
module that imports pynvml; ``cpu`` serves hosts without a GPU (host memory).
"""

from manager.errors import GpuUnavailable
from manager.gpu.inventory import (
    DeviceMemory,
    Inventory,
    ProcessMemory,
    device_label,
    find_device,
    placed_on,
)


def open_inventory(mode: str | None) -> Inventory:
    """The inventory for ``GTM_GPU_MODE``; an unset or unusable mode is a start-up error. The
    implementations are imported only when chosen (pynvml is absent where there is no GPU)."""
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


__all__ = ["DeviceMemory", "Inventory", "ProcessMemory", "device_label", "find_device", "open_inventory", "placed_on"]
