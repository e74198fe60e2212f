"""The README's first command, run the way a new user runs it, twice, and again after
scripts/down.sh: every run exits 0, and a re-run changes nothing (the same manager
container, the demo tenant kept, no second demo tenant). Isolated from any real
installation on the machine by its own compose project, names, volumes and ports."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from manager import names

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def quick_start_env(docker_client: docker.DockerClient, instance: str) -> Iterator[dict[str, str]]:
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
    }
    try:
        yield env
    finally:
        subprocess.run(
            ["bash", "scripts/down.sh", "--purge"], cwd=ROOT, env=env, capture_output=True, check=False, timeout=300
        )
        for c in docker_client.containers.list(all=True, filters={"label": f"com.docker.compose.project={instance}"}):
            c.remove(force=True)


def up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/up.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False
    )


def demo_tenants(env: dict[str, str]) -> list[dict[str, object]]:
    out = subprocess.run(
        ["docker", "exec", env["GTM_MANAGER_NAME"], "list-tenants", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [t for t in json.loads(out) if t["name"] in ("demo", "demo-vl")]


@pytest.mark.slow
def test_up_runs_again_and_after_down_without_changing_anything(
    quick_start_env: dict[str, str], docker_client: docker.DockerClient, instance: str
) -> None:
    env = quick_start_env
    first = up(env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "API key (shown once" in first.stdout and "the API keys printed above" in first.stdout
    assert first.stderr.count("bootstrap took") == 1
    # it returned once both demo tenants serve, showing how they got there
    assert [t["status"] for t in demo_tenants(env)] == ["running", "running"]
    assert "demo-vl: running" in first.stderr and "demo: starting" in first.stderr, first.stderr[-2000:]
    manager_id = docker_client.containers.get(env["GTM_MANAGER_NAME"]).id

    again = up(env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "demo tenant exists" in again.stderr and "API key (shown once" not in again.stdout
    assert "printed above" not in again.stdout and "rotate-key --name demo" in again.stdout
    assert docker_client.containers.get(env["GTM_MANAGER_NAME"]).id == manager_id  # nothing recreated
    assert len(demo_tenants(env)) == 2

    down = subprocess.run(
        ["bash", "scripts/down.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert down.returncode == 0, down.stderr
    assert docker_client.containers.list(all=True, filters={"label": names.selector(instance)}) == []
    after_down = up({**env, "GTM_UP_WAIT": "0"})  # returns at once, with the command that waits
    assert after_down.returncode == 0, after_down.stderr[-2000:]
    assert "wait-tenant --name demo --name demo-vl" in after_down.stdout
    assert "demo tenant exists" in after_down.stderr  # the state volume kept it, and its key
    assert len(demo_tenants(env)) == 2
