"""Images end to end on the real path: one vision tenant (the demo-vl Idefics3 model on a real
vLLM CPU engine behind its real gateway container) shared by every test of this module, asked by
the OpenAI SDK and LangChain with data: URLs; the door's refusals leave the engine untouched; each
member's prompts stay in a prefix cache of its own (the engine's own cache counters)."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import openai
import pytest
from PIL import Image

from manager import names

from .conftest import TEST_PREFIX, RunningManager, remove_instance, start_manager, wait_for, wait_status
from .test_gateway import wait_synced

PORT = 30461
TENANT = "vis"
QUESTION = "What is in this image?"


@dataclass
class Vision:
    manager: RunningManager
    docker: docker.DockerClient
    keys: dict[str, str]

    def client(self, member: str = TENANT) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"http://127.0.0.1:{PORT}/v1", api_key=self.keys[member], max_retries=0, timeout=300
        )

    def engine(self) -> Any:
        return self.docker.containers.get(names.engine(self.manager.settings.instance, TENANT))

    def engine_metric(self, name: str) -> float:
        """A counter of the engine's own /metrics, read inside its container (it has no other route)."""
        code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
        out = self.engine().exec_run(["python3", "-c", code]).output.decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith(name + "{"))


@pytest.fixture(scope="module")
def vision(docker_client: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One vision engine for the whole module: its start (about 30 s on two cores) is paid once."""
    from manager.settings import Settings

    from .conftest import free_port

    if not (models_dir / "demo-vl" / "model.safetensors").exists():
        pytest.fail(f"demo-vl model missing in {models_dir}: run scripts/make-demo-model.sh {models_dir}")
    instance = TEST_PREFIX + secrets.token_hex(4)
    settings = Settings(
        gpu_mode="cpu",
        instance=instance,
        state_dir=tmp_path_factory.mktemp("vision") / "state",
        models_source=str(models_dir),
        models_dir=models_dir,
        api_host="127.0.0.1",
        api_port=free_port(),
        engine_image=os.environ.get("GTM_ENGINE_IMAGE", "gtm-engine-cpu:0.32.0"),
        manager_image=os.environ.get("GTM_MANAGER_IMAGE", "gtm-manager:dev"),
        admin_token="test-admin-token-0123456789abcdef",
        tenant_bind_address="127.0.0.1",
        reconcile_interval_s=3.0,
        orphan_grace_s=5.0,
        engine_start_timeout_s=300.0,
        usage_interval_s=1.0,
    )
    mgr = start_manager(settings)
    try:
        with mgr.client() as api:
            # the defaults of a vision model: 4 images a request of at most 12.6 megapixels, whose
            # decode the reservation holds (list-models: the smallest --gpu-memory for it)
            (entry,) = [m for m in api.get("/api/v1/models").json() if m["name"] == "demo-vl"]
            assert entry["takes_images"] and entry["minimum_gpu_memory"] <= 2560 * 1024**2
            r = api.post(
                "/api/v1/tenants",
                json={"name": TENANT, "gpu_memory": "2560M", "port": PORT, "model": "demo-vl", "tokens_per_day": 20000},
            )
            assert r.status_code == 201, r.text
            keys = {TENANT: r.json()["key"]["api_key"]}
            r = api.post(f"/api/v1/tenants/{TENANT}/members", json={"name": "bob"})
            assert r.status_code == 201, r.text
            keys["bob"] = r.json()["key"]["api_key"]
            tenant = wait_status(api, TENANT, "running")
            assert (tenant["max_images"], tenant["max_image_pixels"]) == (4, 4096 * 3072)
            assert tenant["enable_prefix_caching"] and not tenant["trust_remote_code"]
        wait_synced(mgr, docker_client, TENANT)
        yield Vision(mgr, docker_client, keys)
    finally:
        mgr.stop()
        remove_instance(docker_client, lambda i: i == instance)


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


def test_the_openai_sdk_asks_about_a_2_mb_and_a_15_mb_png_and_every_token_is_metered(vision: Vision) -> None:
    client = vision.client()
    text_only = client.chat.completions.create(
        model="demo-vl", messages=[{"role": "user", "content": QUESTION}], max_tokens=4
    )
    assert text_only.usage is not None
    received = [text_only.usage.total_tokens]
    for megabytes, side in ((2, 820), (15, 2240)):
        raw = png(side, side, noise=True)
        assert len(raw) > megabytes * 1e6 * 0.95
        reply = client.chat.completions.create(model="demo-vl", messages=image_message(data_url(raw)), max_tokens=4)
        assert reply.usage is not None and reply.choices[0].message.content
        # a square image is 5 tiles of 16 image tokens, plus their markers
        assert reply.usage.prompt_tokens >= text_only.usage.prompt_tokens + 80, (megabytes, reply.usage)
        received.append(reply.usage.total_tokens)
    stream = client.chat.completions.create(
        model="demo-vl",
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
        with vision.manager.client() as api:
            members = api.get(f"/api/v1/tenants/{TENANT}/members").json()
        (first,) = [m for m in members if m["name"] == TENANT]
        today = first["today"]
        return bool(today["total_tokens"] == sum(received) and today["requests"] == len(received))

    # the engine's own counts (image tokens included), collected from the gateway, exactly
    wait_for(metered, 60, f"the manager to meter {sum(received)} tokens in {len(received)} requests")


def test_langchain_sends_an_image(vision: Vision) -> None:
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"http://127.0.0.1:{PORT}/v1", api_key=vision.keys["bob"], model="demo-vl", max_tokens=4, max_retries=0
    )
    message = HumanMessage(
        content=[
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": data_url(png(300, 200))}},
        ]
    )
    reply = chat.invoke([message])
    assert reply.content and reply.usage_metadata is not None and reply.usage_metadata["input_tokens"] > 80


def test_the_door_refuses_what_the_engine_could_not_take_and_the_engine_never_notices(vision: Vision) -> None:
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
    for code, messages in refusals.items():
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="demo-vl", messages=messages, max_tokens=4)
        error = caught.value.body
        assert isinstance(error, dict), error
        assert error["type"] == "invalid_request_error" and error["param"].startswith("messages[0].content")
        assert error["code"] == ("image_url_not_supported" if code == "file" else code), error
    # a body over the tenant's limit (32 MiB): 413, naming it
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(
            model="demo-vl", messages=image_message(data_url(os.urandom(25 * 1024**2))), max_tokens=4
        )
    assert too_big.value.status_code == 413 and "32.0 MiB" in str(too_big.value)
    engine.reload()
    assert (engine.attrs["State"]["StartedAt"], engine.attrs["RestartCount"]) == (started, restarts)
    assert engine.attrs["State"]["Status"] == "running" and not engine.attrs["State"]["OOMKilled"]
    # the largest images it takes, four of them: the engine decodes them inside its reservation
    photo = data_url(png(4096, 3072))
    reply = client.chat.completions.create(model="demo-vl", messages=image_message(*[photo] * 4), max_tokens=4)
    assert reply.usage is not None and reply.usage.prompt_tokens > 4 * 60
    engine.reload()
    assert engine.attrs["RestartCount"] == restarts and not engine.attrs["State"]["OOMKilled"]


def test_members_prompts_stay_in_caches_of_their_own(vision: Vision) -> None:
    """vLLM counts prefix-cache hits in tokens: alice's second ask of a long prompt hits her cache,
    bob's ask of the same prompt does not, and a salt alice sends herself is replaced by hers."""
    prompt = " ".join(f"word{i}" for i in range(120))  # about 350 tokens: whole cache blocks
    messages = [{"role": "user", "content": prompt}]

    def ask(member: str, **extra: Any) -> float:
        before = vision.engine_metric("vllm:prefix_cache_hits_total")
        vision.client(member).chat.completions.create(model="demo-vl", messages=messages, max_tokens=2, **extra)
        return vision.engine_metric("vllm:prefix_cache_hits_total") - before

    ask(TENANT)
    assert ask(TENANT) > 0, "alice's repeated prompt hits her cache"
    assert ask("bob") == 0, "bob's salt differs: alice's cached prompt is out of his reach"
    assert ask(TENANT, extra_body={"cache_salt": "bob-guess"}) > 0, "a client's own salt does not survive"
    assert ask("bob", extra_body={"cache_salt": "x"}) > 0, "bob's own cache, whatever salt he sends"


def test_list_tenants_shows_the_engine_options(vision: Vision) -> None:
    with vision.manager.client() as api:
        (tenant,) = [t for t in api.get("/api/v1/tenants").json() if t["name"] == TENANT]
    assert tenant["max_images"] == 4 and tenant["max_num_seqs"] is None
    r = httpx.get(f"http://127.0.0.1:{PORT}/v1/models", headers={"Authorization": f"Bearer {vision.keys['bob']}"})
    assert r.status_code == 200 and json.loads(r.text)["data"][0]["id"] == "demo-vl"
