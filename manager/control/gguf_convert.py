"""Converts one GGUF file into a Hugging Face model folder. It runs in the converter container
(``Settings.converter_image``: the CPU engine image, which has torch, transformers, gguf and
accelerate), never in the manager, which reads this file as text (``plan.convert_plan``):

    python3 -c "<this file>" SOURCE.gguf OUT_DIR

transformers reads the file (its GGUF loader dequantises every tensor through the gguf package),
and the model is saved as bfloat16 safetensors beside its tokenizer and chat template: the
folder vLLM serves. Nothing here decodes a quantised block itself.

Its answer is the last line of stdout, ``GTM-CONVERT {json}``: ``{"ok": true, ...facts}``, or
``{"ok": false, "reason": ...}`` with exit status 2 when the file cannot be converted (the reason
says what to do). Only the standard library is imported at module level.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

MARKER = "GTM-CONVERT "
SOURCE, OUT = "source.gguf", "model"
"""The file and the folder the converter reads and writes, in the staging folder of an import."""
NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "umt5"}
"""Entries of transformers' GGUF table that are not a causal language model vLLM could serve."""


def answer(facts: dict[str, Any], code: int = 0) -> NoReturn:
    sys.stdout.flush()
    print(MARKER + json.dumps(facts), flush=True)
    sys.exit(code)


def refuse(reason: str) -> NoReturn:
    answer({"ok": False, "reason": reason}, 2)


def convert(source: str, out: str) -> dict[str, Any]:
    started = time.monotonic()
    import gguf

    try:
        reader = gguf.GGUFReader(source)
    except Exception as exc:  # the reader's own error: a short file fails reshaping its tensors
        refuse(f"it is not a complete GGUF file ({str(exc)[:200]}); it may be truncated: copy it again")

    def field(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    architecture = str(field("general.architecture") or "")
    from transformers.modeling_gguf_pytorch_utils import (
        GGUF_SUPPORTED_ARCHITECTURES,
    )

    convertible = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - NOT_CAUSAL_LM)
    if not architecture:
        refuse("it names no architecture (general.architecture); it is not a model file llama.cpp wrote")
    if field("tokenizer.ggml.model") is None:
        refuse(
            "it holds no tokenizer (no tokenizer.ggml.* fields), so no text can be encoded; export it "
            "again with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes one)"
        )
    file_type = field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quantization = str(file_type)

    from importlib.metadata import version

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
    except ValueError as exc:
        if "not supported" in str(exc) or architecture not in convertible:
            refuse(
                f"transformers {transformers.__version__} cannot convert its architecture {architecture!r} "
                f"from GGUF; it converts: {', '.join(convertible)}. Import the model's Hugging Face "
                "directory instead (import-model DIR)"
            )
        raise
    # a model loaded from GGUF is marked as quantised and transformers will not save it; the same
    # weights, already dequantised, are moved into a plain model of the same config and saved
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    parameters = sum(p.numel() for p in plain.parameters())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    folder_out = Path(out)
    for path in [folder_out, *folder_out.rglob("*")]:  # engines run as another user: readable by all
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {
        "ok": True,
        "gguf_architecture": architecture,
        "architecture": type(plain).__name__,
        "quantization": quantization,
        "parameters": parameters,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "converted_with": f"transformers {transformers.__version__}, gguf {version('gguf')}",
        "seconds": round(time.monotonic() - started, 1),
    }


if __name__ == "__main__":
    if len(sys.argv) != 3:
        refuse("usage: gguf_convert SOURCE.gguf OUT_DIR")
    answer(convert(sys.argv[1], sys.argv[2]))
