from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from manager.errors import GpuUnavailable
from manager.gpu import Inventory, open_inventory
from manager.gpu.cpu import HostMemoryInventory
from manager.gpu.nvml import NvmlInventory
from manager.platform import platform_of


def test_mode_must_be_chosen() -> None:
    with pytest.raises(GpuUnavailable, match="GTM_GPU_MODE"):
        open_inventory(platform_of(None))


def test_host_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n")
    inv = HostMemoryInventory(meminfo)
    (dev,) = inv.devices()
    assert (dev.kind, dev.total, dev.free, dev.used) == (
        "host-memory",
        24000000 * 1024,
        20000000 * 1024,
        4000000 * 1024,
    )
    assert isinstance(inv, Inventory)


class FakeNvml:
    """Stands in for the pynvml module: the NVML calls only, with fixed numbers."""

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 1, fail: bool = False) -> None:
        self.count, self.fail = count, fail

    def nvmlInit(self) -> None:
        if self.fail:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=80 * 2**30, free=60 * 2**30, used=20 * 2**30)

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=101, usedGpuMemory=2**30), SimpleNamespace(pid=102, usedGpuMemory=None)]


def test_nvml_devices_and_processes() -> None:
    inv = NvmlInventory.open(FakeNvml())
    (dev,) = inv.devices()
    assert dev.name == "NVIDIA A100-SXM4-80GB" and dev.uuid == "GPU-0" and dev.free == 60 * 2**30
    # a figure the driver hides is unknown, not left out (its engine's use must not read as less)
    assert [(p.pid, p.used) for p in inv.processes()] == [(101, 2**30), (102, None)]
    assert isinstance(inv, Inventory)


@pytest.mark.parametrize("fake", [FakeNvml(fail=True), FakeNvml(count=0)])
def test_nvml_without_driver_or_gpu_is_a_clear_startup_error(fake: FakeNvml) -> None:
    with pytest.raises(GpuUnavailable, match="GTM_GPU_MODE=cpu"):
        NvmlInventory.open(fake)


def test_nvml_v2_splits_off_what_the_driver_reserves() -> None:
    from tests.simgpu import A100_80_NVML_TOTAL, A100_80_RESERVED, SimNvml, a100

    (dev,) = NvmlInventory.open(SimNvml([a100(0)])).devices()
    assert (dev.total, dev.reserved) == (A100_80_NVML_TOTAL, A100_80_RESERVED)
    assert dev.usable == A100_80_NVML_TOTAL - A100_80_RESERVED == dev.free  # CUDA's total, all of it free
