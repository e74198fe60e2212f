"""The product as a new admin runs it, on one stack for the whole module.

The README's first command (scripts/up.sh) brings up the manager's compose stack with its two demo
tenants: a text engine (demo, serving SmolLM2-135M-Instruct, a real model that up.sh fetched as a
GGUF file and converted with import-model) and a vision engine (demo-vl, the Idefics3 model on a
real vLLM CPU engine behind its real gateway container). Against that stack, in file order:

- real answers, tool calls and structured output from the text tenant, through the OpenAI SDK
  and LangChain;
- the admin's `docker exec <manager> add-tenant ...` and the other commands, import-model's
  refusals of bad GGUF files included;
- images, as data: URLs, from the OpenAI SDK and LangChain to the vision tenant; the door's
  refusals leave its engine untouched; each member's prompts stay in a prefix cache of its own;
- last, up.sh again and after scripts/down.sh, which changes nothing.

One stack, so that its two engine starts are paid once in the suite's budget; each test leaves the
stack as it found it. Isolated from any real installation on the machine by its own compose
project, names, volumes and ports.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import secrets
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from PIL import Image
from pydantic import BaseModel, SecretStr

from manager import names

from .conftest import TEST_PREFIX, free_port, remove_instance, wait_for

ROOT = Path(__file__).resolve().parents[2]
VISION = "demo-vl"
VOLUMES_DIR = Path("/var/lib/gpu-tenant-manager/volumes")
"""Where up.sh's manager keeps encrypted volumes (GTM_VOLUMES_DIR's default)."""
QUESTION = "What is in this image?"
KEY_LINE = re.compile(r"^API key \(shown once, store it now\): (gtm_\S+)$", re.M)


@dataclass
class Stack:
    env: dict[str, str]
    instance: str
    docker: docker.DockerClient
    first_up: subprocess.CompletedProcess[str]
    keys: dict[str, str] = field(default_factory=dict)  # the vision tenant's members' keys
    text_key: str = ""  # the text tenant's (demo) first member's

    @property
    def manager(self) -> str:
        return self.env["GTM_MANAGER_NAME"]

    @property
    def vision_port(self) -> int:
        return int(self.env["GTM_DEMO_VL_PORT"])

    @functools.cached_property
    def admin_token(self) -> str:
        """Where the README says to find it (read once: it stays for the stack's life)."""
        return dexec(self.manager, "cat", "/var/lib/gtm/admin-token").stdout.strip()

    def api(self) -> httpx.Client:
        """The admin REST API on the console's port."""
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.env['GTM_CONSOLE_PORT']}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=120,
        )

    def client(self, member: str = VISION) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.vision_port}/v1", api_key=self.keys[member], max_retries=0, timeout=300
        )

    def text_client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.env['GTM_DEMO_PORT']}/v1",
            api_key=self.text_key,
            max_retries=0,
            timeout=300,
        )

    def text_chat(self, **options: Any) -> ChatOpenAI:
        """LangChain's chat model on the text tenant's port, at temperature 0."""
        return ChatOpenAI(
            base_url=f"http://127.0.0.1:{self.env['GTM_DEMO_PORT']}/v1",
            api_key=SecretStr(self.text_key),
            model="smollm2",
            temperature=0,
            max_retries=0,
            **options,
        )

    def engine(self) -> Any:
        return self.docker.containers.get(names.engine(self.instance, VISION))

    def engine_metric(self, name: str) -> float:
        """A counter of the engine's own /metrics, read inside its container (it has no other route)."""
        code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
        out = self.engine().exec_run(["python3", "-c", code]).output.decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith(name + "{"))


def tiny_gguf(fields: dict[str, str]) -> bytes:
    """A GGUF file (version 3) of string fields and no tensors, as llama.cpp's format lays it out."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(fields))
    for key, value in fields.items():
        k, v = key.encode(), value.encode()
        out += struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v  # 8: a string
    return out


def up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False
    )


def dexec(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", name, *args], capture_output=True, text=True, timeout=120, check=False)


def demo_tenants(env: dict[str, str]) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["docker", "exec", env["GTM_MANAGER_NAME"], "list-tenants", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [t for t in json.loads(out) if t["name"] in ("demo", VISION)]


@pytest.fixture(scope="module")
def stack(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    instance = TEST_PREFIX + secrets.token_hex(4)
    env = {
        **os.environ,
        "GTM_COMPOSE_PROJECT": instance,
        "GTM_INSTANCE": instance,
        "GTM_MANAGER_NAME": f"{instance}-manager",
        "GTM_MODELS_VOLUME": f"{instance}-models",
        "GTM_STATE_VOLUME": f"{instance}-state",
        "GTM_CONTROL_NETWORK": f"{instance}-control",
        "GTM_CONSOLE_PORT": str(free_port()),
        "GTM_DEMO_PORT": str(free_port()),
        "GTM_DEMO_VL_PORT": str(free_port()),
        "GTM_TENANT_BIND_ADDRESS": "127.0.0.1",
        "GTM_VOLUME_KEY_FILE_HOST": str(tmp_path_factory.mktemp("keys") / "volume-keys"),
    }
    try:
        first = up(env)
        found = KEY_LINE.findall(first.stdout)
        # up.sh adds demo, then demo-vl; each add-tenant prints its first member's key once
        keys = {VISION: found[1]} if len(found) == 2 else {}
        yield Stack(env, instance, docker_client, first, keys, found[0] if len(found) == 2 else "")
    finally:
        subprocess.run(
            ["bash", "scripts/down.sh", "--purge"], cwd=ROOT, env=env, capture_output=True, check=False, timeout=300
        )
        for c in docker_client.containers.list(all=True, filters={"label": f"com.docker.compose.project={instance}"}):
            c.remove(force=True)
        remove_instance(docker_client, lambda i: i == instance)


@pytest.mark.slow
def test_up_brings_up_both_demo_tenants(stack: Stack) -> None:
    first = stack.first_up
    assert first.returncode == 0, first.stderr[-2000:]
    assert "API key (shown once" in first.stdout and "the API keys printed above" in first.stdout
    assert first.stderr.count("bootstrap took") == 1
    # it returned once both demo tenants serve, showing how they got there
    assert [t["status"] for t in demo_tenants(stack.env)] == ["running", "running"]
    assert "demo-vl: running" in first.stderr and "demo: starting" in first.stderr, first.stderr[-2000:]
    assert list(stack.keys) == [VISION], first.stdout[-2000:]
    assert "smollm2-import took" in first.stderr, "the real model was fetched and converted"


# ------------------------------------------------------------------ real answers from the text tenant

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str


@pytest.mark.slow
def test_the_text_tenant_answers_from_a_real_model_through_the_sdk_and_langchain(stack: Stack) -> None:
    """SmolLM2-135M-Instruct, converted from its GGUF file by import-model, answers a fixed
    question at temperature 0; forced tool calls carry arguments that validate against the tool's
    schema (the tenant's admin set --tool-call-parser hermes); a JSON schema's output parses."""
    client = stack.text_client()
    answer = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=30)  # type: ignore[arg-type]
    assert "Paris" in (answer.choices[0].message.content or ""), answer
    llm = stack.text_chat(max_tokens=200)
    assert "Paris" in str(llm.invoke("What is the capital of France?").content)

    # tools: a named tool_choice, as LangChain's bind_tools forces it, and `auto`, which is served
    forced = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What's the weather in Paris?")
    assert isinstance(forced, AIMessage) and [c["name"] for c in forced.tool_calls] == ["GetWeather"], forced
    assert GetWeather.model_validate(forced.tool_calls[0]["args"]).city
    chosen = llm.bind_tools([GetWeather]).invoke("What's the weather in Paris?")
    assert isinstance(chosen, AIMessage), chosen
    raw = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": GetWeather.model_json_schema()}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=200,
    )
    (call,) = raw.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    GetWeather.model_validate_json(call.function.arguments)  # type: ignore[union-attr]

    # structured output: JSON that validates against the schema asked for
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    shaped = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a city in France as JSON."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    assert isinstance(json.loads(shaped.choices[0].message.content or "")["city"], str)

    # the call agent guides make (thinking switches, streamed): served, thinking off on a model without any
    thinking = stack.text_chat(
        max_tokens=30, streaming=True, extra_body={"enable_thinking": True, "return_reasoning": True}
    )
    assert "Paris" in "".join(str(chunk.content) for chunk in thinking.stream("What is the capital of France?"))


# ------------------------------------------------------------------ an admin's commands in the container


@pytest.mark.slow
def test_docker_exec_add_tenant_in_the_stack(stack: Stack) -> None:
    manager, instance, docker_client = stack.manager, stack.instance, stack.docker

    def tenant_names() -> set[str]:
        return {t["name"] for t in json.loads(dexec(manager, "list-tenants", "--json").stdout)}

    bad = dexec(manager, "add-tenant", "--name", "companya", "--gpu-memory", "10", "--port", "30301")
    assert bad.returncode == 2
    assert "expected a number with a unit" in bad.stderr
    for wrong, says in (
        (["--quant", "int9"], "unknown --quant 'int9'"),
        (["--quant", "int4"], "is not quantized"),
        (["--model", "llama-70b"], "available: demo"),
        (["--tool-call-parser", "auto"], "--tool-call-parser auto found no tool parser for model 'demo'"),
        (["--reasoning-parser", "r1"], "unknown --reasoning-parser 'r1': the engine's reasoning parsers are"),
        (["--volume", "encrypted:/srv"], "--volume is encrypted:/data (an encrypted volume) or plain"),
        (["--volume", "encrypted", "--volume-size", "100T"], "No space left on device for the encrypted volume"),
    ):
        refused = dexec(manager, "add-tenant", "--name", "companya", "--gpu-memory", "1536M", "--port", "30301", *wrong)
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr
    assert tenant_names() == {"demo", VISION}  # nothing was created

    listing = json.loads(dexec(manager, "list-models", "--max-model-len", "1024", "--json").stdout)
    models = {m["name"]: m for m in listing}
    demo, vision, smollm2 = models["demo"], models[VISION], models["smollm2"]
    assert smollm2["origin"] == "gguf smollm2.gguf (Q4_1)" and smollm2["dtype"] == "bfloat16"
    assert demo["origin"] == "generated scripts/make-demo-model.py (random weights)"
    assert demo["name"] == "demo" and demo["architecture"] == "LlamaForCausalLM" and not demo["takes_images"]
    assert vision["name"] == VISION and vision["architecture"] == "Idefics3ForConditionalGeneration"
    assert vision["takes_images"] and vision["minimum_gpu_memory"] > demo["minimum_gpu_memory"]
    assert demo["minimum_gpu_memory"] <= 1536 * 1024**2 and demo["minimum_gpu_memory_at"] >= demo["minimum_gpu_memory"]
    assert "MIN GPU-MEMORY" in dexec(manager, "list-models").stdout and demo["tool_parser"] is None

    # import-model: a copy of the demo model under a new name becomes usable; an incomplete one does not
    assert dexec(manager, "cp", "-r", "/models/demo", "/tmp/upload").returncode == 0
    imported = dexec(manager, "import-model", "/tmp/upload", "--name", "democopy")
    assert imported.returncode == 0 and "use it with add-tenant --model democopy" in imported.stdout, imported.stderr
    assert dexec(manager, "rm", "/tmp/upload/tokenizer.json").returncode == 0
    incomplete = dexec(manager, "import-model", "/tmp/upload", "--name", "broken")
    assert incomplete.returncode == 2 and "no tokenizer" in incomplete.stderr
    # a copy cut short: its header intact, 100 bytes of its tensors (it would crash-loop an engine)
    assert dexec(manager, "cp", "/models/demo/tokenizer.json", "/tmp/upload/").returncode == 0
    cut = "import sys; p = sys.argv[1]; raw = open(p, 'rb').read(); n = 8 + int.from_bytes(raw[:8], 'little')"
    cut += "; open(p, 'wb').write(raw[: n + 100])"
    assert dexec(manager, "python3", "-c", cut, "/tmp/upload/model.safetensors").returncode == 0
    truncated = dexec(manager, "import-model", "/tmp/upload", "--name", "broken")
    assert truncated.returncode == 2 and "model.safetensors is cut short" in truncated.stderr, truncated.stderr
    listed = {m["name"] for m in json.loads(dexec(manager, "list-models", "--json").stdout)}
    assert listed == {"demo", VISION, "smollm2", "democopy"}

    # import-model FILE.gguf: what cannot be converted is refused with what to do, and nothing is left
    smollm2_file = subprocess.run(
        ["bash", "scripts/fetch-smollm2.sh"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert subprocess.run(["docker", "cp", smollm2_file, f"{manager}:/tmp/whole.gguf"], check=False).returncode == 0
    write = "import sys; open(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))"
    made = {
        "/tmp/notok.gguf": {"general.architecture": "llama"},
        "/tmp/bert.gguf": {"general.architecture": "bert", "tokenizer.ggml.model": "gpt2"},
    }
    for path, content in made.items():
        assert dexec(manager, "python3", "-c", write, path, tiny_gguf(content).hex()).returncode == 0
    assert dexec(manager, "sh", "-c", "head -c 50000000 /tmp/whole.gguf > /tmp/cut.gguf").returncode == 0
    for source, says in (
        ("/tmp/upload/config.json", "is a file but not a GGUF file"),
        ("/tmp/cut.gguf", "it is not a complete GGUF file"),
        ("/tmp/notok.gguf", "it holds no tokenizer"),
        ("/tmp/bert.gguf", "cannot convert its architecture 'bert' from GGUF; it converts: "),
    ):
        refused = dexec(manager, "import-model", source, "--name", "broken")
        assert refused.returncode == 2 and says in refused.stderr, (source, refused.stderr)
    assert dexec(manager, "ls", "-A", "/models").stdout.split() == sorted(["demo", VISION, "smollm2", "democopy"])
    assert not stack.docker.containers.list(all=True, filters={"label": names.selector(instance, role="convert")})
    dexec(manager, "rm", "-f", "/tmp/whole.gguf", "/tmp/cut.gguf", "/tmp/notok.gguf", "/tmp/bert.gguf")

    added = dexec(
        manager, "add-tenant", "--name", "companya", "--gpu-memory", "1536M", "--port", "30301", "--model", "democopy",
        "--cpu-weight", "3000", "--max-num-seqs", "2", "--volume", "encrypted:/data", "--volume-size", "256M",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    (first_key,) = KEY_LINE.findall(added.stdout)

    def running() -> bool:
        out = dexec(manager, "list-tenants", "--json")
        (tenant,) = [t for t in json.loads(out.stdout) if t["name"] == "companya"]
        assert tenant["status"] != "failed", tenant["reason"]
        return tenant["status"] == "running"

    wait_for(running, 300, "companya to run", interval=3)
    quota_only = dexec(manager, "update-tenant", "--name", "companya", "--rpm-limit", "600", "--json")
    assert quota_only.returncode == 0, quota_only.stderr
    assert json.loads(quota_only.stdout)["measured"], "a quota change shows what the tenant uses, as list-tenants"
    in_use = dexec(manager, "remove-model", "democopy")
    assert in_use.returncode == 4 and "used by tenant companya" in in_use.stderr, in_use.stderr
    assert docker_client.containers.get(names.engine(instance, "companya")).status == "running"
    # CPU shares while engines contend: the admin's weight, else the reservation in MiB
    shares = {t: docker_client.containers.get(names.engine(instance, t)).attrs["HostConfig"]["CpuShares"]
              for t in ("companya", "demo")}  # fmt: skip
    assert shares == {"companya": 3000, "demo": 1536}, shares

    table = dexec(manager, "manager", "list-tenants")
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "PORT", "MODEL"]
    assert "running" in table.stdout and "volume=encrypted:/data" in table.stdout
    encrypted_at_rest(stack, "companya")

    # members, as an admin types them: each command in the container, also as `manager <command>`
    alice = dexec(manager, "add-member", "--tenant", "companya", "--name", "alice", "--tokens-per-day", "5000")
    assert alice.returncode == 0, alice.stderr
    (alice_key,) = KEY_LINE.findall(alice.stdout)
    quiet_goes_before_a_flood(stack, 30301, flood_key=alice_key, quiet_key=first_key)
    assert dexec(manager, "add-member", "--tenant", "companya", "--name", "alice").returncode == 4  # conflict
    assert dexec(manager, "add-member", "--tenant", "companya", "--name", "Al!ce").returncode == 2
    listed_members = json.loads(dexec(manager, "list-members", "--tenant", "companya", "--json").stdout)
    assert [m["name"] for m in listed_members] == ["companya", "alice"]
    assert listed_members[1]["quotas"]["tokens_per_day"] == 5000
    assert alice_key.startswith(listed_members[1]["keys"][0]["prefix"])
    updated = dexec(manager, "manager", "update-member", "--tenant", "companya", "--name", "alice", "--rpm-limit", "9")
    assert updated.returncode == 0 and "9/min 5000/day" in updated.stdout, updated.stderr
    rotated = dexec(manager, "rotate-key", "--tenant", "companya", "--member", "alice", "--grace", "0")
    assert rotated.returncode == 0 and "new API key for member alice of companya" in rotated.stdout
    assert dexec(manager, "rotate-key", "--name", "companya").returncode == 0  # today's form: the first member
    members_table = dexec(manager, "list-members", "--tenant", "companya").stdout
    assert members_table.splitlines()[0].split()[:2] == ["MEMBER", "KEYS"] and "alice" in members_table
    assert dexec(manager, "remove-member", "--tenant", "companya", "--name", "alice").returncode == 0
    assert dexec(manager, "remove-member", "--tenant", "companya", "--name", "alice").returncode == 3  # not found

    removed = dexec(manager, "remove-tenant", "--name", "companya")
    assert removed.returncode == 0, removed.stderr
    sel = names.selector(instance, tenant="companya")
    wait_for(
        lambda: not docker_client.containers.list(all=True, filters={"label": sel}),
        60,
        "companya's engine to be removed",
    )
    volume = VOLUMES_DIR / instance / "companya"
    assert not volume.exists() and not volume.with_suffix(".img").exists(), "crypto-erased with the tenant"
    assert str(volume) not in Path("/proc/self/mountinfo").read_text()
    gone = dexec(manager, "remove-model", "democopy")  # no tenant uses it any more
    assert gone.returncode == 0 and "democopy removed" in gone.stdout, gone.stderr
    left = {m["name"] for m in json.loads(dexec(manager, "list-models", "--json").stdout)}
    assert left == {"demo", VISION, "smollm2"}
    assert tenant_names() == {"demo", VISION}


def encrypted_at_rest(stack: Stack, tenant: str) -> None:
    """The manager (in its container) made and opened the tenant's encrypted volume, Docker bound
    it into the engine, and what the engine writes to /data reaches the disk only encrypted."""
    engine = stack.docker.containers.get(names.engine(stack.instance, tenant))
    marker = "PLAINTEXT-" + secrets.token_hex(8)
    wrote = engine.exec_run(["python3", "-c", f"open('/data/known.txt', 'w').write('{marker}\\n' * 1000)"])
    assert wrote.exit_code == 0, wrote.output
    data = VOLUMES_DIR / stack.instance / tenant / "data"
    assert (data / "known.txt").read_text().startswith(marker), "the host sees the engine's /data there"
    assert data.stat().st_uid == 1000 and (data / "known.txt").stat().st_uid == 1000
    os.sync()
    image = (VOLUMES_DIR / stack.instance / f"{tenant}.img").read_bytes()
    assert len(image) == 256 * 1024**2 and marker.encode() not in image and b"known.txt" not in image
    capacity = dexec(stack.manager, "capacity").stdout
    assert "encrypted volumes (fscrypt): 1 made" in capacity, capacity


def quiet_goes_before_a_flood(stack: Stack, port: int, flood_key: str, quiet_key: str) -> None:
    """Fair queuing on a real engine that runs two sequences at once: alice sends six long streams
    (two run, four wait at the gateway); once the first two stream, the tenant's first member
    sends one short request. It enters as soon as a slot frees, ahead of alice's backlog: its first
    token comes before that of alice's fourth stream (the two slots free together, and the other
    goes to alice's third); first come, first served it would come after all six. Its own end is
    no measure: a short stream beside a long one may take as long as a round of alice's.
    Each request is metered once, and the manager's /metrics shows who waited at the gateway."""
    base = f"http://127.0.0.1:{port}/v1/completions"
    with stack.api() as api:
        before = {m["name"]: m["today"]["requests"] for m in api.get("/api/v1/tenants/companya/members").json()}
    wait_for(
        lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {flood_key}"})
        .status_code == 200,
        30, "alice's key to reach the gateway", interval=0.5,
    )  # fmt: skip
    read_config = (
        "import sqlite3; print(sqlite3.connect('/data/gateway.db').execute('select body from config').fetchone()[0])"
    )
    config = json.loads(dexec(names.gateway(stack.instance, "companya"), "python3", "-c", read_config).stdout)
    assert (config["concurrency"], config["fair_queue"]) == (2, True), "the gateway knows the engine's two slots"
    firsts: dict[str, float] = {}
    streaming = threading.Semaphore(0)  # released by each stream's first line: it runs on the engine

    def ask(who: str, key: str, tokens: int) -> None:
        body = {"model": "democopy", "prompt": "hi", "max_tokens": tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120) as r:
            assert r.status_code == 200, r.read()
            for i, _ in enumerate(r.iter_lines()):
                if i == 0:
                    firsts[who] = time.monotonic()
                    streaming.release()

    with ThreadPoolExecutor(7) as pool:
        flood = [pool.submit(ask, f"alice{i}", flood_key, 500) for i in range(6)]
        # two of alice's streams run (a few seconds each on these cores), four wait: then it comes
        assert streaming.acquire(timeout=60) and streaming.acquire(timeout=60), "alice's first two streams"
        quiet = pool.submit(ask, "quiet", quiet_key, 5)
        for future in [*flood, quiet]:
            future.result()
    alice = sorted(t for who, t in firsts.items() if who.startswith("alice"))
    assert firsts["quiet"] < alice[3], f"the quiet request waited behind alice's backlog: {firsts}"

    def metered() -> tuple[int, int]:
        with stack.api() as api:
            today = {m["name"]: m["today"]["requests"] for m in api.get("/api/v1/tenants/companya/members").json()}
        return today["alice"] - before["alice"], today["companya"] - before["companya"]

    # alice's six streams and the /v1/models that found her key (a 401 before it is never metered)
    wait_for(lambda: metered() == (7, 1), 60, "every request metered once")
    assert metered() == (7, 1), "and only once"
    with stack.api() as api:
        metrics = api.get("/metrics").text
    waited = re.search(r'gtm_tenant_queue_seconds\{member="alice",quantile="0.99",tenant="companya"\} (\S+)', metrics)
    assert waited and float(waited.group(1)) > 0.5, [ln for ln in metrics.splitlines() if "companya" in ln]


# ------------------------------------------------------------------ images, on the vision tenant


@pytest.fixture(scope="module")
def vision(stack: Stack) -> Stack:
    """The vision tenant with a second member, bob, whose key the tenant's gateway knows."""
    if VISION not in stack.keys:
        pytest.fail(f"up.sh printed no key for {VISION}: {stack.first_up.stdout[-2000:]}")
    if "bob" not in stack.keys:
        with stack.api() as api:
            (tenant,) = [t for t in api.get("/api/v1/tenants").json() if t["name"] == VISION]
            # the defaults of a vision model: 4 images a request of at most 12.6 megapixels, whose
            # decode the reservation holds (list-models: the smallest --gpu-memory for it)
            assert tenant["status"] == "running", tenant
            assert (tenant["max_images"], tenant["max_image_pixels"]) == (4, 4096 * 3072)
            assert tenant["enable_prefix_caching"] and not tenant["trust_remote_code"]
            r = api.post(f"/api/v1/tenants/{VISION}/members", json={"name": "bob"})
            assert r.status_code == 201, r.text
            bob = r.json()["key"]["api_key"]

        def known() -> bool:  # the gateway has bob's key once its config is pushed
            models = httpx.get(
                f"http://127.0.0.1:{stack.vision_port}/v1/models", headers={"Authorization": f"Bearer {bob}"}
            )
            return models.status_code == 200

        wait_for(known, 30, "bob's key to reach the gateway", interval=0.5)
        stack.keys["bob"] = bob
    return stack


def png(width: int, height: int, noise: bool = False) -> bytes:
    """A real PNG; ``noise`` makes it incompressible (about width x height x 3 bytes)."""
    if noise:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (200, 30, 30))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_message(*urls: str, text: str = QUESTION) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def first_member_today(vision: Stack) -> dict[str, int]:
    with vision.api() as api:
        members = api.get(f"/api/v1/tenants/{VISION}/members").json()
    (first,) = [m for m in members if m["name"] == VISION]
    return dict(first["today"])


@pytest.mark.slow
def test_the_openai_sdk_asks_about_a_2_mb_and_a_15_mb_png_and_every_token_is_metered(vision: Stack) -> None:
    before = first_member_today(vision)
    client = vision.client()
    text_only = client.chat.completions.create(
        model=VISION, messages=[{"role": "user", "content": QUESTION}], max_tokens=4
    )
    assert text_only.usage is not None
    received = [text_only.usage.total_tokens]
    for megabytes, side in ((2, 820), (15, 2240)):
        raw = png(side, side, noise=True)
        assert len(raw) > megabytes * 1e6 * 0.95
        reply = client.chat.completions.create(model=VISION, messages=image_message(data_url(raw)), max_tokens=4)
        assert reply.usage is not None and reply.choices[0].message.content
        # a square image is 5 tiles of 16 image tokens, plus their markers
        assert reply.usage.prompt_tokens >= text_only.usage.prompt_tokens + 80, (megabytes, reply.usage)
        received.append(reply.usage.total_tokens)
    stream = client.chat.completions.create(
        model=VISION,
        messages=image_message(data_url(png(640, 480))),
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens >= text_only.usage.prompt_tokens + 80
    received.append(usage.total_tokens)

    def metered() -> bool:
        today = first_member_today(vision)
        return (today["total_tokens"] - before["total_tokens"], today["requests"] - before["requests"]) == (
            sum(received),
            len(received),
        )

    # the engine's own counts (image tokens included), collected from the gateway, exactly; the
    # stack's manager collects every 15 s
    wait_for(metered, 60, f"the manager to meter {sum(received)} tokens in {len(received)} requests")


@pytest.mark.slow
def test_langchain_sends_an_image(vision: Stack) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"http://127.0.0.1:{vision.vision_port}/v1",
        api_key=vision.keys["bob"],
        model=VISION,
        max_tokens=4,
        max_retries=0,
    )
    message = HumanMessage(
        content=[
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": data_url(png(300, 200))}},
        ]
    )
    reply = chat.invoke([message])
    assert reply.content and reply.usage_metadata is not None and reply.usage_metadata["input_tokens"] > 80


@pytest.mark.slow
def test_the_door_refuses_what_the_engine_could_not_take_and_the_engine_never_notices(vision: Stack) -> None:
    engine = vision.engine()
    started, restarts = engine.attrs["State"]["StartedAt"], engine.attrs["RestartCount"]
    client = vision.client()
    huge = io.BytesIO()
    Image.new("L", (12000, 12000)).save(huge, "PNG")  # 144 megapixels that compress to kilobytes
    small = data_url(png(64, 64))
    refusals = {
        "image_too_large": image_message(data_url(huge.getvalue())),
        "too_many_images": image_message(*[small] * 5),
        "image_url_not_supported": image_message("http://example.com/cat.png"),
        "invalid_image": image_message("data:image/png;base64,AAAAAAAAAAAAAAAA"),
    }
    refusals["file"] = image_message("file:///etc/passwd")
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    refusals["modality_not_supported"] = [{"role": "user", "content": [{"type": "text", "text": "hi"}, video]}]
    for code, messages in refusals.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=VISION, messages=messages, max_tokens=4)
        error = caught.value.body
        assert isinstance(error, dict), error
        assert error["type"] == "invalid_request_error" and error["param"].startswith("messages[0].content")
        assert error["code"] == ("image_url_not_supported" if code == "file" else code), error
    # a body over the tenant's limit (32 MiB): 413, naming it
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(
            model=VISION, messages=image_message(data_url(os.urandom(25 * 1024**2))), max_tokens=4
        )
    assert too_big.value.status_code == 413 and "32.0 MiB" in str(too_big.value)
    engine.reload()
    assert (engine.attrs["State"]["StartedAt"], engine.attrs["RestartCount"]) == (started, restarts)
    assert engine.attrs["State"]["Status"] == "running" and not engine.attrs["State"]["OOMKilled"]
    # the largest images it takes, four of them: the engine decodes them inside its reservation
    photo = data_url(png(4096, 3072))
    reply = client.chat.completions.create(model=VISION, messages=image_message(*[photo] * 4), max_tokens=4)
    assert reply.usage is not None and reply.usage.prompt_tokens > 4 * 60
    engine.reload()
    assert engine.attrs["RestartCount"] == restarts and not engine.attrs["State"]["OOMKilled"]
    # tools on a tenant whose admin set no tool-call parser: what to ask for, never an engine flag
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as no_tools:
        client.chat.completions.create(
            model=VISION,
            messages=[{"role": "user", "content": "hi"}],
            tools=[weather],
            max_tokens=4,  # type: ignore[list-item]
        )
    error = no_tools.value.body
    assert isinstance(error, dict) and error["code"] == "tool_calls_not_enabled", error
    assert f"update-tenant --name {VISION} --tool-call-parser auto" in error["message"]
    assert "--enable-auto-tool-choice" not in error["message"]


@pytest.mark.slow
def test_members_prompts_stay_in_caches_of_their_own(vision: Stack) -> None:
    """vLLM counts prefix-cache hits in tokens: the first member's second ask of a long prompt hits
    its cache, bob's ask of the same prompt does not, and a salt a client sends itself is replaced."""
    prompt = " ".join(f"word{i}" for i in range(120))  # about 350 tokens: whole cache blocks
    messages = [{"role": "user", "content": prompt}]

    def ask(member: str, **extra: Any) -> float:
        before = vision.engine_metric("vllm:prefix_cache_hits_total")
        vision.client(member).chat.completions.create(model=VISION, messages=messages, max_tokens=2, **extra)
        return vision.engine_metric("vllm:prefix_cache_hits_total") - before

    ask(VISION)
    assert ask(VISION) > 0, "the first member's repeated prompt hits its cache"
    assert ask("bob") == 0, "bob's salt differs: the first member's cached prompt is out of his reach"
    assert ask(VISION, extra_body={"cache_salt": "bob-guess"}) > 0, "a client's own salt does not survive"
    assert ask("bob", extra_body={"cache_salt": "x"}) > 0, "bob's own cache, whatever salt he sends"


@pytest.mark.slow
def test_list_tenants_shows_the_engine_options(vision: Stack) -> None:
    (tenant,) = [t for t in demo_tenants(vision.env) if t["name"] == VISION]
    assert tenant["max_images"] == 4 and tenant["max_num_seqs"] is None
    r = httpx.get(
        f"http://127.0.0.1:{vision.vision_port}/v1/models", headers={"Authorization": f"Bearer {vision.keys['bob']}"}
    )
    assert r.status_code == 200 and json.loads(r.text)["data"][0]["id"] == VISION


# ------------------------------------------------------------------ last: up.sh again, and after down.sh


@pytest.mark.slow
def test_up_runs_again_and_after_down_without_changing_anything(stack: Stack) -> None:
    env, docker_client = stack.env, stack.docker
    manager_id = docker_client.containers.get(stack.manager).id
    again = up(env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "demo tenant exists" in again.stderr and "API key (shown once" not in again.stdout
    assert "printed above" not in again.stdout and "rotate-key --name demo" in again.stdout
    assert docker_client.containers.get(stack.manager).id == manager_id  # nothing recreated
    assert len(demo_tenants(env)) == 2

    down = subprocess.run(
        ["bash", "scripts/down.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert down.returncode == 0, down.stderr
    assert docker_client.containers.list(all=True, filters={"label": names.selector(stack.instance)}) == []
    after_down = up({**env, "GTM_UP_WAIT": "0"})  # returns at once, with the command that waits
    assert after_down.returncode == 0, after_down.stderr[-2000:]
    assert "wait-tenant --name demo --name demo-vl" in after_down.stdout
    assert "demo tenant exists" in after_down.stderr  # the state volume kept it, and its key
    assert len(demo_tenants(env)) == 2
