"""One platform object answers what differs between a GPU host and a host-memory one; the rest of
the product asks it, and no module tests the mode's name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from manager.errors import GpuUnavailable
from manager.platform import PLATFORMS, HostMemory, Nvidia, Platform, platform_of
from manager.settings import Settings

ROOT = Path(__file__).resolve().parents[2] / "manager"
G = 1024**3


@pytest.mark.parametrize("platform", PLATFORMS.values(), ids=lambda p: p.name)
def test_every_platform_answers_every_question(platform: Platform) -> None:
    assert platform_of(platform.name) is platform
    assert isinstance(platform.engine_args(2 * G, 80 * G, G), list)
    assert isinstance(platform.engine_env(), dict)
    assert platform.process_overhead(512) in (0, 512)
    assert (
        (platform.kept_asleep(512) >= platform.process_overhead(512))
        if platform.sleeps_in_place
        else (platform.kept_asleep(512) == 0)
    )
    assert platform.engine_overhead > 0


def test_host_memory_reserves_the_engines_whole_memory() -> None:
    cpu = HostMemory()
    assert cpu.memory_limit(2 * G, 5 * G) == 2 * G and cpu.devices("GPU-1") is None
    assert cpu.process_overhead(512) == 0 and cpu.kept_asleep(512) == 0 and not cpu.sleeps_in_place
    assert "--kv-cache-memory-bytes" in cpu.engine_args(2 * G, 24 * G, G)
    assert cpu.engine_env() == {"TORCHDYNAMO_DISABLE": "1"}


def test_a_gpu_engine_gets_its_fraction_its_device_and_sleeps_in_place() -> None:
    gpu = Nvidia()
    args = gpu.engine_args(8 * G, 80 * G, 0)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.1000" and "--enable-sleep-mode" in args
    assert gpu.memory_limit(8 * G, 5 * G) == 5 * G and gpu.devices("MIG-1") == ["MIG-1"] and gpu.devices(None) == ["0"]
    # a sleeper keeps its context and its CUDA graph pools (1.5 GiB until measured), or what the admin set
    assert gpu.process_overhead(512) == 512 and gpu.kept_asleep(512) == 512 + 1536 * 1024**2
    assert gpu.kept_asleep(512, configured=3 * 1024**3) == 3 * 1024**3
    assert gpu.engine_env()["VLLM_SERVER_DEV_MODE"] == "1"


def test_the_mode_is_chosen_explicitly() -> None:
    with pytest.raises(GpuUnavailable, match="GTM_GPU_MODE"):
        platform_of(None)
    assert Settings(gpu_mode="nvml").engine_pids_limit == Nvidia.pids_limit
    assert Settings(gpu_mode="cpu").effective_engine_overhead == HostMemory.engine_overhead


def test_no_module_asks_for_the_modes_name() -> None:
    asking = re.compile(r"""(==|!=)\s*["'](cpu|nvml)["']|gpu_mode\s*(==|!=)""")
    found = [
        f"{path.relative_to(ROOT.parent)}:{n}"
        for path in ROOT.rglob("*.py")
        if path.name not in ("platform.py", "settings.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if asking.search(line)
    ]
    assert not found, "ask the platform (manager.platform) instead: " + ", ".join(found)
