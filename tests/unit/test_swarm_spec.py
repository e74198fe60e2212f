"""The swarm runtime's pure parts: a plan as a service spec, a task as a container's state
(``manager.runtime.swarm``; the runtime itself: tests/integration/test_swarm.py)."""

from __future__ import annotations

from manager import names
from manager.names import Role
from manager.runtime.swarm import newest, service_spec, task_state
from manager.runtime.types import ContainerPlan, Mount

LABELS = names.labels("gtmt", Role.GATEWAY, "acme", spec_hash="h1")


def gateway(**over: object) -> ContainerPlan:
    plan = ContainerPlan(
        name="gtmt-t-acme-gateway",
        image="gtm-manager:dev",
        command=["gateway"],
        labels=LABELS,
        network="gtmt-control",
        extra_networks={"gtmt-t-acme": ["gateway"]},
        env={"A": "1"},
        mounts=[Mount("gtmt-t-acme-gw", "/data")],
        tmpfs={"/tmp": "rw,nosuid,nodev,size=64m"},
        mem_limit=1024**3,
        pids_limit=256,
        ports={8000: ("0.0.0.0", 30001)},
        restart_policy="unless-stopped",
        healthcheck={"test": ["CMD", "true"], "interval": 5, "timeout": 4, "retries": 3, "start_period": 30},
        node="ux5w7p1tuni19qubt9bknvvb5",
    )
    return plan.__class__(**{**plan.__dict__, **over})


def test_a_long_running_plan_is_one_replica_with_its_hardening_ports_and_node() -> None:
    spec = service_spec(gateway())
    task = spec["TaskTemplate"]
    c = task["ContainerSpec"]
    assert spec["Name"] == "gtmt-t-acme-gateway" and spec["Labels"] == c["Labels"] == LABELS
    assert spec["Mode"] == {"Replicated": {"Replicas": 1}}
    assert c["User"] == "1000:1000" and c["ReadOnly"] is True and c["CapabilityDrop"] == ["ALL"]
    assert c["StopGracePeriod"] == 100_000_000, "a removed service's container is killed at once"
    assert c["Args"] == ["gateway"] and "Command" not in c and c["Env"] == ["A=1"]
    assert c["Healthcheck"] == {"Test": ["CMD", "true"], "Interval": 5, "Timeout": 4, "Retries": 3, "StartPeriod": 30}
    volume, tmp = c["Mounts"]
    assert volume["Type"] == "volume" and volume["VolumeOptions"]["Labels"] == names.labels("gtmt", Role.VOLUME, "acme")
    assert tmp == {"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": 64 * 1024**2}}
    assert task["Resources"]["Limits"] == {"MemoryBytes": 1024**3, "Pids": 256}
    assert task["RestartPolicy"]["Condition"] == "any"
    assert task["Networks"] == [
        {"Target": "gtmt-control", "Aliases": []},
        {"Target": "gtmt-t-acme", "Aliases": ["gateway"]},
    ]
    assert task["Placement"]["Constraints"] == ["node.id==ux5w7p1tuni19qubt9bknvvb5"]
    assert spec["EndpointSpec"] == {
        "Mode": "dnsrr",
        "Ports": [{"Protocol": "tcp", "TargetPort": 8000, "PublishedPort": 30001, "PublishMode": "host"}],
    }


def test_a_one_off_plan_is_a_replicated_job_on_no_network() -> None:
    spec = service_spec(
        gateway(
            entrypoint=["python3", "-c", "pass"],
            command=[],
            network="none",
            extra_networks={},
            ports={},
            healthcheck=None,
            restart_policy="no",
            node=None,
        ),
        job=True,
    )
    assert spec["Mode"] == {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
    assert spec["TaskTemplate"]["ContainerSpec"]["Command"] == ["python3", "-c", "pass"]
    assert spec["TaskTemplate"]["Networks"] == [] and spec["TaskTemplate"]["Placement"]["Constraints"] == []


def test_a_plans_gpu_reaches_the_nvidia_runtime_through_the_environment() -> None:
    spec = service_spec(gateway(gpu_device_ids=["GPU-5f1c", "MIG-GPU-5f1c/1/0"], env={"A": "1"}))
    env = spec["TaskTemplate"]["ContainerSpec"]["Env"]
    assert env == ["A=1", "NVIDIA_VISIBLE_DEVICES=GPU-5f1c,MIG-GPU-5f1c/1/0"]
    assert "NVIDIA_VISIBLE_DEVICES" not in str(service_spec(gateway(env={"A": "1"}))["TaskTemplate"])


def test_an_engines_reservation_is_held_by_swarms_own_accounting_on_its_node() -> None:
    """A GPU's as the node's ``gpumem-<uuid>`` generic resource in whole MiB (rounded up), host
    memory as a memory reservation; a plan without one (a gateway) reserves nothing."""
    gpu = service_spec(gateway(gpu_device_ids=["GPU-5f1c"], reserved=10 * 1024**3 + 1))["TaskTemplate"]
    kind = {"Kind": "gpumem-GPU-5f1c", "Value": 10 * 1024 + 1}
    assert gpu["Resources"]["Reservations"] == {"GenericResources": [{"DiscreteResourceSpec": kind}]}
    host = service_spec(gateway(reserved=3 * 1024**3))["TaskTemplate"]
    assert host["Resources"]["Reservations"] == {"MemoryBytes": 3 * 1024**3}
    assert service_spec(gateway())["TaskTemplate"]["Resources"]["Reservations"] == {}


def test_a_plan_run_everywhere_is_a_global_service() -> None:
    spec = service_spec(gateway(ports={}, node=None), everywhere=True)
    assert spec["Mode"] == {"Global": {}}
    assert spec["TaskTemplate"]["Placement"]["Constraints"] == []


SERVICE = {
    "ID": "svc1",
    "Spec": {
        "Name": "gtmt-t-acme-gateway",
        "TaskTemplate": {"ContainerSpec": {"Labels": LABELS, "Healthcheck": {"Test": ["CMD", "true"]}}},
    },
}


def task(state: str, created: str = "2026-12-07T00:00:00Z", **status: object) -> dict[str, object]:
    return {"CreatedAt": created, "Status": {"State": state, "Timestamp": created, **status}}


def test_a_task_reads_as_the_container_it_stands_for() -> None:
    assert task_state(SERVICE, task("pending", Err="no suitable node (insufficient resources on 2 nodes)")).status == (
        "created"
    )
    assert task_state(SERVICE, None).status == "created"
    starting = task_state(SERVICE, task("starting"))
    assert (starting.status, starting.health) == ("running", "starting")
    assert task_state(SERVICE, task("running")).health == "healthy", "a task with a health check runs once it passes"
    failed = task_state(SERVICE, task("failed", ContainerStatus={"ExitCode": 3}, Err="task: non-zero exit (3)"))
    assert (failed.status, failed.exit_code, failed.error) == ("exited", 3, "task: non-zero exit (3)")
    assert task_state(SERVICE, task("shutdown")).exit_code == 137
    assert task_state(SERVICE, task("complete")).exit_code == 0
    plain = {"ID": "svc2", "Spec": {"Name": "x", "TaskTemplate": {"ContainerSpec": {"Labels": {}}}}}
    assert task_state(plain, task("running")).health is None
    state = task_state(SERVICE, task("running"))
    assert (state.tenant, state.role, state.spec_hash, state.id) == ("acme", Role.GATEWAY, "h1", "svc1")


def test_the_newest_task_stands_for_the_service() -> None:
    old, new = task("failed", "2026-12-07T00:00:00Z"), task("running", "2026-12-07T00:01:00Z")
    assert newest([new, old]) is new and newest([]) is None
