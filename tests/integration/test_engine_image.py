"""The CPU engine image: its parser registries are the manager's lists, and its reasoning
parsers split thinking from the answer; ``assert_isolated``, the network check the engine tests
use (an engine serving on its internal network, hardened: test_control_plane.py)."""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import docker
import pytest

from manager.control.parsers import REASONING_PARSERS, TOOL_PARSERS
from manager.names import Role, labels

from .conftest import ENGINE_IMAGE, MANAGER_IMAGE, TEST_PREFIX, remove_instance, run_probe
from .probes import CONNECT


def assert_isolated(client: docker.DockerClient, instance: str, container: str, *extra: str) -> None:
    """``container`` cannot connect to a listener on another Docker network, nor to a
    listener on this host (through the default bridge's address), nor to ``extra``;
    containers on those networks reach them, so the check can tell."""
    other = client.networks.create(f"{instance}-other", labels=labels(instance, Role.NETWORK))
    client.containers.run(
        MANAGER_IMAGE,
        entrypoint=["python3", "-m", "http.server", "9000"],
        network=other.name,
        detach=True,
        labels=labels(instance, Role.PROBE),
        name=f"{instance}-listener",
    )
    listener = client.containers.get(f"{instance}-listener")
    listener_ip = listener.attrs["NetworkSettings"]["Networks"][other.name]["IPAddress"]
    ipam = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    host_ip = ipam.get("Gateway") or str(next(ipaddress.ip_network(ipam["Subnet"]).hosts()))
    with host_listener() as port:
        targets = [f"{listener_ip}:9000", f"{host_ip}:{port}", *extra]
        code = CONNECT.format(targets=targets)
        from_engine = json.loads(
            client.containers.get(container).exec_run(["python3", "-c", code]).output.decode().strip().splitlines()[-1]
        )
        control = {
            **json.loads(
                run_probe(client, instance, other.name, CONNECT.format(targets=targets[:1])).strip().splitlines()[-1]
            ),
            **json.loads(
                run_probe(client, instance, "bridge", CONNECT.format(targets=targets[1:2])).strip().splitlines()[-1]
            ),
        }
    assert control == {t: "connected" for t in targets[:2]}, control
    for target in targets:
        assert from_engine[target] != "connected", f"{container} reached {target}"


@contextmanager
def host_listener() -> Iterator[int]:
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.5)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()


PARSERS = """
import json
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager

# a fixture tokenizer with a thinking model's special tokens, and what such a model writes
words = ["<think>", "</think>", "the", "capital", "of", "France", "Paris", "[UNK]"]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}])
split = {}
for name in ("qwen3", "deepseek_r1"):
    parser = ReasoningParserManager.get_reasoning_parser(name)(tokenizer)
    whole = parser.extract_reasoning("<think>the capital of France</think>Paris", request)
    ids, before, reasoning, content = [], "", "", ""
    for piece in ["<think>", "the ", "capital ", "of ", "France", "</think>", "Paris"]:  # streamed, token by token
        new = tokenizer.encode(piece.strip(), add_special_tokens=False)
        delta = parser.extract_reasoning_streaming(before, before + piece, piece, list(ids), ids + new, new)
        ids, before = ids + new, before + piece
        if delta is not None:
            reasoning += delta.reasoning or ""
            content += delta.content or ""
    split[name] = [list(whole), [reasoning, content]]
tools = sorted(ToolParserManager.list_registered())
print(json.dumps([tools, sorted(ReasoningParserManager.list_registered()), split]))
"""


@pytest.fixture(scope="module")
def engine_parsers(docker_client: docker.DockerClient) -> Iterator[list[Any]]:
    """The engine image's parser registries, and what its reasoning parsers make of a thinking
    model's output: read once, in a one-off container without a network (no engine starts)."""
    inst = TEST_PREFIX + secrets.token_hex(4)
    try:
        out = docker_client.containers.run(
            ENGINE_IMAGE,
            ["-c", PARSERS],
            entrypoint="python3",
            network_mode="none",
            labels=labels(inst, Role.PROBE),
            remove=True,
            stderr=False,
        )
        yield json.loads(out.decode().strip().splitlines()[-1])
    finally:
        remove_instance(docker_client, lambda i: i == inst)


def test_the_managers_parser_lists_are_the_engines_own(engine_parsers: list[Any]) -> None:
    """What add-tenant accepts as --tool-call-parser and --reasoning-parser is what the engine image
    registers: a rebuilt engine of another vLLM release that differs fails here first."""
    tools, reasoning, _ = engine_parsers
    assert (set(tools), set(reasoning)) == (set(TOOL_PARSERS), set(REASONING_PARSERS))


def test_the_reasoning_parsers_auto_picks_split_thinking_from_the_answer(engine_parsers: list[Any]) -> None:
    """The parsers ``--reasoning-parser auto`` picks for thinking models (qwen3 for Qwen3,
    deepseek_r1 for DeepSeek-R1 distills) put the thinking in ``reasoning`` and the answer in
    ``content``, whole and streamed. No thinking model can be fetched here: a fixture tokenizer
    with their special tokens stands in for one, and the text is what such a model writes."""
    split = engine_parsers[2]
    expected = [["the capital of France", "Paris"], ["the capital of France", "Paris"]]
    assert split == {"qwen3": expected, "deepseek_r1": expected}
