"""The product as admins run it: the compose stack, and `docker exec <manager> add-tenant ...`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from manager import names

from .conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def compose(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", 'source scripts/lib.sh; compose "$@"', "compose", "-f", "compose/docker-compose.yml", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def stack(docker_client: docker.DockerClient, instance: str) -> Iterator[tuple[str, dict[str, str]]]:
    models = docker_client.volumes.create(f"{instance}-models", labels=names.labels(instance, names.Role.VOLUME))
    subprocess.run(["bash", "scripts/make-demo-model.sh", models.name], cwd=ROOT, check=True, capture_output=True)
    env = {
        **os.environ,
        "GTM_MANAGER_NAME": f"{instance}-manager",
        "GTM_INSTANCE": instance,
        "GTM_MODELS_VOLUME": models.name,
        "GTM_STATE_VOLUME": f"{instance}-state",
        "GTM_CONTROL_NETWORK": f"{instance}-control",
        "GTM_CONSOLE_PORT": str(free_port()),
        "GTM_TENANT_BIND_ADDRESS": "127.0.0.1",
    }
    project = ["-p", instance]
    try:
        up = compose(env, *project, "up", "-d")
        assert up.returncode == 0, up.stderr
        yield env["GTM_MANAGER_NAME"], env
    finally:
        # tenants' containers first: a gateway still on the control network would keep it alive
        for c in docker_client.containers.list(all=True, filters={"label": names.selector(instance)}):
            c.remove(force=True)
        compose(env, *project, "down", "-v", "--remove-orphans")
        for c in docker_client.containers.list(all=True, filters={"label": f"com.docker.compose.project={instance}"}):
            c.remove(force=True)


def dexec(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", name, *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_docker_exec_add_tenant_in_the_compose_stack(
    stack: tuple[str, dict[str, str]], docker_client: docker.DockerClient, instance: str
) -> None:
    manager, _ = stack

    def healthy() -> bool:
        return docker_client.containers.get(manager).attrs["State"].get("Health", {}).get("Status") == "healthy"

    wait_for(healthy, 90, "the manager container to be healthy")

    bad = dexec(manager, "add-tenant", "--name", "companya", "--gpu-memory", "10", "--port", "30301")
    assert bad.returncode == 2
    assert "expected a number with a unit" in bad.stderr
    for wrong, says in (
        (["--quant", "int9"], "unknown --quant 'int9'"),
        (["--quant", "int4"], "is not quantized"),
        (["--model", "llama-70b"], "available: demo"),
    ):
        refused = dexec(manager, "add-tenant", "--name", "companya", "--gpu-memory", "1536M", "--port", "30301", *wrong)
        assert refused.returncode != 0 and says in refused.stderr, refused.stderr
    assert json.loads(dexec(manager, "list-tenants", "--json").stdout) == []  # nothing was created

    models = json.loads(dexec(manager, "list-models", "--max-model-len", "1024", "--json").stdout)
    demo, vision = models
    assert demo["name"] == "demo" and demo["architecture"] == "LlamaForCausalLM" and not demo["takes_images"]
    assert vision["name"] == "demo-vl" and vision["architecture"] == "Idefics3ForConditionalGeneration"
    assert vision["takes_images"] and vision["minimum_gpu_memory"] > demo["minimum_gpu_memory"]
    assert demo["minimum_gpu_memory"] <= 1536 * 1024**2 and demo["minimum_gpu_memory_at"] >= demo["minimum_gpu_memory"]
    assert "MIN GPU-MEMORY" in dexec(manager, "list-models").stdout

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
    assert listed == {"demo", "demo-vl", "democopy"}

    added = dexec(
        manager, "add-tenant", "--name", "companya", "--gpu-memory", "1536M", "--port", "30301", "--model", "democopy"
    )
    assert added.returncode == 0, added.stderr
    assert "API key (shown once" in added.stdout

    def running() -> bool:
        out = dexec(manager, "list-tenants", "--json")
        tenant = json.loads(out.stdout)[0]
        assert tenant["status"] != "failed", tenant["reason"]
        return tenant["status"] == "running"

    wait_for(running, 300, "companya to run", interval=3)
    quota_only = dexec(manager, "update-tenant", "--name", "companya", "--rpm-limit", "600", "--json")
    assert quota_only.returncode == 0, quota_only.stderr
    assert json.loads(quota_only.stdout)["measured"], "a quota change shows what the tenant uses, as list-tenants"
    in_use = dexec(manager, "remove-model", "democopy")
    assert in_use.returncode == 4 and "used by tenant companya" in in_use.stderr, in_use.stderr
    assert docker_client.containers.get(names.engine(instance, "companya")).status == "running"

    table = dexec(manager, "manager", "list-tenants")
    assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "PORT", "MODEL"]
    assert "running" in table.stdout

    # members, as an admin types them: each command in the container, also as `manager <command>`
    alice = dexec(manager, "add-member", "--tenant", "companya", "--name", "alice", "--tokens-per-day", "5000")
    assert alice.returncode == 0, alice.stderr
    (alice_key,) = re.findall(r"^API key \(shown once, store it now\): (gtm_\S+)$", alice.stdout, re.M)
    assert dexec(manager, "add-member", "--tenant", "companya", "--name", "alice").returncode == 4  # conflict
    assert dexec(manager, "add-member", "--tenant", "companya", "--name", "Al!ce").returncode == 2
    listed = json.loads(dexec(manager, "list-members", "--tenant", "companya", "--json").stdout)
    assert [m["name"] for m in listed] == ["companya", "alice"]
    assert listed[1]["quotas"]["tokens_per_day"] == 5000 and alice_key.startswith(listed[1]["keys"][0]["prefix"])
    updated = dexec(manager, "manager", "update-member", "--tenant", "companya", "--name", "alice", "--rpm-limit", "9")
    assert updated.returncode == 0 and "9/min 5000/day" in updated.stdout, updated.stderr
    rotated = dexec(manager, "rotate-key", "--tenant", "companya", "--member", "alice", "--grace", "0")
    assert rotated.returncode == 0 and "new API key for member alice of companya" in rotated.stdout
    assert dexec(manager, "rotate-key", "--name", "companya").returncode == 0  # today's form: the first member
    table = dexec(manager, "list-members", "--tenant", "companya").stdout
    assert table.splitlines()[0].split()[:2] == ["MEMBER", "KEYS"] and "alice" in table
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
    gone = dexec(manager, "remove-model", "democopy")  # no tenant uses it any more
    assert gone.returncode == 0 and "democopy removed" in gone.stdout, gone.stderr
    assert {m["name"] for m in json.loads(dexec(manager, "list-models", "--json").stdout)} == {"demo", "demo-vl"}
