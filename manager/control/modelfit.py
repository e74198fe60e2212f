"""How much memory a model needs at the least, read from its own files.

Weights come from the safetensors headers (tensor shapes, not file sizes, so a
float32 checkpoint served in bfloat16 counts as bfloat16); the KV cache per token
from config.json. Nothing here loads a tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manager.errors import InvalidInput, NotFound

SERVED_BYTES_PER_PARAM = 2  # bfloat16/float16, what vLLM serves unquantized checkpoints in
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelFootprint:
    name: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int

    def minimum(self, tokens: int, overhead: int) -> int:
        return self.weight_bytes + self.kv_bytes_per_token * tokens + overhead


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise InvalidInput(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER:
            raise InvalidInput(f"{path.name}: safetensors header of {length} bytes is implausible")
        header: dict[str, Any] = json.loads(fh.read(length))
    return header


def _model_dir(models_dir: Path, model: str) -> Path:
    directory = models_dir / model
    if "/" in model or model.startswith(".") or not directory.is_dir():
        available = sorted(p.name for p in models_dir.iterdir() if p.is_dir()) if models_dir.is_dir() else []
        raise NotFound(
            f"model {model!r} not found under {models_dir}; available: {', '.join(available) or 'none'}. "
            "Put the model's directory (config.json + *.safetensors) into the models volume"
        )
    return directory


def read_config(models_dir: Path, model: str) -> dict[str, Any]:
    """The model's config.json (NotFound for a model that is not there)."""
    path = _model_dir(models_dir, model) / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidInput(f"model {model!r} has no config.json") from exc
    except ValueError as exc:
        raise InvalidInput(f"model {model!r}: config.json is not valid JSON ({exc})") from exc
    return config


def read_footprint(models_dir: Path, model: str, *, quantized: bool = False) -> ModelFootprint:
    directory = _model_dir(models_dir, model)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"model {model!r} has no *.safetensors files; only safetensors checkpoints are served")
    params = 0
    stored = 0
    for path in files:
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            params += math.prod(info["shape"])
            start, end = info["data_offsets"]
            stored += end - start
    weights = stored if quantized else min(stored, params * SERVED_BYTES_PER_PARAM)
    return ModelFootprint(model, params, weights, _kv_bytes_per_token(directory / "config.json"))


def _kv_bytes_per_token(config_path: Path) -> int:
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise InvalidInput(f"model has no config.json at {config_path}") from exc
    config = config.get("text_config", config)
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return 2 * layers * kv_heads * head_dim * SERVED_BYTES_PER_PARAM
