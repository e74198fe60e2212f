"""GPU inventory: what memory the host's devices have, and which process uses how much.

The rest of the code sees only the ``Inventory`` protocol; ``nvml`` is the only
module that imports pynvml; ``cpu`` serves hosts without a GPU (host memory).
"""

from manager.gpu.inventory import (
    DeviceMemory,
    Inventory,
    ProcessMemory,
    device_label,
    find_device,
    open_inventory,
    placed_on,
)

__all__ = ["DeviceMemory", "Inventory", "ProcessMemory", "device_label", "find_device", "open_inventory", "placed_on"]
