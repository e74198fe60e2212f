"""NVIDIA devices through nvidia-ml-py (the ``pynvml`` module). The only module that imports it."""

from __future__ import annotations

import contextlib
from typing import Any

import pynvml

from manager.errors import GpuUnavailable
from manager.gpu.inventory import DeviceMemory, ProcessMemory


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlInventory:
    mode = "nvml"

    def __init__(self, nvml: Any = pynvml) -> None:
        self._nvml = nvml

    @classmethod
    def open(cls, nvml: Any = pynvml) -> NvmlInventory:
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            raise GpuUnavailable(
                f"GTM_GPU_MODE=nvml but NVML failed: {exc}. Check the NVIDIA driver "
                "(nvidia-smi) and that the manager container has the GPU "
                "(compose/docker-compose.gpu.yml), or set GTM_GPU_MODE=cpu on a host without a GPU"
            ) from exc
        if count == 0:
            raise GpuUnavailable("GTM_GPU_MODE=nvml but NVML sees no GPU; set GTM_GPU_MODE=cpu on a host without one")
        return cls(nvml)

    def devices(self) -> list[DeviceMemory]:
        n = self._nvml
        out = []
        for index in range(n.nvmlDeviceGetCount()):
            handle = n.nvmlDeviceGetHandleByIndex(index)
            mem = n.nvmlDeviceGetMemoryInfo(handle)
            out.append(
                DeviceMemory(
                    index=index,
                    uuid=_text(n.nvmlDeviceGetUUID(handle)),
                    name=_text(n.nvmlDeviceGetName(handle)),
                    kind="gpu",
                    total=int(mem.total),
                    free=int(mem.free),
                    used=int(mem.used),
                )
            )
        return out

    def processes(self) -> list[ProcessMemory]:
        n = self._nvml
        out = []
        for index in range(n.nvmlDeviceGetCount()):
            handle = n.nvmlDeviceGetHandleByIndex(index)
            for proc in n.nvmlDeviceGetComputeRunningProcesses(handle):
                used = proc.usedGpuMemory
                # None/NVML_VALUE_NOT_AVAILABLE where the driver hides it (e.g. some vGPU)
                if used is None or used >= 2**63:
                    continue
                out.append(ProcessMemory(pid=int(proc.pid), device_index=index, used=int(used)))
        return out

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
