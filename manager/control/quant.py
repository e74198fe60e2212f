"""``--quant`` as admins type it, checked against the engine and the model before anything
is created.

The rule for ``int4`` (also ``4bit``, ``q4``): a checkpoint that is already quantized to 4
bits (AWQ, GPTQ or compressed-tensors, read from its config.json) is served with its own
method; otherwise the request is refused. The CPU engine build offers no in-flight 4-bit
method, and on GPUs the upstream engine's in-flight methods are left to an explicit
``--quant`` name. A method that needs a pre-quantized checkpoint is refused for a model
that is not one, FP8 methods are refused in cpu mode, and an unknown name is refused with
the list of those there are. Nothing here imports vLLM: the list is the engine's, pinned
with its version.
"""

from __future__ import annotations

from typing import Any

from manager.errors import InvalidInput
from manager.platform import Platform

ENGINE_METHODS = frozenset({
    "auto_awq", "auto_gptq", "awq", "awq_marlin", "compressed-tensors", "deepseek_v4_fp8", "experts_int8",
    "fbgemm_fp8", "fp8", "fp8_per_block", "fp8_per_channel", "fp8_per_tensor", "fp_quant", "gpt_oss_mxfp4",
    "gptq", "gptq_marlin", "humming", "inc", "int8_per_channel_weight_only", "modelopt", "modelopt_fp4",
    "modelopt_mixed", "modelopt_mxfp8", "moe_wna16", "mxfp4", "mxfp8", "nvfp4_per_token", "online", "quark",
    "torchao",
})  # fmt: skip
"""vLLM 0.32's quantization methods (``vllm.model_executor.layers.quantization.QUANTIZATION_METHODS``)."""
PRE_QUANTIZED = frozenset({
    "auto_awq", "auto_gptq", "awq", "awq_marlin", "compressed-tensors", "gptq", "gptq_marlin", "modelopt",
    "modelopt_fp4", "modelopt_mixed", "modelopt_mxfp8", "quark", "gpt_oss_mxfp4", "moe_wna16",
})  # fmt: skip
"""Methods that read weights a checkpoint already stores quantized."""
INT4_ALIASES = frozenset({"int4", "4bit", "4-bit", "q4", "w4a16"})
FOUR_BIT_METHODS = frozenset({"awq", "gptq", "compressed-tensors", "auto_awq", "auto_gptq"})


def checkpoint_method(config: dict[str, Any]) -> tuple[str, int | None] | None:
    """(method, bits) of a checkpoint that stores quantized weights, from its config.json."""
    qc = config.get("quantization_config") or config.get("text_config", {}).get("quantization_config")
    if not isinstance(qc, dict) or not qc.get("quant_method"):
        return None
    bits = qc.get("bits") or qc.get("w_bit")
    if bits is None:  # compressed-tensors: the weights' bits are inside its config groups
        for group in (qc.get("config_groups") or {}).values():
            bits = (group.get("weights") or {}).get("num_bits")
            break
    return str(qc["quant_method"]).lower(), int(bits) if bits is not None else None


def resolve(requested: str | None, model: str, config: dict[str, Any], platform: Platform) -> str | None:
    """The method to pass to the engine (None: the engine reads the checkpoint's own), or InvalidInput."""
    found = checkpoint_method(config)
    if requested is None:
        return None
    name = requested.strip().lower()
    if name in INT4_ALIASES:
        if found and found[0] in FOUR_BIT_METHODS and found[1] == 4:
            return found[0]
        what = f"a {found[1]}-bit {found[0]} checkpoint" if found else "not quantized"
        raise InvalidInput(
            f"--quant {requested}: model {model!r} is {what}; 4-bit serving needs a 4-bit AWQ or GPTQ checkpoint "
            "(import one with its quantization_config), and this engine offers no in-flight 4-bit method"
        )
    if name not in ENGINE_METHODS:
        raise InvalidInput(
            f"unknown --quant {requested!r}: use int4 (a 4-bit AWQ/GPTQ checkpoint) or one of the engine's "
            f"methods: {', '.join(sorted(ENGINE_METHODS))}"
        )
    if name in PRE_QUANTIZED and not found:
        raise InvalidInput(
            f"--quant {name} needs a checkpoint quantized with {name}; model {model!r} is not quantized "
            "(leave --quant out to serve it as it is)"
        )
    if found and name in PRE_QUANTIZED and not (name.startswith(found[0]) or found[0].startswith(name.split("_")[0])):
        raise InvalidInput(f"--quant {name} does not match model {model!r}, which is a {found[0]} checkpoint")
    if not platform.low_precision and ("fp8" in name or "fp4" in name or name in {"mxfp4", "mxfp8"}):
        raise InvalidInput(
            f"--quant {name} needs a GPU; this manager runs engines on CPUs (GTM_GPU_MODE={platform.name})"
        )
    return name
