"""--quant as admins type it: the int4 rule, unknown names, checkpoints that do not match."""

from __future__ import annotations

from typing import Any

import pytest

from manager.control.quant import ENGINE_METHODS, checkpoint_method, resolve
from manager.errors import InvalidInput
from manager.platform import PLATFORMS

PLAIN: dict[str, Any] = {"architectures": ["LlamaForCausalLM"]}
AWQ4 = {**PLAIN, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
GPTQ8 = {**PLAIN, "quantization_config": {"quant_method": "gptq", "bits": 8}}
CT4 = {
    **PLAIN,
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "config_groups": {"g0": {"weights": {"num_bits": 4}}},
    },
}


@pytest.mark.parametrize(("config", "expected"), [(AWQ4, "awq"), (CT4, "compressed-tensors")])
def test_int4_maps_to_the_checkpoints_own_4_bit_method(config: dict[str, Any], expected: str) -> None:
    for spelled in ("int4", "INT4", "4bit", "q4"):
        assert resolve(spelled, "m", config, PLATFORMS["nvml"]) == expected


@pytest.mark.parametrize(("config", "says"), [(PLAIN, "is not quantized"), (GPTQ8, "8-bit gptq checkpoint")])
def test_int4_of_anything_else_is_refused_with_what_the_model_is(config: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidInput, match=says):
        resolve("int4", "m", config, PLATFORMS["cpu"])


def test_an_unknown_method_is_refused_with_the_list() -> None:
    with pytest.raises(InvalidInput, match="unknown --quant 'int9'") as refused:
        resolve("int9", "m", PLAIN, PLATFORMS["cpu"])
    assert "awq" in refused.value.message and "int4" in refused.value.message


def test_a_pre_quantized_method_needs_such_a_checkpoint() -> None:
    with pytest.raises(InvalidInput, match="is not quantized"):
        resolve("awq", "m", PLAIN, PLATFORMS["nvml"])
    with pytest.raises(InvalidInput, match="which is a awq checkpoint"):
        resolve("gptq", "m", AWQ4, PLATFORMS["nvml"])
    assert resolve("awq_marlin", "m", AWQ4, PLATFORMS["nvml"]) == "awq_marlin"


def test_fp8_needs_a_gpu() -> None:
    with pytest.raises(InvalidInput, match="needs a GPU"):
        resolve("fp8", "m", PLAIN, PLATFORMS["cpu"])
    assert resolve("fp8", "m", PLAIN, PLATFORMS["nvml"]) == "fp8"


def test_no_quant_leaves_the_checkpoint_to_the_engine() -> None:
    assert resolve(None, "m", AWQ4, PLATFORMS["cpu"]) is None
    assert checkpoint_method(AWQ4) == ("awq", 4) and checkpoint_method(PLAIN) is None
    assert "awq" in ENGINE_METHODS
