import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from manager.control.modelfit import (
    IMAGE_DECODE_BYTES_PER_PIXEL,
    image_allowance,
    kv_bytes_per_token,
    read_footprint,
    resizes_by_pixels,
    takes_images,
    vision_parameters,
)
from manager.control.sizing import Sizing
from manager.domain import TenantSpec
from manager.errors import InvalidInput, NotFound
from manager.platform import PLATFORMS
from manager.settings import Settings

from .conftest import write_model

CONFIG = {
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_size": 256,
}


def test_weights_from_headers_counted_as_served_bf16(tmp_path: Path) -> None:
    write_model(tmp_path, "tiny", {"a": ("F32", [1000, 256]), "b": ("F32", [256])}, CONFIG)
    fp = read_footprint(tmp_path, "tiny")
    assert fp.parameters == 256_256
    assert fp.weight_bytes == 256_256 * 2  # float32 on disk, bfloat16 when served
    assert fp.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2
    # no intermediate_size or vocab_size stated: 4 x hidden and 32,000 (transformers' defaults)
    assert fp.activation_bytes_per_token == (5 * 256 + 3 * 1024) * 2
    assert fp.logits_bytes_per_sequence == 32_000 * 4


def test_quantized_checkpoint_counts_stored_bytes(tmp_path: Path) -> None:
    write_model(tmp_path, "q", {"w": ("I8", [1000, 1000])}, CONFIG)
    assert read_footprint(tmp_path, "q", quantized=True).weight_bytes == 1_000_000


def test_head_dim_derived_from_hidden_size(tmp_path: Path) -> None:
    cfg = {"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 512}
    write_model(tmp_path, "m", {"w": ("BF16", [8])}, cfg)
    assert read_footprint(tmp_path, "m").kv_bytes_per_token == 2 * 4 * 8 * 64 * 2


def test_missing_model_lists_what_is_there(tmp_path: Path) -> None:
    write_model(tmp_path, "demo", {"w": ("BF16", [8])}, CONFIG)
    with pytest.raises(NotFound, match="available: demo"):
        read_footprint(tmp_path, "llama-70b")


def test_model_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="safetensors"):
        read_footprint(tmp_path, "empty")


# ---------------------------------------------------------------- vision families, on published configs
VISION_CONFIGS = Path(__file__).parent.parent / "fixtures" / "vision-configs"


def vision_config(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((VISION_CONFIGS / f"{name}.json").read_text())
    return loaded


@pytest.mark.parametrize(
    ("name", "tower_millions", "kv_kib_per_token"),
    [
        # published vision tower sizes: Qwen2.5-VL's 675M ViT and merger; Qwen3-VL-8B's SigLIP-2 400M
        # tower with its merger and three deepstack mergers; Idefics3's SigLIP so400m without its
        # pooling head plus the connector; LLaVA-1.5's CLIP ViT-L/14-336 (304M) plus its projector
        ("qwen2.5-vl-7b", 676, 56),
        ("qwen3-vl-8b", 576, 144),
        ("idefics3-8b", 430, 128),
        ("llava-1.5-7b", 324, 512),
    ],
)
def test_the_catalog_knows_the_vision_families_from_their_configs(
    name: str, tower_millions: int, kv_kib_per_token: int
) -> None:
    config = vision_config(name)
    assert takes_images(config)
    assert vision_parameters(config) == pytest.approx(tower_millions * 1e6, rel=0.03)
    # llava's text_config names no layers or heads: LlamaConfig's defaults (32 x 32, hidden 4096)
    assert kv_bytes_per_token(config) == kv_kib_per_token * 1024


def test_qwen_vl_processors_take_the_tenants_pixel_limit_and_the_others_are_left_alone(tmp_path: Path) -> None:
    """Qwen-VL's processor resizes every image to at most ``max_pixels`` and vLLM profiles the
    largest image at it: its engine is given the tenant's limit. Other processors take no such
    argument, and are given none."""
    assert resizes_by_pixels(vision_config("qwen2.5-vl-7b")) and resizes_by_pixels(vision_config("qwen3-vl-8b"))
    assert not resizes_by_pixels(vision_config("idefics3-8b")) and not resizes_by_pixels(vision_config("llava-1.5-7b"))
    settings = Settings(gpu_mode="nvml", state_dir=tmp_path, models_dir=tmp_path / "models")
    config = vision_config("qwen3-vl-8b")
    write_model(settings.models_dir, "qwen3-vl", {"w": ("BF16", [1024, 1024])}, config)
    spec = TenantSpec(
        name="vl", port=30001, gpu_memory=24 * 1024**3, model="qwen3-vl", max_model_len=4096, max_images=2
    )
    sizing = Sizing(settings)
    assert sizing.fit(replace(spec, max_image_pixels=4_000_000)).image_pixels == 4_000_000
    assert sizing.fit(replace(spec, max_images=0)).image_pixels == 0, "no images, no processor"


def test_a_vision_tenants_image_allowance_follows_the_mode_and_its_limits() -> None:
    qwen = vision_config("qwen2.5-vl-7b")
    # nvml: the profiling run's vision peak, 1.3 x the tower's bf16 weights (Qwen2.5-VL-7B: ~1.7 GB
    # against 1.35 GB), and Qwen3-VL's deepstack features beside it
    assert image_allowance(qwen, PLATFORMS["nvml"], 4, 12_582_912) == int(vision_parameters(qwen) * 2 * 1.3)
    assert 1.6e9 < image_allowance(qwen, PLATFORMS["nvml"], 4, 12_582_912) < 1.9e9
    small = vision_config("llava-1.5-7b")
    assert image_allowance(small, PLATFORMS["nvml"], 4, 12_582_912) == int(vision_parameters(small) * 2 * 1.3)
    qwen3 = vision_config("qwen3-vl-8b")
    with_deepstack = int(vision_parameters(qwen3) * 2 * 1.3) + 512 * 1024**2
    assert image_allowance(qwen3, PLATFORMS["nvml"], 4, 12_582_912) == with_deepstack
    # cpu: decoding every image of one request, inside the engine's memory limit
    assert image_allowance(qwen, PLATFORMS["cpu"], 4, 12_582_912) == 4 * 12_582_912 * IMAGE_DECODE_BYTES_PER_PIXEL
    assert image_allowance(qwen, PLATFORMS["cpu"], 1, 1_000_000) == 21_000_000
    # no images taken, or a text model: nothing
    assert image_allowance(qwen, PLATFORMS["cpu"], 0, 12_582_912) == 0
    text = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}
    assert not takes_images(text) and vision_parameters(text) == 0
    assert image_allowance(text, PLATFORMS["nvml"], 4, 12_582_912) == 0


def test_the_models_own_context_limit_as_vllm_derives_it() -> None:
    from manager.control.modelfit import max_positions

    assert max_positions({"max_position_embeddings": 2048}) == 2048
    assert max_positions({"text_config": {"max_position_embeddings": 4096}}) == 4096  # a vision model's text model
    yarn = {"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    assert max_positions(yarn) == 131072
    llama3 = {"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert max_positions(llama3) == 131072  # already the scaled length
    assert max_positions({"n_positions": 1024, "max_position_embeddings": 2048}) == 1024
    assert max_positions({}) is None
