"""NVIDIA devices through nvidia-ml-py (the ``pynvml`` module). The only module that imports it.

- Memory comes from NVML's v2 memory info, which splits off what the driver reserves for itself
  (``DeviceMemory.reserved``); drivers without v2 fall back to v1 (reserved reads 0).
- A GPU in MIG mode is not a device: each of its MIG instances is, with its own memory and
  ``MIG-...`` UUID (what Docker's ``--gpus device=`` takes). A MIG GPU without instances offers
  nothing.
- Any NVML failure (a lost GPU, a driver reload) is ``GpuUnavailable``: a 503 that says what to do,
  never a 500.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

from manager.errors import GpuUnavailable
from manager.gpu.inventory import DeviceMemory, ProcessMemory

T = TypeVar("T")
NOT_AVAILABLE = 2**63
"""usedGpuMemory at or above this is NVML's NVML_VALUE_NOT_AVAILABLE (an unsigned -1)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlInventory:
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

    def _read(self, what: str, read: Callable[[], T]) -> T:
        try:
            return read()
        except self._nvml.NVMLError as exc:
            raise GpuUnavailable(
                f"NVML could not read {what}: {exc}. Check the GPUs with nvidia-smi on the host; a GPU that "
                "is lost (fell off the bus, Xid 79) needs a reset or a reboot. Tenants' engines on other GPUs "
                "keep serving; the manager reads the GPUs again on the next request"
            ) from exc

    def _handles(self) -> list[tuple[Any, str]]:
        """(handle, kind) of every schedulable device: whole GPUs, and MIG instances in place of a MIG GPU."""
        n = self._nvml
        out: list[tuple[Any, str]] = []
        for index in range(n.nvmlDeviceGetCount()):
            handle = n.nvmlDeviceGetHandleByIndex(index)
            if not self._mig_enabled(handle):
                out.append((handle, "gpu"))
                continue
            for slot in range(n.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    out.append((n.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot), "mig"))
                except n.NVMLError:  # an empty slot
                    continue
        return out

    def _mig_enabled(self, handle: Any) -> bool:
        n = self._nvml
        get_mode = getattr(n, "nvmlDeviceGetMigMode", None)
        if get_mode is None:
            return False
        try:
            current = get_mode(handle)[0]
        except n.NVMLError:  # NOT_SUPPORTED: a GPU without MIG
            return False
        return bool(current == getattr(n, "NVML_DEVICE_MIG_ENABLE", 1))

    def _memory(self, handle: Any, kind: str) -> tuple[int, int, int, int]:
        """(total, free, used, reserved); v2 where the driver has it (MIG instances report v1)."""
        n = self._nvml
        version = getattr(n, "nvmlMemory_v2", None)
        if kind == "gpu" and version is not None:
            try:
                mem = n.nvmlDeviceGetMemoryInfo(handle, version=version)
                return int(mem.total), int(mem.free), int(mem.used), int(mem.reserved)
            except (n.NVMLError, AttributeError, TypeError):  # a driver without v2
                pass
        mem = n.nvmlDeviceGetMemoryInfo(handle)
        return int(mem.total), int(mem.free), int(mem.used), 0

    def devices(self) -> list[DeviceMemory]:
        def read() -> list[DeviceMemory]:
            out = []
            for index, (handle, kind) in enumerate(self._handles()):
                total, free, used, reserved = self._memory(handle, kind)
                out.append(
                    DeviceMemory(
                        index=index,
                        uuid=_text(self._nvml.nvmlDeviceGetUUID(handle)),
                        name=_text(self._nvml.nvmlDeviceGetName(handle)),
                        kind="mig" if kind == "mig" else "gpu",
                        total=total,
                        free=free,
                        used=used,
                        reserved=reserved,
                    )
                )
            return out

        return self._read("the GPUs' memory", read)

    def processes(self) -> list[ProcessMemory]:
        def read() -> list[ProcessMemory]:
            out = []
            for index, (handle, _) in enumerate(self._handles()):
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = proc.usedGpuMemory
                    # NVML_VALUE_NOT_AVAILABLE where the driver hides it (MIG, some vGPU): unknown, not 0
                    known = used is not None and used < NOT_AVAILABLE
                    out.append(ProcessMemory(pid=int(proc.pid), device_index=index, used=int(used) if known else None))
            return out

        return self._read("the GPUs' processes", read)

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
