"""Integration fixtures: the real Docker engine, the project's images, an in-process
manager, and cleanup by label of everything a test session creates (also on failure).

Every resource carries ``org.gtm.instance=<session instance>``; the instance starts
with ``gtmt`` so leftovers of an aborted earlier session are found and removed too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import uvicorn

from manager import names
from manager.settings import Settings
from manager.volumes.fscrypt import FscryptVolumes
from manager.volumes.keyring import new_kek_line
from manager.wiring import create_app

pytestmark = pytest.mark.integration
TEST_PREFIX = "gtmt"
ENGINE_IMAGE = os.environ.get("GTM_ENGINE_IMAGE", "gtm-engine-cpu:0.32.0")
MANAGER_IMAGE = os.environ.get("GTM_MANAGER_IMAGE", "gtm-manager:dev")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def remove_instance(client: docker.DockerClient, match: Callable[[str], bool]) -> None:
    def ours(labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return labels.get(names.MANAGED) == "true" and match(labels.get(names.INSTANCE, ""))

    for c in client.containers.list(all=True, filters={"label": names.MANAGED}):
        if ours(c.labels):
            c.remove(force=True)
    for n in client.networks.list(filters={"label": names.MANAGED}):
        if ours(n.attrs.get("Labels")):
            n.remove()
    for v in client.volumes.list():
        # Docker creates a missing named volume, unlabelled, for a container that mounts it (one
        # removed by a cleanup while a container started): found by its instance's name prefix
        if ours(v.attrs.get("Labels")) or (not v.attrs.get("Labels") and match((v.name or "").split("-")[0])):
            v.remove(force=True)
    erase_encrypted_volumes(match)


VOLUMES_DIR = Path("/var/lib/gpu-tenant-manager/volumes")
"""GTM_VOLUMES_DIR's default: up.sh's manager (test_stack) keeps its instance's volumes there."""


def shared_mount(folder: Path) -> None:
    """What scripts/volumes-host.sh does to GTM_VOLUMES_DIR on a host whose / is a private mount."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    subprocess.run(["mount", "--make-shared", str(folder)], check=True)


@pytest.fixture
def encrypted_volumes(instance: str, tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[dict[str, Any]]:
    """Settings for a manager that can make encrypted volumes: a shared volumes directory and a
    key file of this test's own; every volume erased and the directory unmounted afterwards."""
    folder, key_file = tmp_path / "volumes", tmp_path / "volume-keys"
    folder.mkdir()
    key_file.write_text(new_kek_line() + "\n")
    shared_mount(folder)
    try:
        yield {"volumes_dir": folder, "volume_key_file": key_file, "volume_size": 256 * 1024**2}
    finally:
        remove_instance(docker_client, lambda i: i == instance)  # its engines first: they hold the volumes
        erase_encrypted_volumes(lambda i: i == instance, folder)
        subprocess.run(["umount", str(folder)], check=False)


def erase_encrypted_volumes(match: Callable[[str], bool], root: Path = VOLUMES_DIR) -> None:
    """Encrypted volumes of the matching instances, closed and erased (images, mounts, loop
    devices), after their containers are gone."""
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.is_dir() and match(folder.name):
            volumes = FscryptVolumes(folder, require_shared=False)
            for name in volumes.names():
                volumes.erase(name)
            with contextlib.suppress(OSError):
                folder.rmdir()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Docker engine ({exc}); scripts/test.sh starts one")
    for image in (ENGINE_IMAGE, MANAGER_IMAGE):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"image {image} missing: run scripts/build-images.sh")
    # leftovers of an aborted earlier session (never this machine's real instances)
    remove_instance(client, lambda inst: inst.startswith(TEST_PREFIX))
    yield client
    client.close()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    path = Path(os.environ.get("GTM_TEST_MODELS", "/var/cache/gpu-tenant-manager/models"))
    if not (path / "demo" / "model.safetensors").exists():
        pytest.fail(f"demo model missing in {path}: run scripts/make-demo-model.sh {path}")
    return path


@pytest.fixture
def instance(docker_client: docker.DockerClient) -> Iterator[str]:
    """A fresh label namespace; everything in it is removed afterwards, pass or fail."""
    inst = TEST_PREFIX + secrets.token_hex(4)
    yield inst
    remove_instance(docker_client, lambda i: i == inst)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningManager:
    settings: Settings
    server: uvicorn.Server
    thread: threading.Thread
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=120)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, "GTM_API_URL": self.url, "GTM_ADMIN_TOKEN": self.token, "GTM_GPU_MODE": "cpu"}


def start_manager(settings: Settings) -> RunningManager:
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.api_port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("manager did not start")
        time.sleep(0.05)
    assert settings.admin_token is not None
    return RunningManager(settings, server, thread, settings.admin_token.get_secret_value())


def settings_for(instance: str, models_dir: Path, state_dir: Path, **over: Any) -> Settings:
    """A manager of the test session's own: cpu mode, loopback, the session's images and models."""
    values: dict[str, Any] = dict(
        gpu_mode="cpu",
        instance=instance,
        state_dir=state_dir,
        models_source=str(models_dir),
        models_dir=models_dir,
        api_host="127.0.0.1",
        api_port=free_port(),
        engine_image=ENGINE_IMAGE,
        manager_image=MANAGER_IMAGE,
        admin_token="test-admin-token-0123456789abcdef",
        tenant_bind_address="127.0.0.1",
        reconcile_interval_s=3.0,
        orphan_grace_s=5.0,
        engine_start_timeout_s=300.0,
    )
    values.update(over)
    return Settings(**values)


@pytest.fixture
def manager_settings(instance: str, models_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**over: Any) -> Settings:
        base: dict[str, Any] = {"instance": instance, "models_dir": models_dir, "state_dir": tmp_path / "state"}
        return settings_for(**{**base, **over})  # a test may name its own models

    return make


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.time() + timeout
    last: Any = None
    while time.time() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def wait_status(api: httpx.Client, tenant: str, status: str, timeout: float = 300) -> dict[str, Any]:
    """Waits for a status; a failure on the way is retried by the reconciler (with backoff), so only
    the timeout fails the test, with the last reason seen. An API error on the way (a 503 while a
    restarted dockerd still settles) is remembered and asked again, like an admin would."""
    reasons: list[str] = []

    def check() -> dict[str, Any] | None:
        r = api.get(f"/api/v1/tenants/{tenant}")
        if r.status_code != 200:
            error = f"HTTP {r.status_code}: {r.text[:300]}"
            if error not in reasons:
                reasons.append(error)
            return None
        t = r.json()
        if t["status"] == "failed" and status != "failed" and t["reason"] not in reasons:
            reasons.append(t["reason"])
        return t if t["status"] == status else None

    try:
        result: dict[str, Any] = wait_for(check, timeout, f"{tenant} to be {status}", interval=2.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; failures seen on the way: {reasons}") from None
    return result


def run_probe(client: docker.DockerClient, instance: str, network: str, code: str, timeout: int = 120) -> str:
    """Runs python code in a throwaway container on ``network`` and returns its output."""
    container = client.containers.run(
        MANAGER_IMAGE,
        entrypoint=["python3", "-c", code],
        network=network,
        detach=True,
        labels=names.labels(instance, names.Role.PROBE),
    )
    try:
        result = container.wait(timeout=timeout)
        out: str = container.logs().decode()
        assert result["StatusCode"] == 0, f"probe failed ({result}): {out}"
        return out
    finally:
        container.remove(force=True)
