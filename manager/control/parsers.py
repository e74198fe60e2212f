"""A tenant's tool-call and reasoning parsers: the engine's own names, ``auto`` chosen from the
model's architecture and chat template, and the special tokens a parser needs from the tokenizer.

vLLM turns a model's text into ``tool_calls`` and ``reasoning_content`` only when it is started
with ``--enable-auto-tool-choice --tool-call-parser NAME`` and ``--reasoning-parser NAME``, and it
refuses to start when the tokenizer lacks a token the parser needs. The names are vLLM 0.32's
registries (the engine image's version; ``tests/integration/test_engine_image.py`` reads the
engine's own lists and compares). Everything here is pure but ``model_text``, which reads the
model's files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manager.errors import InvalidInput

AUTO, NONE = "auto", "none"

TOOL_PARSERS = frozenset(
    [
        "apertus",
        "cohere_command3",
        "cohere_command4",
        "deepseek_v3",
        "deepseek_v31",
        "deepseek_v32",
        "deepseek_v4",
        "deepseek_v41",
        "dots",
        "ernie45",
        "functiongemma",
        "gemma4",
        "gigachat3",
        "glm45",
        "glm47",
        "granite",
        "granite-20b-fc",
        "granite4",
        "hermes",
        "hf",
        "hunyuan_a13b",
        "hy_v3",
        "hy_v4",
        "inkling",
        "internlm",
        "jamba",
        "k2_horizon",
        "kimi_k2",
        "kimi_k3",
        "lfm2",
        "ling3",
        "llama3_json",
        "llama4_json",
        "llama4_pythonic",
        "longcat",
        "mimo",
        "minicpm5",
        "minimax_m2",
        "minimax_m3",
        "mistral",
        "muse_glimmer",
        "olmo3",
        "openai",
        "phi4_mini_json",
        "plamo3",
        "poolside_v1",
        "pythonic",
        "qwen3_coder",
        "qwen3_json",
        "qwen3_xml",
        "seed_oss",
        "step3",
        "step3p5",
        "xlam",
    ]
)
REASONING_PARSERS = frozenset(
    [
        "cohere_command3",
        "cohere_command4",
        "deepseek_r1",
        "deepseek_v3",
        "deepseek_v4",
        "deepseek_v41",
        "ernie45",
        "gemma4",
        "glm45",
        "glm47",
        "granite",
        "granite_thinking_parser",
        "hf",
        "holo2",
        "hunyuan_a13b",
        "hy_v3",
        "hy_v4",
        "inkling",
        "k2_horizon",
        "kimi_k2",
        "kimi_k3",
        "ling3",
        "mimo",
        "minicpmv",
        "minimax_m2",
        "minimax_m2_append_think",
        "minimax_m3",
        "mistral",
        "muse_glimmer",
        "nemotron_v3",
        "olmo3",
        "openai_gptoss",
        "plamo3",
        "poolside_v1",
        "qwen3",
        "seed_oss",
        "step3",
        "step3p5",
    ]
)

NEEDS_TOKENS: dict[str, tuple[str, ...]] = {
    "tool:llama3_json": ("<|python_tag|>",),
    "tool:mistral": ("[TOOL_CALLS]",),
    "reasoning:qwen3": ("<think>", "</think>"),
    "reasoning:deepseek_r1": ("<think>", "</think>"),
    "reasoning:mistral": ("[THINK]", "[/THINK]"),
}
"""The tokens a parser looks up in the tokenizer when the engine starts (the parsers'
constructors in vLLM 0.32); the engine refuses to start without them."""


@dataclass(frozen=True)
class ModelText:
    """What of a model decides its parsers: its architectures, its chat template, its tokens."""

    architectures: tuple[str, ...]
    chat_template: str
    tokens: frozenset[str]
    """The tokenizer's added tokens and vocabulary (empty when it could not be read)."""


@dataclass(frozen=True)
class ParserKind:
    kind: str  # "tool" or "reasoning"
    flag: str
    names: frozenset[str]


TOOL = ParserKind("tool", "--tool-call-parser", TOOL_PARSERS)
REASONING = ParserKind("reasoning", "--reasoning-parser", REASONING_PARSERS)


def pick_tool(model: ModelText) -> str | None:
    """The tool-call parser ``auto`` means for a model: by the tool-call format its chat template
    writes (Qwen2.5/Qwen3 and Hermes: ``<tool_call>``; Llama 3.x: ``<|python_tag|>``; Mistral:
    ``[TOOL_CALLS]``), else by its architecture."""
    template, arch = model.chat_template, model.architectures
    if "<function=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if any(a.startswith("Llama4") for a in arch):
        return "llama4_pythonic"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    if any(a.startswith("Granite") for a in arch) and "tool" in template:
        return "granite"
    if any(a.startswith("InternLM2") for a in arch):
        return "internlm"
    if any(a.startswith("Phi3") for a in arch) and "<|tool_call|>" in template:
        return "phi4_mini_json"
    return None


def pick_reasoning(model: ModelText) -> str | None:
    """The reasoning parser ``auto`` means for a model: Qwen3 gets qwen3, other models whose chat
    template thinks in ``<think>`` (DeepSeek-R1 and its distills) deepseek_r1, Mistral's
    ``[THINK]`` mistral, Granite's thinking granite."""
    template, arch = model.chat_template, model.architectures
    if "<think>" in template or "<think>" in model.tokens:
        return "qwen3" if any(a.startswith("Qwen3") for a in arch) else "deepseek_r1"
    if "[THINK]" in template:
        return "mistral"
    if any(a.startswith("Granite") for a in arch) and "thinking" in template:
        return "granite"
    return None


def choose(kind: ParserKind, choice: str | None, model_name: str, model: ModelText) -> str | None:
    """The parser the engine is started with for the admin's ``choice`` (a name, ``auto``, or
    ``none``/None: off); InvalidInput saying what to do when it cannot be."""
    if choice is None or choice.strip().lower() in ("", NONE):
        return None
    name = choice.strip()
    if name.lower() == AUTO:
        picked = (pick_tool if kind is TOOL else pick_reasoning)(model)
        if picked is None:
            raise InvalidInput(
                f"{kind.flag} auto found no {kind.kind} parser for model {model_name!r}: its chat template "
                f"writes no {kind.kind} format this manager knows; name one of the engine's: "
                f"{', '.join(sorted(kind.names))} (or none)"
            )
        name = picked
    if name not in kind.names:
        raise InvalidInput(
            f"unknown {kind.flag} {name!r}: the engine's {kind.kind} parsers are "
            f"{', '.join(sorted(kind.names))} (or auto, or none)"
        )
    missing = [t for t in NEEDS_TOKENS.get(f"{kind.kind}:{name}", ()) if model.tokens and t not in model.tokens]
    if missing:
        raise InvalidInput(
            f"{kind.flag} {name} needs the token{'s' if len(missing) > 1 else ''} {' '.join(missing)}, which "
            f"the tokenizer of model {model_name!r} lacks (the engine would not start); pick another parser, or none"
        )
    return name


@dataclass(frozen=True)
class EngineParsers:
    """The parsers an engine is started with (None: off)."""

    tool: str | None = None
    reasoning: str | None = None

    def args(self) -> list[str]:
        """The engine's flags. A tool call's arguments are held to its tool's schema whether or not
        the request marks it ``strict`` (``--tool-strict-level parameter``): an agent never gets
        arguments its tool cannot take."""
        out = []
        if self.tool:
            out += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool, "--tool-strict-level", "parameter"]
        if self.reasoning:
            out += ["--reasoning-parser", self.reasoning]
        return out


def engine_parsers(
    tool: str | None, reasoning: str | None, model_name: str, read: Callable[[], ModelText]
) -> EngineParsers:
    """The parsers for a tenant's choices, ``auto`` resolved against its model (``read`` only when
    a parser is chosen)."""
    if not tool and not reasoning:
        return EngineParsers()
    model = read()
    return EngineParsers(choose(TOOL, tool, model_name, model), choose(REASONING, reasoning, model_name, model))


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_text(model_dir: Path) -> ModelText:
    """A model directory's architectures, chat template and tokens (what is missing: empty)."""
    config = _json(model_dir / "config.json")
    tokenizer_config = _json(model_dir / "tokenizer_config.json")
    template = tokenizer_config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = " ".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    jinja = model_dir / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text(errors="replace")
    tokenizer = _json(model_dir / "tokenizer.json")
    tokens = {str(t.get("content")) for t in tokenizer.get("added_tokens", []) if isinstance(t, dict)}
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        tokens |= {t for t in vocab if t.startswith(("<", "["))}  # the special-looking ones are enough
    for entry in (tokenizer_config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("content"):
            tokens.add(str(entry["content"]))
    architectures = tuple(str(a) for a in config.get("architectures") or ())
    return ModelText(architectures, str(template), frozenset(tokens))
