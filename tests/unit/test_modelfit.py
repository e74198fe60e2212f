from pathlib import Path

import pytest

from manager.control.modelfit import read_footprint
from manager.errors import InvalidInput, NotFound

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
    assert fp.minimum(tokens=512, overhead=100) == 256_256 * 2 + 1024 * 512 + 100


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
