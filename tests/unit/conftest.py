from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from manager.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(gpu_mode="cpu", state_dir=tmp_path / "state", models_dir=tmp_path / "models",
                    models_source="gtm-models", instance="gtm")


def write_model(models: Path, name: str, tensors: dict[str, tuple[str, list[int]]], config: dict[str, int]) -> Path:
    """A safetensors file with the given tensor headers (zero-filled data) and a config.json."""
    directory = models / name
    directory.mkdir(parents=True)
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}
    header: dict[str, object] = {}
    offset = 0
    for tname, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[tname] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    (directory / "config.json").write_text(json.dumps(config))
    return directory
