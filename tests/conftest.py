"""Shared test configuration: the gpu marker skips itself where no NVIDIA GPU is present."""

from __future__ import annotations

import shutil

import pytest


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with a driver (run on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
