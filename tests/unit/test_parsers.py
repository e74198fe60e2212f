"""A tenant's tool-call and reasoning parsers: auto picks by the model's chat template and
architecture, names are the engine's, and a parser the tokenizer cannot serve is refused before
an engine would fail to start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manager.control.parsers import (
    REASONING,
    TOOL,
    EngineParsers,
    ModelText,
    choose,
    engine_parsers,
    model_text,
    pick_reasoning,
    pick_tool,
)
from manager.control.sizing import Sizing
from manager.errors import InvalidInput
from manager.settings import Settings

QWEN25 = "{% if tools %}<tools></tools> ... <tool_call>\n{{ tool_call }}\n</tool_call>{% endif %}"
LLAMA31 = "{{- '<|start_header_id|>ipython<|end_header_id|>' }} <|python_tag|>"
MISTRAL = "[AVAILABLE_TOOLS] ... [TOOL_CALLS] [TOOL_RESULTS]"
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
THINKING = "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>"
BAR = "\N{FULLWIDTH VERTICAL LINE}"
R1_DISTILL = f"<{BAR}Assistant{BAR}><think>\n"


def model(template: str, *arch: str, tokens: tuple[str, ...] = ()) -> ModelText:
    return ModelText(arch or ("LlamaForCausalLM",), template, frozenset(tokens))


@pytest.mark.parametrize(
    ("text", "tool", "reasoning"),
    [
        (model(QWEN25, "Qwen2ForCausalLM"), "hermes", None),
        (model(THINKING, "Qwen3ForCausalLM", tokens=("<think>", "</think>")), "hermes", "qwen3"),
        (
            model(
                "<\N{FULLWIDTH VERTICAL LINE}Assistant\N{FULLWIDTH VERTICAL LINE}><think>\n",
                "Qwen2ForCausalLM",
                tokens=("<think>", "</think>"),
            ),
            None,
            "deepseek_r1",
        ),
        (model(LLAMA31, "LlamaForCausalLM"), "llama3_json", None),
        (model(MISTRAL + " [THINK]", "MistralForCausalLM"), "mistral", "mistral"),
        (model("<function=x>", "Qwen3MoeForCausalLM"), "qwen3_coder", None),
        (model(CHATML), None, None),
    ],
)
def test_auto_picks_by_the_chat_template_and_architecture(text: ModelText, tool: str, reasoning: str) -> None:
    assert (pick_tool(text), pick_reasoning(text)) == (tool, reasoning)


def test_a_name_is_checked_against_the_engines_list() -> None:
    assert choose(TOOL, "hermes", "m", model(CHATML)) == "hermes"
    assert choose(TOOL, "none", "m", model(QWEN25)) is None and choose(REASONING, None, "m", model(CHATML)) is None
    with pytest.raises(
        InvalidInput, match=r"unknown --tool-call-parser 'hermez': the engine's tool parsers are .*hermes"
    ):
        choose(TOOL, "hermez", "m", model(CHATML))
    with pytest.raises(InvalidInput, match="--reasoning-parser auto found no reasoning parser for model 'm'"):
        choose(REASONING, "auto", "m", model(CHATML))


def test_a_parser_whose_tokens_the_tokenizer_lacks_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidInput, match="--reasoning-parser qwen3 needs the tokens <think> </think>, which"):
        choose(REASONING, "qwen3", "demo", model(CHATML, tokens=("<|im_start|>",)))
    with pytest.raises(InvalidInput, match=r"--tool-call-parser llama3_json needs the token <\|python_tag\|>"):
        choose(TOOL, "llama3_json", "demo", model(CHATML, tokens=("<|im_start|>",)))
    assert choose(REASONING, "auto", "q", model(THINKING, "Qwen3ForCausalLM", tokens=("<think>", "</think>"))) == (
        "qwen3"
    )


def test_the_model_is_read_from_its_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": THINKING, "added_tokens_decoder": {"7": {"content": "<think>"}}})
    )
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"added_tokens": [{"content": "</think>"}], "model": {"vocab": {"<tool_call>": 1, "a": 2}}})
    )
    text = model_text(tmp_path)
    assert text.architectures == ("Qwen3ForCausalLM",) and "<tool_call>" in text.chat_template
    assert {"<think>", "</think>", "<tool_call>"} <= text.tokens and "a" not in text.tokens
    chosen = engine_parsers("auto", "auto", "q3", lambda: model_text(tmp_path))
    assert chosen == EngineParsers("hermes", "qwen3")
    assert chosen.args() == [
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--tool-strict-level", "parameter",
        "--reasoning-parser", "qwen3",
    ]  # fmt: skip
    assert engine_parsers(None, None, "q3", lambda: text).args() == []


def test_a_template_in_its_own_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text(QWEN25)
    assert pick_tool(model_text(tmp_path)) == "hermes"


def test_a_models_text_is_read_again_only_when_its_files_change(settings: Settings) -> None:
    model = settings.models_dir / "tooly"
    model.mkdir(parents=True)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    sizing = Sizing(settings)
    first = sizing.model_text("tooly")
    assert sizing.model_text("tooly") is first and pick_tool(first) is None
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN25 + " "}))
    assert pick_tool(sizing.model_text("tooly")) == "hermes"
