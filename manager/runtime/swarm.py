"""The runtime on a Docker Swarm: one service of one replica per container plan, through the API
of a swarm manager node. Swarm does the scheduling, membership, failure detection and overlay
networking; this adapter only turns plans into services and tasks back into container states.

What maps how:

- a container is a service named as the plan's container, its labels on the service and on its
  container; its state is that of its newest task (``task_state``);
- a tenant network is an attachable overlay network (internal when the plan says so);
- ports are published in host mode on the node the task runs on (no IPVS routing mesh needed);
- a one-off container (``run_to_completion``) is a replicated job;
- a plan's ``node`` is a placement constraint on the node's ID;
- events are read from the tasks' states, polled (a manager's event stream has no task deaths).

A container's memory and host PIDs are its node's to tell: they come from the node agents'
reports (``reports``; ``run_everywhere`` runs the agents, ``task_addresses`` finds them).

Not here yet, and why: volumes are node-local, made where a task mounts them (``volumes`` lists
the manager node's); Swarm services take no IPC mode, shm size or
no-new-privileges option, which these plans' hardening asks of a single host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import docker
import docker.errors

from manager import names
from manager.errors import RuntimeUnavailable
from manager.names import Role
from manager.node_report import NodeReport, ReportedContainer
from manager.runtime.docker import DockerRuntime
from manager.runtime.protocol import EventStream
from manager.runtime.types import ContainerPlan, ContainerState, NetworkPlan, RuntimeEvent

NANO = 1_000_000_000
STARTED = ("starting", "running")
"""Task states whose container has started. A task with a health check is ``starting`` until the
check passes, then ``running``; one that fails its check is ended by Swarm."""
ENDED = ("complete", "failed", "shutdown", "rejected", "orphaned", "remove")
RESTART = {"no": "none", "on-failure": "on-failure", "unless-stopped": "any", "always": "any"}
POLL_S = 0.25
REMOVE_WAIT_S = 30.0
REMOVE_GRACE_NS = NANO // 10


def task_state(service: dict[str, Any], task: dict[str, Any] | None) -> ContainerState:
    """A service's newest task as a container's state (pure): created while it waits for a node
    (its error then says why, e.g. "no suitable node"), running while its container runs (health
    ``starting`` until a health check passes, ``healthy`` after), exited once it ended."""
    spec = service.get("Spec", {})
    labels = dict(spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("Labels") or {})
    has_check = bool(spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("Healthcheck"))
    status = (task or {}).get("Status", {})
    state = str(status.get("State", "pending"))
    container = status.get("ContainerStatus") or {}
    if state in STARTED:
        shown, health = "running", ("healthy" if state == "running" else "starting") if has_check else None
    elif state in ENDED:
        shown, health = "exited", None
    else:
        shown, health = "created", None
    exit_code = container.get("ExitCode") if shown == "exited" else None
    if shown == "exited" and exit_code is None:
        exit_code = 0 if state == "complete" else 137
    return ContainerState(
        id=str(service.get("ID", "")),
        name=str(spec.get("Name", "")),
        labels=labels,
        status=shown,
        health=health,
        exit_code=exit_code,
        oom_killed=False,
        error=str(status.get("Err", "")),
        started_at=str(status.get("Timestamp", "")) if shown == "running" else "",
        finished_at=str(status.get("Timestamp", "")) if shown == "exited" else "",
        ports={},
    )


def newest(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The task that stands for the service now: the newest by creation."""
    return max(
        tasks, key=lambda t: (str(t.get("CreatedAt", "")), int(t.get("Version", {}).get("Index", 0))), default=None
    )


def volume_labels(container: dict[str, str]) -> dict[str, str]:
    """The labels of a volume a task makes on its node (as ``ensure_volume`` labels one on the
    manager's): the container's instance and tenant, as a volume."""
    keep = (names.MANAGED, names.INSTANCE, names.TENANT)
    return {k: v for k, v in container.items() if k in keep} | {names.ROLE: Role.VOLUME.value}


def service_spec(plan: ContainerPlan, job: bool = False, everywhere: bool = False) -> dict[str, Any]:
    """The Engine API's ServiceSpec for a plan (pure, unit-tested): one replica, a replicated job
    for a one-off (``job``: ``run_to_completion``), or one task on every node (``everywhere``: a
    global service, as the node agents run); its hardening as far as Swarm takes it."""
    container: dict[str, Any] = {
        "Image": plan.image,
        # a removed service's container is killed at once, as ``docker rm -f`` kills one;
        # ``stop_container`` gives its own timeout
        "StopGracePeriod": REMOVE_GRACE_NS,
        "Labels": plan.labels,
        # a service has no --gpus: the node's default runtime (NVIDIA's) exposes what this names
        "Env": [f"{k}={v}" for k, v in (plan.env | gpu_env(plan)).items()],
        "User": plan.user,
        "ReadOnly": plan.read_only,
        "CapabilityDrop": plan.cap_drop,
        "Mounts": [
            {"Type": m.kind, "Source": m.source, "Target": m.target, "ReadOnly": m.read_only}
            | ({"VolumeOptions": {"Labels": volume_labels(plan.labels)}} if m.kind == "volume" else {})
            for m in plan.mounts
        ]
        + [
            {"Type": "tmpfs", "Target": target, "TmpfsOptions": tmpfs_options(options)}
            for target, options in plan.tmpfs.items()
        ],
    }
    if plan.cap_add:
        container["CapabilityAdd"] = plan.cap_add
    if plan.entrypoint is not None:
        container["Command"] = plan.entrypoint
        container["Args"] = plan.command
    elif plan.command:
        container["Args"] = plan.command
    if plan.working_dir:
        container["Dir"] = plan.working_dir
    if plan.healthcheck:
        container["Healthcheck"] = {key.title().replace("_", ""): value for key, value in plan.healthcheck.items()}
    limits: dict[str, Any] = {}
    if plan.mem_limit:
        limits["MemoryBytes"] = plan.mem_limit
    if plan.nano_cpus:
        limits["NanoCPUs"] = plan.nano_cpus
    if plan.pids_limit:
        limits["Pids"] = plan.pids_limit
    networks = [] if plan.network in ("none", "bridge", "host") else [{"Target": plan.network, "Aliases": plan.aliases}]
    networks += [{"Target": name, "Aliases": aliases} for name, aliases in plan.extra_networks.items()]
    task: dict[str, Any] = {
        "ContainerSpec": container,
        "Resources": {"Limits": limits, "Reservations": reservations(plan)},
        "RestartPolicy": {"Condition": RESTART.get(plan.restart_policy, "none"), "MaxAttempts": 0},
        "Networks": networks,
        "Placement": {"Constraints": [f"node.id=={plan.node}"] if plan.node else []},
    }
    spec: dict[str, Any] = {
        "Name": plan.name,
        "Labels": plan.labels,
        "TaskTemplate": task,
        "Mode": {"Global": {}}
        if everywhere
        else {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}}
        if job
        else {"Replicated": {"Replicas": 1}},
        "EndpointSpec": {
            "Mode": "dnsrr",
            "Ports": [
                {"Protocol": "tcp", "TargetPort": cport, "PublishedPort": hport, "PublishMode": "host"}
                for cport, (_, hport) in plan.ports.items()
            ],
        },
    }
    return spec


GPU_MEMORY_RESOURCE = "gpumem-{uuid}"
"""The generic resource a GPU node advertises per device, in MiB (``manager node-agent --resources``)."""


def reservations(plan: ContainerPlan) -> dict[str, Any]:
    """What Swarm's scheduler holds for the task on its node: an engine's reservation, of its GPUs
    as their ``gpumem-<uuid>`` generic resources (in whole MiB, rounded up), or of host memory. A
    task whose node lacks it stays pending, saying so, and is never placed where it does not fit."""
    if not plan.reserved:
        return {}
    if plan.gpu_device_ids:
        mib = -(-plan.reserved // 1024**2)
        return {
            "GenericResources": [
                {"DiscreteResourceSpec": {"Kind": GPU_MEMORY_RESOURCE.format(uuid=uuid), "Value": mib}}
                for uuid in plan.gpu_device_ids
            ]
        }
    return {"MemoryBytes": plan.reserved}


def gpu_env(plan: ContainerPlan) -> dict[str, str]:
    """The plan's GPUs (UUIDs of GPUs or MIG instances) as the NVIDIA runtime reads them from a
    container's environment, Swarm services having no device requests."""
    return {"NVIDIA_VISIBLE_DEVICES": ",".join(plan.gpu_device_ids)} if plan.gpu_device_ids else {}


def tmpfs_options(options: str) -> dict[str, Any]:
    """Docker's ``size=64m,...`` tmpfs options as a service mount's (its size only; Swarm mounts a
    tmpfs nosuid and nodev)."""
    for part in options.split(","):
        if part.startswith("size="):
            value = part.removeprefix("size=").lower()
            scale = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(value[-1:], 1)
            return {"SizeBytes": int(value.rstrip("kmg")) * scale}
    return {}


class _TaskEvents:
    """Events read from the tasks' states every ``POLL_S``: ``start`` when a service's task starts,
    ``health_status`` when it turns healthy, ``die`` when it ends, ``destroy`` when its service goes."""

    def __init__(self, runtime: SwarmRuntime, selector: list[str]) -> None:
        self._runtime, self._selector = runtime, selector
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[RuntimeEvent]:
        seen: dict[str, ContainerState] = {}
        while not self._closed.is_set():
            now = {c.name: c for c in self._runtime.containers(self._selector)}
            for name, state in now.items():
                yield from self._changes(seen.get(name), state)
            for name, state in seen.items():
                if name not in now:
                    if state.status == "running":
                        yield RuntimeEvent(name, state.labels, "die")
                    yield RuntimeEvent(name, state.labels, "destroy")
            seen = now
            self._closed.wait(POLL_S)

    @staticmethod
    def _changes(was: ContainerState | None, now: ContainerState) -> Iterator[RuntimeEvent]:
        if now.status == "running" and (was is None or was.status != "running" or was.id != now.id):
            yield RuntimeEvent(now.name, now.labels, "start")
        if now.health == "healthy" and (was is None or was.health != "healthy"):
            yield RuntimeEvent(now.name, now.labels, "health_status")
        if now.status == "exited" and was is not None and was.status == "running":
            yield RuntimeEvent(now.name, now.labels, "die")

    def close(self) -> None:
        self._closed.set()


class SwarmRuntime(DockerRuntime):
    """Networks, volumes, images and ping as ``DockerRuntime`` on the manager node; containers as
    services. ``start_timeout_s``: how long ``run`` waits for a task to be placed and started."""

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        start_timeout_s: float = 60.0,
        reports: Callable[[], dict[str, NodeReport]] | None = None,
    ) -> None:
        super().__init__(client)
        self._api: Any = self._client.api  # the low-level API: service specs as the Engine API has them
        self.start_timeout_s = start_timeout_s
        self.reports = reports or (lambda: {})
        """The node agents' reports by node ID (``runtime.nodes.AgentReader``): what only a task's
        node can measure. Without them a container's memory is unknown (None)."""

    def _driver(self, plan: NetworkPlan) -> dict[str, Any]:
        """An attachable overlay across the nodes; the bridge options of a single host do not apply."""
        return {"driver": "overlay", "attachable": True, "scope": "swarm"}

    # ---------------------------------------------------------------- services
    def _service(self, name: str) -> dict[str, Any] | None:
        found = [s for s in self._api.services(filters={"name": name}) if s["Spec"]["Name"] == name]
        return found[0] if found else None

    def _tasks(self, service_id: str) -> list[dict[str, Any]]:
        return list(self._api.tasks(filters={"service": service_id}))

    def _state_of(self, service: dict[str, Any]) -> ContainerState:
        return task_state(service, newest(self._tasks(service["ID"])))

    def containers(self, selector: list[str]) -> list[ContainerState]:
        def run() -> list[ContainerState]:
            services = self._api.services(filters={"label": selector})
            return [self._state_of(s) for s in services]

        return self._call("listing services", run)

    def container(self, name: str) -> ContainerState | None:
        def run() -> ContainerState | None:
            service = self._service(name)
            return self._state_of(service) if service else None

        return self._call(f"inspecting service {name}", run)

    def _remove(self, name: str) -> None:
        """Removes the service, then waits (up to ``REMOVE_WAIT_S``) for its containers on this
        node to go, so that its volumes here are free; other nodes remove theirs on their own."""
        service = self._service(name)
        if service is None:
            return
        with suppress(docker.errors.NotFound):
            self._api.remove_service(service["ID"])
        deadline = time.monotonic() + REMOVE_WAIT_S
        mine = {"label": [f"com.docker.swarm.service.id={service['ID']}"]}
        while self._api.containers(all=True, filters=mine) and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def _create(self, plan: ContainerPlan, job: bool = False, everywhere: bool = False) -> str:
        self._remove(plan.name)
        spec = service_spec(plan, job, everywhere)
        created = self._api.create_service(
            spec["TaskTemplate"], name=spec["Name"], labels=spec["Labels"], mode=spec["Mode"],
            endpoint_spec=spec["EndpointSpec"],
        )  # fmt: skip
        return str(created["ID"])

    def _wait(self, service_id: str, done: Callable[[ContainerState], bool], timeout_s: float) -> ContainerState:
        deadline = time.monotonic() + timeout_s
        while True:
            service = self._api.inspect_service(service_id)
            state = self._state_of(service)
            if done(state) or time.monotonic() > deadline:
                return state
            time.sleep(POLL_S)

    def run(self, plan: ContainerPlan) -> ContainerState:
        def run() -> ContainerState:
            service_id = self._create(plan)
            # placed and started, or left pending with Swarm's reason (no node has what it reserves)
            state = self._wait(service_id, lambda s: s.status != "created" or bool(s.error), self.start_timeout_s)
            if state.status == "exited" and state.error:
                self._remove(plan.name)
                raise RuntimeUnavailable(f"starting {plan.name}: {state.error}")
            return state

        return self._call(f"starting {plan.name}", run)

    def run_to_completion(self, plan: ContainerPlan, timeout_s: float, log_lines: int | None = 20) -> tuple[int, str]:
        def run() -> tuple[int, str]:
            service_id = self._create(plan, job=True)
            try:
                state = self._wait(service_id, lambda s: s.status == "exited", timeout_s)
                if state.status == "created" and state.error:
                    raise RuntimeUnavailable(f"running {plan.name}: {state.error}")
                code = state.exit_code if state.status == "exited" and state.exit_code is not None else -1
                return code, self._logs(service_id, log_lines)
            finally:
                self._remove(plan.name)

        return self._call(f"running {plan.name}", run)

    def publish_error(self, plan: ContainerPlan) -> str | None:
        """A service that only holds the plan's ports: Swarm's scheduler says whether some node can
        publish them (it leaves the task pending, naming the port, when none can)."""

        def run() -> str | None:
            service_id = self._create(plan)
            try:
                state = self._wait(service_id, lambda s: s.status != "created" or bool(s.error), 10.0)
                return None if state.status == "running" else state.error or "not placed"
            finally:
                self._remove(plan.name)

        return self._call(f"probing ports with {plan.name}", run)

    def container_ip(self, name: str, network: str) -> str | None:
        def run() -> str | None:
            service = self._service(name)
            task = newest(self._tasks(service["ID"])) if service else None
            if task is None or task.get("Status", {}).get("State") not in STARTED:
                return None
            for attachment in task.get("NetworksAttachments") or []:
                if attachment.get("Network", {}).get("Spec", {}).get("Name") == network and attachment.get("Addresses"):
                    return str(attachment["Addresses"][0]).split("/", 1)[0]
            return None

        return self._call(f"reading the address of {name}", run)

    def stop_container(self, name: str, timeout: int = 5) -> None:
        """Scales the service to none: its task is shut down and read as exited."""

        def run() -> None:
            service = self._service(name)
            if service is None:
                return
            spec = service["Spec"]
            if "Replicated" not in spec.get("Mode", {}):
                self._api.remove_service(service["ID"])
                return
            # docker stop's timeout: SIGTERM, then SIGKILL after this long
            spec["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] = timeout * NANO
            self._api.update_service(
                service["ID"], version=service["Version"]["Index"], task_template=spec["TaskTemplate"],
                name=spec["Name"], labels=spec.get("Labels"), mode={"Replicated": {"Replicas": 0}},
                endpoint_spec=spec.get("EndpointSpec"),
            )  # fmt: skip
            self._wait(service["ID"], lambda s: s.status != "running", timeout + 30)

        self._call(f"stopping {name}", run)

    def remove_container(self, name: str) -> None:
        self._call(f"removing {name}", lambda: self._remove(name))

    def _logs(self, service_id: str, lines: int | None) -> str:
        tail = "all" if lines is None else lines
        raw = self._api.service_logs(service_id, stdout=True, stderr=True, tail=tail, follow=False)
        return b"".join(raw).decode(errors="replace") if not isinstance(raw, str) else raw

    def logs_tail(self, name: str, lines: int = 40) -> str:
        def run() -> str:
            service = self._service(name)
            return self._logs(service["ID"], lines) if service else ""

        return self._call(f"reading the logs of {name}", run)

    def run_everywhere(self, plan: ContainerPlan) -> None:
        """One task of ``plan`` on every node, now and on each node that joins (a global service);
        made when missing or when its labels (its spec hash) differ from the plan's."""

        def run() -> None:
            service = self._service(plan.name)
            if service is not None and service["Spec"].get("Labels") == plan.labels:
                return
            self._create(plan, everywhere=True)

        self._call(f"starting {plan.name} on every node", run)

    def node_addresses(self) -> dict[str, str]:
        """Each node's address in the swarm (its advertise address), by node ID."""

        def run() -> dict[str, str]:
            return {str(n["ID"]): str(n.get("Status", {}).get("Addr", "")) for n in self._api.nodes()}

        return self._call("listing the swarm's nodes", run)

    def task_addresses(self, name: str, network: str) -> dict[str, str]:
        """The address on ``network`` of each running task of service ``name``, by node ID."""

        def run() -> dict[str, str]:
            service = self._service(name)
            out: dict[str, str] = {}
            for task in self._tasks(service["ID"]) if service else []:
                if task.get("Status", {}).get("State") != "running" or not task.get("NodeID"):
                    continue
                for attachment in task.get("NetworksAttachments") or []:
                    if attachment.get("Network", {}).get("Spec", {}).get("Name") == network and attachment.get(
                        "Addresses"
                    ):
                        out[str(task["NodeID"])] = str(attachment["Addresses"][0]).split("/", 1)[0]
            return out

        return self._call(f"reading the addresses of {name}", run)

    def _reported(self, name: str) -> ReportedContainer | None:
        """The container of service ``name`` as its node's agent last reported it."""
        for report in self.reports().values():
            for container in report.containers:
                if container.name == name:
                    return container
        return None

    def memory_usage(self, name: str) -> int | None:
        """As the task's node measures it (its agent's report); None when no agent reports it."""
        found = self._reported(name)
        return found.memory if found else None

    def container_pids(self, name: str) -> set[int]:
        """Host PIDs on the task's node (its agent's report); empty when no agent reports it."""
        found = self._reported(name)
        return set(found.pids) if found else set()

    def published_ports(self) -> dict[int, str]:
        def run() -> dict[int, str]:
            out: dict[int, str] = {}
            for service in self._api.services():
                for port in service["Spec"].get("EndpointSpec", {}).get("Ports") or []:
                    if port.get("PublishedPort"):
                        out[int(port["PublishedPort"])] = service["Spec"]["Name"]
            return out

        return self._call("listing published ports", run)

    def events(self, selector: list[str]) -> EventStream:
        return _TaskEvents(self, selector)
