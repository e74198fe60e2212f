"""Control plane on the real path: tenants become real vLLM CPU engine containers,
admitted against host memory (cpu mode), reconciled, resized, removed, and kept
across a restart of the manager."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from manager import names
from manager.gpu.cpu import read_meminfo

from .conftest import RunningManager, run_probe, start_manager, wait_for, wait_status
from .probes import CHAT
from .test_engine_image import assert_isolated

M = 1024**2
TENANT = 1536 * M
BIN = Path(sys.executable).parent


def total_memory() -> int:
    return read_meminfo(Path("/proc/meminfo"))["MemTotal"]


@pytest.fixture
def manager(manager_settings) -> Iterator[RunningManager]:
    # room for exactly two 1.5 GiB tenants plus 256 MiB
    mgr = start_manager(manager_settings(headroom=total_memory() - 2 * TENANT - 256 * M))
    yield mgr
    mgr.stop()


def engines(client: docker.DockerClient, instance: str) -> dict[str, str]:
    found = client.containers.list(all=True, filters={"label": names.selector(instance, role="engine")})
    return {c.labels[names.TENANT]: c.id for c in found}


def assert_hardened(client: docker.DockerClient, instance: str, tenant: str, memory: int) -> None:
    """The engine runs read-only, without capabilities, as uid 1000, capped at its reservation,
    with nothing published, on an internal network, and can write its volume (/data)."""
    engine = client.containers.get(names.engine(instance, tenant))
    host = engine.attrs["HostConfig"]
    assert host["ReadonlyRootfs"] and host["CapDrop"] == ["ALL"] and host["Memory"] == memory
    assert engine.attrs["Config"]["User"] == "1000:1000"
    owner = engine.exec_run(
        ["python3", "-c", "import os; open('/data/written', 'w').write('x'); print(os.stat('/data').st_uid)"]
    )
    assert owner.exit_code == 0 and owner.output.decode().split() == ["1000"], owner.output
    assert not engine.attrs["NetworkSettings"]["Ports"], "nothing is published"
    assert client.networks.get(names.network(instance, tenant)).attrs["Internal"] is True


def cli(mgr: RunningManager, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=mgr.cli_env(), capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.slow
def test_tenant_lifecycle_on_real_engines(
    manager: RunningManager, docker_client: docker.DockerClient, instance: str, manager_settings
) -> None:
    api = manager.client()
    added = cli(
        manager, "add-tenant", "--name", "alpha", "--gpu-memory", "1536M", "--port", "30101", "--rpm-limit", "30"
    )
    assert added.returncode == 0, added.stderr
    assert "API key (shown once" in added.stdout
    key = added.stdout.split("store it now): ")[1].strip()
    assert key.startswith("gtm_")
    created = api.post("/api/v1/tenants", json={"name": "beta", "gpu_memory": "1536M", "port": 30102})
    assert created.status_code == 201, created.text
    assert created.json()["admission"]["admitted"] is True

    # the API key is stored as a hash only
    db = (manager.settings.database_path).read_bytes()
    assert key.encode() not in db

    for name in ("alpha", "beta"):
        wait_status(api, name, "running")
    # each engine serves chat, whole and streamed, on its tenant's internal network
    for name in ("alpha", "beta"):
        out = run_probe(
            docker_client, instance, names.network(instance, name), CHAT.format(host="engine", port=8000, model="demo")
        )
        result = json.loads(out.strip().splitlines()[-1])
        assert result["models"] == ["demo"] and result["chat_status"] == 200
        usage = result["chat"]["usage"]
        assert usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert result["stream_chunks"] > 1 and result["stream_usage"]["completion_tokens"] > 0
    assert_hardened(docker_client, instance, "alpha", TENANT)

    # a third tenant does not fit: refused with the numbers, nothing created
    refused = cli(manager, "add-tenant", "--name", "gamma", "--gpu-memory", "1536M", "--port", "30103")
    assert refused.returncode == 5
    assert "ledger: 1.5 GiB requested but only 256.0 MiB is unreserved" in refused.stderr
    assert "reserved_by_others=3.0 GiB" in refused.stderr
    body = api.post("/api/v1/tenants", json={"name": "gamma", "gpu_memory": "1536M", "port": 30103})
    assert body.status_code == 409
    error = body.json()["error"]
    assert error["code"] == "admission_refused"
    assert error["details"]["failed_checks"] == ["ledger"]
    assert error["details"]["numbers"]["requested"] == TENANT
    assert error["details"]["numbers"]["reserved_by_others"] == 2 * TENANT
    assert api.get("/api/v1/tenants/gamma").status_code == 404
    assert "gamma" not in engines(docker_client, instance)
    what_if = cli(manager, "what-if", "--gpu-memory", "256M")
    assert what_if.returncode == 5
    assert "model_fit" in what_if.stdout

    # each engine is isolated: not the other tenant's engine, the manager, the host or another network
    beta_ip = docker_client.containers.get(names.engine(instance, "beta")).attrs["NetworkSettings"]["Networks"][
        names.network(instance, "beta")
    ]["IPAddress"]
    assert_isolated(
        docker_client,
        instance,
        names.engine(instance, "alpha"),
        f"{beta_ip}:8000",
        f"127.0.0.1:{manager.settings.api_port}",
    )

    # restart the manager process: same containers, no duplicates, still running
    before = engines(docker_client, instance)
    manager.stop()
    restarted = start_manager(manager.settings)
    try:
        api = restarted.client()
        wait_for(lambda: api.get("/api/v1/tenants").status_code == 200, 30, "the manager")
        for name in ("alpha", "beta"):
            wait_status(api, name, "running", timeout=60)
        assert engines(docker_client, instance) == before

        # resize alpha: its engine is recreated with the new limit
        resized = cli(restarted, "update-tenant", "--name", "alpha", "--gpu-memory", "1792M")
        assert resized.returncode == 0, resized.stderr

        def recreated() -> bool:
            ids = engines(docker_client, instance)
            return ids.get("alpha") not in (None, before["alpha"])

        wait_for(recreated, 60, "alpha's engine to be recreated")
        wait_status(api, "alpha", "running")
        engine = docker_client.containers.get(names.engine(instance, "alpha"))
        assert engine.attrs["HostConfig"]["Memory"] == 1792 * M
        assert engines(docker_client, instance)["beta"] == before["beta"]

        # capacity and metrics see both tenants with measured use
        cap = api.get("/api/v1/capacity").json()
        assert cap["reserved"] == 1792 * M + TENANT
        assert all(t["measured"] and t["measured"] > 100 * M for t in cap["tenants"])
        metrics = dict(
            line.rsplit(" ", 1) for line in api.get("/metrics").text.splitlines() if line and not line.startswith("#")
        )
        assert float(metrics['gtm_tenant_reserved_bytes{tenant="alpha"}']) == 1792 * M
        assert float(metrics['gtm_tenant_measured_bytes{tenant="beta"}']) > 100 * M
        assert float(metrics['gtm_tenants{status="running"}']) == 2

        # remove beta: no container, network or volume of it is left
        removed = cli(restarted, "remove-tenant", "--name", "beta")
        assert removed.returncode == 0, removed.stderr
        sel = names.selector(instance, tenant="beta")

        def gone() -> bool:
            return not (
                docker_client.containers.list(all=True, filters={"label": sel})
                or docker_client.networks.list(filters={"label": sel})
                or docker_client.volumes.list(filters={"label": sel})
            )

        wait_for(gone, 60, "beta's resources to be removed")
        wait_for(lambda: api.get("/api/v1/tenants/beta").status_code == 404, 30, "beta's row to go")

        actions = [(e["action"], e["tenant"], e["result"]) for e in api.get("/api/v1/audit").json()]
        for entry in [
            ("add-tenant", "alpha", "ok"),
            ("add-tenant", "gamma", "refused"),
            ("update-tenant", "alpha", "ok"),
            ("remove-tenant", "beta", "ok"),
        ]:
            assert entry in actions
        listing = cli(restarted, "list-tenants", "--json")
        assert [t["name"] for t in json.loads(listing.stdout)] == ["alpha"]
        assert key not in json.dumps(api.get("/api/v1/audit").json())
    finally:
        restarted.stop()


def test_bounds_are_the_models_and_the_hosts_and_nothing_is_created(manager_settings) -> None:
    """The demo model knows 2048 positions: a longer context is refused at once, naming the limit
    (vLLM refused such an engine only at its start; an engine's own failure reason is checked in
    test_faults.py), and so is shared memory beyond the host's."""
    mgr = start_manager(manager_settings())
    try:
        api = mgr.client()
        base = {"name": "broken", "gpu_memory": "1536M", "port": 30111}
        r = api.post("/api/v1/tenants", json={**base, "max_model_len": 4096})
        assert r.status_code == 422 and "model demo's own limit of 2048 positions" in r.text, r.text
        what_if = api.post("/api/v1/what-if", json={"gpu_memory": "1536M", "max_model_len": 4096})
        assert what_if.status_code == 422 and "2048" in what_if.text
        r = api.post("/api/v1/tenants", json={**base, "shm_size": "500G"})
        assert r.status_code == 422 and "more than the host's memory" in r.text, r.text
        for flags, says in (
            (["--rpm-limit", "-5"], "must be 0 (no limit) or a positive number, got -5"),
            (["--gpu-memory", "-1G"], "size must be positive, got '-1G'"),
        ):
            args = ["add-tenant", "--name", "broken", "--port", "30111", *flags]
            if "--gpu-memory" not in flags:
                args += ["--gpu-memory", "1536M"]
            out = cli(mgr, *args)
            assert out.returncode == 2 and says in out.stderr and "expected one argument" not in out.stderr, out.stderr
        assert api.get("/api/v1/tenants").json() == []
    finally:
        mgr.stop()


def test_parallel_creates_never_overcommit(manager_settings, docker_client: docker.DockerClient, instance: str) -> None:
    fits = 5
    mgr = start_manager(manager_settings(headroom=total_memory() - fits * TENANT))
    try:
        api = mgr.client()
        results: list[int] = []
        lock = threading.Lock()

        def create(i: int) -> None:
            with mgr.client() as c:
                r = c.post("/api/v1/tenants", json={"name": f"p{i}", "gpu_memory": "1536M", "port": 30200 + i})
            with lock:
                results.append(r.status_code)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [201] * fits + [409] * (20 - fits)
        tenants = api.get("/api/v1/tenants").json()
        assert len(tenants) == fits
        assert sum(t["gpu_memory"] for t in tenants) <= total_memory() - mgr.settings.headroom
        for t in tenants:
            assert api.delete(f"/api/v1/tenants/{t['name']}").status_code == 202
        wait_for(lambda: api.get("/api/v1/tenants").json() == [], 60, "the tenants to be removed")
        assert engines(docker_client, instance) == {}
    finally:
        mgr.stop()


def test_orphans_are_removed_after_the_grace_period(
    manager_settings, docker_client: docker.DockerClient, instance: str
) -> None:
    ghost = docker_client.networks.create(
        names.network(instance, "ghost"), internal=True, labels=names.labels(instance, names.Role.NETWORK, "ghost")
    )
    mgr = start_manager(manager_settings(orphan_grace_s=4.0, reconcile_interval_s=1.0))
    try:

        def exists() -> bool:
            return bool(docker_client.networks.list(names=[ghost.name]))

        assert exists()  # not removed at first sight
        wait_for(lambda: not exists(), 30, "the orphaned network to be removed")
    finally:
        mgr.stop()


def test_a_port_taken_outside_docker_is_refused_at_once_and_nothing_is_created(manager_settings) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        mgr = start_manager(manager_settings())
        try:
            api = mgr.client()
            r = api.post("/api/v1/tenants", json={"name": "clash", "gpu_memory": "1536M", "port": port})
            assert r.status_code == 409, r.text
            message = r.json()["error"]["message"]
            assert message.startswith(f"port {port} is in use by another program on the host"), message
            assert "address already in use" in message and "pick another port" in message
            assert api.get("/api/v1/tenants").json() == []
            out = cli(mgr, "add-tenant", "--name", "clash", "--gpu-memory", "1536M", "--port", str(port), "--wait")
            assert out.returncode == 4 and f"port {port} is in use by another program" in out.stderr, out.stderr
        finally:
            mgr.stop()
