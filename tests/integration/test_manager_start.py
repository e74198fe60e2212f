"""The manager refuses to start on a state it cannot own: a read-only state volume (the
real image, the way compose runs it) or a database another process holds. Either way
it exits with code 11 and a message that says what to do, and nothing is started."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import docker

from manager import names

from .conftest import MANAGER_IMAGE

ROOT = Path(__file__).resolve().parents[2]


def test_a_read_only_state_volume_is_a_clear_start_up_error(docker_client: docker.DockerClient, instance: str) -> None:
    volume = docker_client.volumes.create(f"{instance}-state", labels=names.labels(instance, names.Role.VOLUME))
    container = docker_client.containers.run(
        MANAGER_IMAGE,
        ["serve"],
        detach=True,
        environment={"GTM_GPU_MODE": "cpu"},
        volumes={volume.name: {"bind": "/var/lib/gtm", "mode": "ro"}},
        labels=names.labels(instance, names.Role.PROBE),
    )
    try:
        result = container.wait(timeout=60)
        logs = container.logs().decode()
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 11, logs
    assert "state directory /var/lib/gtm is not writable" in logs and "Traceback" not in logs


def test_a_database_held_by_another_process_is_a_clear_start_up_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    holder = sqlite3.connect(state / "manager.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        env = {**os.environ, "GTM_GPU_MODE": "cpu", "GTM_STATE_DIR": str(state), "GTM_API_PORT": "0"}
        done = subprocess.run(
            [str(ROOT / ".venv/bin/manager"), "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert done.returncode == 11, done.stderr
    assert "is another manager running on the same state?" in done.stderr and "Traceback" not in done.stderr
