"""dockerd stopped for 8 s while the manager runs, then started: the API says the container
runtime is unavailable meanwhile, gateways come back by themselves (the data plane), engines come
back through the reconciler one at a time, and nothing is duplicated. An encrypted tenant's
volume, closed meanwhile as a reboot leaves it, is opened again before its engine starts.

Runs only where the suite's own bootstrap started dockerd (never against a
systemd-managed daemon that other work may depend on)."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest

from manager import names
from manager.volumes.fscrypt import FscryptVolumes

from .conftest import start_manager, wait_for, wait_status

ROOT = Path(__file__).resolve().parents[2]
MARKER = Path("/run/gtm-started-dockerd")


def restart_dockerd(
    client: docker.DockerClient, down_s: float = 0.0, while_down: Callable[[], None] | None = None
) -> None:
    """Stops dockerd, keeps it down for ``down_s`` (calling ``while_down`` meanwhile), starts it again."""
    subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=True)
    wait_for(
        lambda: subprocess.run(["pgrep", "-x", "dockerd"], check=False).returncode != 0,
        60,
        "dockerd to stop",
        interval=0.5,
    )
    until = time.monotonic() + down_s
    if while_down is not None:
        while_down()
    time.sleep(max(0.0, until - time.monotonic()))
    subprocess.run(["bash", "scripts/bootstrap-host.sh"], cwd=ROOT, check=True, capture_output=True)
    wait_for(client.ping, 60, "dockerd to answer")


@pytest.mark.slow
@pytest.mark.skipif(not MARKER.exists(), reason="dockerd was not started by scripts/bootstrap-host.sh")
def test_dockerd_restart_brings_tenants_back_without_duplicates(
    manager_settings, docker_client: docker.DockerClient, instance: str, encrypted_volumes: dict[str, Any]
) -> None:
    """Also a reboot's path for an encrypted tenant (two): while dockerd is down its volume is
    closed as a reboot leaves it (no mount, no loop device, no key in the kernel); the manager
    opens it again before its engine starts, and what the engine wrote is there."""
    mgr = start_manager(manager_settings(reconcile_interval_s=2.0, **encrypted_volumes))
    volumes = FscryptVolumes(encrypted_volumes["volumes_dir"] / instance)
    try:
        api = mgr.client()
        for i, name in enumerate(("one", "two")):
            body = {"name": name, "gpu_memory": "1536M", "port": 30601 + i, "volume": "encrypted" if i else "plain"}
            r = api.post("/api/v1/tenants", json=body)
            assert r.status_code == 201, r.text
        for name in ("one", "two"):
            wait_status(api, name, "running")
        wrote = docker_client.containers.get(names.engine(instance, "two")).exec_run(
            ["python3", "-c", "open('/data/kept.txt', 'w').write('before the reboot')"]
        )
        assert wrote.exit_code == 0, wrote.output

        def api_says_runtime_unavailable() -> None:
            for path in ("/api/v1/tenants", "/api/v1/capacity"):
                r = api.get(path)
                assert r.status_code == 503, (path, r.text)
                error = r.json()["error"]
                assert error["code"] == "runtime_unavailable"
                assert error["message"].startswith("container runtime unavailable"), error
            assert api.get("/healthz").status_code == 200  # the manager itself lives on
            volumes.close("two")  # as a reboot leaves it
            assert not volumes.is_open("two") and not volumes.data_path("two").exists()

        restart_dockerd(docker_client, down_s=8.0, while_down=api_says_runtime_unavailable)
        started = time.time()

        def back(name: str) -> bool:
            """Its engine started again after the restart and serves (a status read right after the
            restart may still be the one from before it, while the reconciler replaces the engine)."""
            try:
                state = docker_client.containers.get(names.engine(instance, name)).attrs["State"]
            except docker.errors.NotFound:
                return False
            since = datetime.fromisoformat(state["StartedAt"][:26]).replace(tzinfo=UTC).timestamp()
            healthy = state["Running"] and state.get("Health", {}).get("Status") == "healthy"
            return bool(healthy and since > started - 2)

        for name in ("one", "two"):
            wait_for(lambda name=name: back(name), 300, f"{name}'s engine to serve again")  # type: ignore[misc]
            wait_status(api, name, "running", timeout=60)
        roles = Counter(
            (c.labels[names.TENANT], c.labels[names.ROLE])
            for c in docker_client.containers.list(all=True, filters={"label": names.selector(instance)})
            if names.TENANT in c.labels
        )
        assert roles == {("one", "engine"): 1, ("one", "gateway"): 1, ("two", "engine"): 1, ("two", "gateway"): 1}
        # engines started one at a time: the second only after the first was healthy (25 s and more)
        starts = sorted(
            datetime.fromisoformat(
                docker_client.containers.get(names.engine(instance, n)).attrs["State"]["StartedAt"][:26]
            ).timestamp()
            for n in ("one", "two")
        )
        assert starts[1] - starts[0] >= 10, starts
        assert time.time() - started < 300
        assert volumes.is_open("two") and (volumes.data_path("two") / "kept.txt").read_text() == "before the reboot"
    finally:
        mgr.stop()
