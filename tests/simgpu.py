"""A simulated NVIDIA host, for tests only: the ``pynvml`` calls ``NvmlInventory`` makes, over GPUs
with NVML and CUDA totals, the driver's reserved memory, MIG instances and per-process memory,
beside a pure model of how vLLM starts on one of them.

Nothing in ``manager/`` imports this; the product reads real NVML only (``manager.gpu.nvml``).

The vLLM model is written from vLLM's source (vllm/v1/worker/gpu_worker.py, ``Worker.init_device``
and ``Worker.determine_available_memory``, v0.10-v0.11):

1. the engine process creates its CUDA context (``torch.cuda.set_device``): ``context`` bytes on the
   device, outside any budget;
2. ``init_device`` takes a ``MemorySnapshot``; its ``total_memory`` is CUDA's total
   (``torch.cuda.mem_get_info()[1]``, NVML's total less the driver's reservation) and
   ``requested_memory = total_memory * gpu_memory_utilization``. If the free memory it sees is
   less, it raises ``ValueError("Free memory on device (...) on startup is less than desired GPU
   memory utilization (...)")``;
3. ``determine_available_memory`` profiles a forward pass; the KV cache gets
   ``requested_memory - non_kv_cache_memory`` (weights, activation peak, memory outside torch);
   at or below zero vLLM refuses to start ("No available memory for the cache blocks");
4. it asserts that free memory did not grow while it profiled ("Error in memory profiling ...
   other processes sharing the same container release GPU memory while vLLM is profiling");
5. from then on the engine holds its context plus its whole budget (the KV cache is allocated
   up front).

Sleep mode, level 1 (vllm/device_allocator/cumem.py, ``CuMemAllocator.sleep`` and ``wake_up``,
0.32): the memory allocated in its cuMem pools (weights, KV cache) is unmapped, the weights backed
up in host memory; the process, its CUDA context, its CUDA graph pools (``--sleep-mode-offload-
cudagraph`` is off by default, config/model.py) and every tensor allocated outside those pools stay
(``vllm_sleep``: ``EngineModel.kept_asleep``). A wake maps the pools back one allocation at a time,
with no rollback: short of memory half way, it raises CUDA's out-of-memory error and the engine
stays alive, half mapped, still reporting that it sleeps (``vllm_wake``; vLLM issue 47654).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

MIB = 1024**2
GIB = 1024**3
A100_80_NVML_TOTAL = 81920 * MIB
A100_80_RESERVED = 870 * MIB
"""NVML v2 ``reserved`` of an A100 80GB: CUDA's total is then 79.15 GiB, what vLLM logs."""
CONTEXT = 512 * MIB
"""A CUDA context with cuBLAS loaded (about 0.5 GiB upstream)."""


class VllmRefused(Exception):
    """vLLM's own start-up error, with its message."""


@dataclass
class SimDevice:
    uuid: str
    name: str
    total: int
    reserved: int = 0
    processes: dict[int, int] = field(default_factory=dict)
    """pid -> bytes it holds on the device (context included)."""
    hide_process_memory: bool = False
    """MIG and some vGPU: NVML reports usedGpuMemory as not available."""

    @property
    def cuda_total(self) -> int:
        return self.total - self.reserved

    @property
    def used(self) -> int:
        return sum(self.processes.values())

    @property
    def cuda_free(self) -> int:
        return self.cuda_total - self.used


@dataclass
class SimGpu(SimDevice):
    mig: list[SimDevice] | None = None
    """MIG instances when the GPU is in MIG mode (None: MIG off)."""


def a100(index: int, mig: list[int] | None = None) -> SimGpu:
    """An A100 80GB; ``mig``: the memory (MiB) of each MIG instance, e.g. [9856] * 7 for 1g.10gb."""
    gpu = SimGpu(f"GPU-a100-{index:04d}", "NVIDIA A100-SXM4-80GB", A100_80_NVML_TOTAL, A100_80_RESERVED)
    if mig is not None:
        gpu.mig = [
            SimDevice(f"MIG-a100-{index:04d}-{slot}", "NVIDIA A100-SXM4-80GB MIG", mib * MIB, hide_process_memory=True)
            for slot, mib in enumerate(mig)
        ]
    return gpu


class SimNvml:
    """Stands in for the ``pynvml`` module over simulated GPUs. ``lost`` makes every call fail the
    way a GPU that fell off the bus does."""

    NVML_DEVICE_MIG_ENABLE = 1
    nvmlMemory_v2 = 2 << 24

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[SimGpu]) -> None:
        self.gpus = gpus
        self.lost = False
        self._pids = itertools.count(4000)

    # ---------------------------------------------------------------- the simulation's own calls
    def devices(self) -> list[SimDevice]:
        """What the manager schedules on, in NVML's order: whole GPUs, MIG instances in place of theirs."""
        return [d for g in self.gpus for d in (g.mig if g.mig is not None else [g])]

    def device(self, uuid: str) -> SimDevice:
        return next(d for d in self.devices() if d.uuid == uuid)

    def new_pid(self) -> int:
        return next(self._pids)

    # ---------------------------------------------------------------- pynvml
    def _check(self) -> None:
        if self.lost:
            raise self.NVMLError("GPU is lost")

    def nvmlInit(self) -> None:
        self._check()

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimDevice:
        self._check()
        return self.gpus[index]

    def nvmlDeviceGetMigMode(self, handle: SimDevice) -> list[int]:
        self._check()
        if not isinstance(handle, SimGpu):
            raise self.NVMLError("Not Supported")
        on = int(handle.mig is not None)
        return [on, on]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: SimGpu) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: SimGpu, slot: int) -> SimDevice:
        self._check()
        if handle.mig is None or slot >= len(handle.mig):
            raise self.NVMLError("Not Found")
        return handle.mig[slot]

    def nvmlDeviceGetMemoryInfo(self, handle: SimDevice, version: int | None = None) -> Any:
        """v1: ``used`` counts the driver's reservation; v2 splits it off as ``reserved``."""
        self._check()
        free = handle.cuda_free
        if version:
            if not isinstance(handle, SimGpu):
                raise self.NVMLError("Not Supported")
            return SimpleNamespace(total=handle.total, free=free, used=handle.used, reserved=handle.reserved)
        return SimpleNamespace(total=handle.total, free=free, used=handle.total - free)

    def nvmlDeviceGetUUID(self, handle: SimDevice) -> str:
        self._check()
        return handle.uuid

    def nvmlDeviceGetName(self, handle: SimDevice) -> bytes:
        self._check()
        return handle.name.encode()

    def nvmlDeviceGetComputeRunningProcesses(self, handle: SimDevice) -> list[Any]:
        self._check()
        hidden = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=hidden if handle.hide_process_memory else used)
            for pid, used in handle.processes.items()
        ]


@dataclass(frozen=True)
class EngineModel:
    """What one engine needs inside vLLM's budget, besides its KV cache."""

    weights: int
    activation_peak: int = 1400 * MIB
    non_torch: int = 300 * MIB
    context: int = CONTEXT
    graph_pool: int = 1200 * MIB
    """CUDA graph pools and tensors outside the cuMem pools (inside the budget): they stay asleep."""
    per_sequence: int = 384_000
    """The sampler's peak per sequence in the profile run (``_dummy_sampler_run`` over
    ``--max-num-seqs``): float32 logits of a 32k vocabulary, three copies."""

    @property
    def kept_asleep(self) -> int:
        return self.context + self.graph_pool

    def non_kv(self, sequences: int = 1) -> int:
        return self.weights + self.activation_peak + self.non_torch + sequences * self.per_sequence


def _context_and_startup_check(device: SimDevice, utilization: float, engine: EngineModel, pid: int) -> int:
    """Steps 1-2 of the module docstring: the context made, then vLLM's check that the device has
    its requested memory free. Returns the requested bytes; on a refusal the device is as before."""
    if device.cuda_free < engine.context:
        raise VllmRefused("CUDA out of memory while creating the context")
    device.processes[pid] = engine.context
    requested = math.ceil(device.cuda_total * utilization)
    free = device.cuda_free
    if free < requested:
        del device.processes[pid]
        raise VllmRefused(
            f"Free memory on device ({free / GIB:.2f}/{device.cuda_total / GIB:.2f} GiB) on startup is less than "
            f"desired GPU memory utilization ({utilization}, {requested / GIB:.2f} GiB)"
        )
    return requested


def vllm_start(device: SimDevice, utilization: float, engine: EngineModel, pid: int, sequences: int = 1) -> int:
    """Starts an engine on ``device`` the way vLLM does (module docstring); returns its KV cache
    bytes, or raises ``VllmRefused`` with vLLM's message (the device is then as before)."""
    requested = _context_and_startup_check(device, utilization, engine, pid)
    kv = requested - engine.non_kv(sequences)
    if kv <= 0:
        del device.processes[pid]
        raise VllmRefused("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`")
    device.processes[pid] = engine.context + requested
    return kv


def vllm_start_mps(
    device: SimDevice, utilization: float, kv_cache: int, limit: int, engine: EngineModel, pid: int, sequences: int = 1
) -> int:
    """Starts an engine as an MPS client with ``--kv-cache-memory-bytes`` and a pinned device memory
    limit (``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``): vLLM's start-up check of free memory as above,
    then it holds its context, what it needs besides its KV cache, and that fixed KV cache; an
    allocation past the limit fails as CUDA's out-of-memory error. Returns its KV cache bytes."""
    _context_and_startup_check(device, utilization, engine, pid)
    held = engine.context + engine.non_kv(sequences) + kv_cache
    if held > limit or held - engine.context > device.cuda_free:
        del device.processes[pid]
        raise VllmRefused(
            f"CUDA error: out of memory ({held / GIB:.2f} GiB wanted; MPS limit {limit / GIB:.2f} GiB, "
            f"{device.cuda_free / GIB:.2f} GiB free)"
        )
    device.processes[pid] = held
    return kv_cache


def vllm_start_log(kv: int) -> str:
    """The line vLLM's GPU worker logs after its profile (``determine_available_memory``), in its
    format (``format_gib``: GiB rounded to two decimals)."""
    return f"INFO 12-06 10:00:00 [gpu_worker.py:760] Available KV cache memory: {round(kv / GIB, 2)} GiB\n"


def vllm_stop(device: SimDevice, pid: int) -> None:
    device.processes.pop(pid, None)


def vllm_sleep(device: SimDevice, pid: int, engine: EngineModel) -> None:
    """Level 1: its context, graph pools and tensors outside the cuMem pools stay on the device."""
    device.processes[pid] = engine.kept_asleep


def vllm_wake(device: SimDevice, pid: int, engine: EngineModel, budget: int) -> None:
    """Maps the engine's pools again, its weights then its KV cache, one allocation at a time:
    short of memory, what was mapped stays mapped and CUDA's error is raised."""
    pools = [engine.weights, budget - engine.graph_pool - engine.weights]
    for size in pools:
        if device.cuda_free < size:
            raise VllmRefused(
                f"CUDA Error: out of memory at cumem_allocator.cpp ({size / GIB:.2f} GiB wanted, "
                f"{device.cuda_free / GIB:.2f} GiB free)"
            )
        device.processes[pid] += size
