"""The Docker adapter: turns plans into SDK calls and reads actual state back by label.

With its swarm subclass (``swarm``), the only module that imports the Docker SDK. Every method is idempotent where
Docker allows it (ensure_*, remove_*), so the reconciler can call it again after
any failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import DeviceRequest, Mount

from manager.errors import Conflict, RuntimeUnavailable
from manager.runtime.protocol import EventStream
from manager.runtime.types import ContainerPlan, ContainerState, NetworkPlan, Resource, RuntimeEvent, VolumePlan

T = TypeVar("T")


@contextmanager
def _docker_errors(action: str) -> Iterator[None]:
    try:
        yield
    except docker.errors.APIError as exc:
        if exc.status_code == 409:
            raise Conflict(f"{action}: {exc.explanation}") from exc
        raise RuntimeUnavailable(
            f"container runtime unavailable: {action}: Docker said {exc.explanation or exc}"
        ) from exc
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise RuntimeUnavailable(
            f"container runtime unavailable: {action}: the Docker engine did not answer ({exc}); check that "
            "dockerd runs and that /var/run/docker.sock is mounted into the manager"
        ) from exc


def _state(container: Container) -> ContainerState:
    attrs = container.attrs
    st = attrs.get("State", {})
    health = st.get("Health", {}).get("Status") if st.get("Health") else None
    return ContainerState(
        id=container.id or "",
        name=container.name or "",
        labels=dict(attrs.get("Config", {}).get("Labels") or {}),
        status=st.get("Status", "unknown"),
        health=health,
        exit_code=st.get("ExitCode") if st.get("Status") in ("exited", "dead") else None,
        oom_killed=bool(st.get("OOMKilled")),
        error=st.get("Error", ""),
        started_at=st.get("StartedAt", ""),
        finished_at=st.get("FinishedAt", ""),
        ports=attrs.get("NetworkSettings", {}).get("Ports") or {},
    )


class _DockerEvents:
    """Docker's event stream (``GET /events``) as ``RuntimeEvent``s: container events only, the
    action without its detail ("health_status: healthy" is ``health_status``). The attributes
    Docker sends are the container's labels plus its name, image and exit code."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._closed = False

    def __iter__(self) -> Iterator[RuntimeEvent]:
        try:
            for raw in self._stream:
                if raw.get("Type") != "container":
                    continue
                attrs = dict((raw.get("Actor") or {}).get("Attributes") or {})
                action = str(raw.get("Action", "")).split(":", 1)[0]
                yield RuntimeEvent(str(attrs.get("name", "")), attrs, action)
        except Exception as exc:  # the socket closed under the read: by close(), or by dockerd going
            if self._closed:
                return
            raise RuntimeUnavailable(f"container runtime unavailable: following events: {exc!r}") from exc
        if not self._closed:  # dockerd ended the stream (it stopped)
            raise RuntimeUnavailable("container runtime unavailable: Docker ended its event stream")

    def close(self) -> None:
        self._closed = True
        with suppress(Exception):
            self._stream.close()


class DockerRuntime:
    def __init__(self, client: docker.DockerClient | None = None) -> None:
        with _docker_errors("connecting to Docker"):
            # room for the service's concurrent engine reads next to the reconciler's calls
            self._client = client or docker.from_env(timeout=60, max_pool_size=32)

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    def _call(self, action: str, fn: Callable[[], T]) -> T:
        with _docker_errors(action):
            return fn()

    def ping(self) -> bool:
        return self._call("ping", self._client.ping)

    def node_identity(self) -> tuple[str, str]:
        """This engine's swarm node ID ('' outside a swarm) and its host name."""
        info = self._call("reading the engine's info", self._client.info)
        return str((info.get("Swarm") or {}).get("NodeID") or ""), str(info.get("Name") or "")

    # ---------------------------------------------------------------- networks & volumes
    def ensure_network(self, plan: NetworkPlan) -> None:
        def run() -> None:
            # Docker's name filter matches parts of names: gtm-t-demo finds gtm-t-demo-vl
            if not any(n.name == plan.name for n in self._client.networks.list(names=[plan.name])):
                self._client.networks.create(
                    plan.name, internal=plan.internal, labels=plan.labels, check_duplicate=True, **self._driver(plan)
                )

        self._call(f"creating network {plan.name}", run)

    def _driver(self, plan: NetworkPlan) -> dict[str, Any]:
        """How a network is made on this runtime: a bridge with the plan's options, on one host."""
        return {"driver": "bridge", "options": plan.options}

    def ensure_volume(self, plan: VolumePlan) -> None:
        def run() -> None:
            try:
                self._client.volumes.get(plan.name)
            except docker.errors.NotFound:
                self._client.volumes.create(plan.name, labels=plan.labels)

        self._call(f"creating volume {plan.name}", run)

    def networks(self, selector: list[str]) -> list[Resource]:
        found = self._call("listing networks", lambda: self._client.networks.list(filters={"label": selector}))
        return [Resource(n.name or "", dict(n.attrs.get("Labels") or {})) for n in found]

    def volumes(self, selector: list[str]) -> list[Resource]:
        found = self._call("listing volumes", lambda: self._client.volumes.list(filters={"label": selector}))
        return [Resource(v.name or "", dict(v.attrs.get("Labels") or {})) for v in found]

    def remove_network(self, name: str) -> None:
        def run() -> None:
            with suppress(docker.errors.NotFound):
                self._client.networks.get(name).remove()

        self._call(f"removing network {name}", run)

    def remove_volume(self, name: str) -> None:
        def run() -> None:
            with suppress(docker.errors.NotFound):
                self._client.volumes.get(name).remove(force=True)

        self._call(f"removing volume {name}", run)

    # ---------------------------------------------------------------- containers
    def containers(self, selector: list[str]) -> list[ContainerState]:
        found = self._call(
            "listing containers",
            lambda: self._client.containers.list(all=True, filters={"label": selector}, ignore_removed=True),
        )
        return [_state(c) for c in found]

    def volume_users(self, name: str) -> list[ContainerState]:
        """Every container on this engine that mounts volume ``name``, running or not."""
        found = self._call(
            f"listing the containers of volume {name}",
            lambda: self._client.containers.list(all=True, filters={"volume": name}, ignore_removed=True),
        )
        return [_state(c) for c in found]

    def container(self, name: str) -> ContainerState | None:
        def run() -> ContainerState | None:
            try:
                return _state(self._client.containers.get(name))
            except docker.errors.NotFound:
                return None

        return self._call(f"inspecting {name}", run)

    def image_id(self, name: str) -> str | None:
        def run() -> str | None:
            try:
                return self._client.images.get(name).id
            except docker.errors.ImageNotFound:
                return None

        return self._call(f"inspecting image {name}", run)

    def run(self, plan: ContainerPlan) -> ContainerState:
        """Creates and starts the container; a leftover of the same name is replaced."""
        kwargs = container_kwargs(plan)

        def run() -> ContainerState:
            with suppress(docker.errors.NotFound):
                self._client.containers.get(plan.name).remove(force=True)
            container = self._client.containers.create(**kwargs)
            try:
                for network, aliases in plan.extra_networks.items():
                    self._client.networks.get(network).connect(container, aliases=aliases)
                container.start()
            except docker.errors.APIError:
                container.remove(force=True)
                raise
            container.reload()
            return _state(container)

        return self._call(f"starting {plan.name}", run)

    def publish_error(self, plan: ContainerPlan) -> str | None:
        kwargs = container_kwargs(plan)

        def run() -> str | None:
            with suppress(docker.errors.NotFound):
                self._client.containers.get(plan.name).remove(force=True)
            container = self._client.containers.create(**kwargs)
            try:
                container.start()  # Docker binds the host ports here, before the process runs
            except docker.errors.APIError as exc:
                return str(exc.explanation or exc)
            finally:
                container.remove(force=True)
            return None

        return self._call(f"probing ports with {plan.name}", run)

    def run_to_completion(self, plan: ContainerPlan, timeout_s: float, log_lines: int | None = 20) -> tuple[int, str]:
        """Runs a one-off container to its end; returns its exit code and log tail. It is removed
        afterwards, also when it runs past ``timeout_s`` (then the exit code is -1)."""
        kwargs = container_kwargs(plan)

        def run() -> tuple[int, str]:
            with suppress(docker.errors.NotFound):
                self._client.containers.get(plan.name).remove(force=True)
            container = self._client.containers.create(**kwargs)
            try:
                container.start()
                try:
                    code = int(container.wait(timeout=timeout_s)["StatusCode"])
                except requests.exceptions.RequestException:
                    code = -1
                raw = container.logs(tail="all" if log_lines is None else log_lines)
                return code, raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            finally:
                container.remove(force=True)

        return self._call(f"running {plan.name}", run)

    def container_ip(self, name: str, network: str) -> str | None:
        def run() -> str | None:
            try:
                attrs = self._client.containers.get(name).attrs
            except docker.errors.NotFound:
                return None
            ip = (attrs["NetworkSettings"]["Networks"].get(network) or {}).get("IPAddress")
            return str(ip) if ip else None

        return self._call(f"inspecting {name}", run)

    def stop_container(self, name: str, timeout: int = 5) -> None:
        def run() -> None:
            with suppress(docker.errors.NotFound):
                self._client.containers.get(name).stop(timeout=timeout)

        self._call(f"stopping container {name}", run)

    def remove_container(self, name: str) -> None:
        def run() -> None:
            with suppress(docker.errors.NotFound):
                self._client.containers.get(name).remove(force=True)

        self._call(f"removing container {name}", run)

    def logs_tail(self, name: str, lines: int = 40) -> str:
        def run() -> str:
            try:
                raw = self._client.containers.get(name).logs(tail=lines)
            except docker.errors.NotFound:
                return ""
            return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)

        return self._call(f"reading logs of {name}", run)

    def memory_usage(self, name: str) -> int | None:
        """Current cgroup memory use of a running container, in bytes (cpu mode's 'measured')."""

        def run() -> int | None:
            try:
                stats = self._client.api.stats(name, stream=False, one_shot=True)
            except (docker.errors.APIError, ValueError):
                # gone or going away while we asked: dockerd answers 404/409, or (20.10, during a
                # removal) 200 with an empty body. No figure; the runtime itself is fine.
                return None
            mem = stats.get("memory_stats") or {}
            usage = mem.get("usage")
            if usage is None:
                return None
            cache = (mem.get("stats") or {}).get("inactive_file", 0)
            return int(usage) - int(cache)

        return self._call(f"reading memory of {name}", run)

    def container_pids(self, name: str) -> set[int]:
        """Host PIDs of the processes in a container (to map NVML processes to tenants)."""

        def run() -> set[int]:
            try:
                top = self._client.api.top(name, ps_args="-eo pid")
            except docker.errors.APIError:
                return set()  # gone, stopping or not running: no processes to count
            titles = [t.upper() for t in top.get("Titles", [])]
            col = titles.index("PID") if "PID" in titles else 0
            return {int(row[col]) for row in top.get("Processes") or []}

        return self._call(f"listing processes of {name}", run)

    def published_ports(self) -> dict[int, str]:
        """Host ports published by any container on this engine, with the container's name."""
        out: dict[int, str] = {}
        for c in self._call("listing containers", lambda: self._client.containers.list(all=True, ignore_removed=True)):
            bindings = c.attrs.get("HostConfig", {}).get("PortBindings") or {}
            for entries in bindings.values():
                for entry in entries or []:
                    if entry.get("HostPort"):
                        out[int(entry["HostPort"])] = c.name or ""
        return out

    def events(self, selector: list[str]) -> EventStream:
        filters = {"type": "container", "label": list(selector)}
        return _DockerEvents(
            self._call("following events", lambda: self._client.api.events(decode=True, filters=filters))
        )


def container_kwargs(plan: ContainerPlan) -> dict[str, Any]:
    """The SDK's ``containers.create`` arguments for a plan (pure, unit-tested)."""
    kwargs: dict[str, Any] = {
        "name": plan.name,
        "image": plan.image,
        "command": plan.command,
        "labels": plan.labels,
        "environment": plan.env,
        "user": plan.user,
        "read_only": plan.read_only,
        "cap_drop": plan.cap_drop,
        "cap_add": plan.cap_add or None,
        "security_opt": plan.security_opt,
        "pids_limit": plan.pids_limit,
        "tmpfs": plan.tmpfs,
        "mounts": [Mount(m.target, m.source, type=m.kind, read_only=m.read_only) for m in plan.mounts],
        "network": plan.network,
        "networking_config": {plan.network: {"Aliases": plan.aliases}} if plan.aliases else None,
        "restart_policy": {"Name": plan.restart_policy},
        "detach": True,
    }
    if plan.mem_limit is not None:
        kwargs["mem_limit"] = plan.mem_limit
        kwargs["memswap_limit"] = plan.mem_limit
    if plan.shm_size is not None:
        kwargs["shm_size"] = plan.shm_size
    if plan.nano_cpus is not None:
        kwargs["nano_cpus"] = plan.nano_cpus
    if plan.cpu_shares is not None:
        kwargs["cpu_shares"] = plan.cpu_shares
    if plan.gpu_device_ids is not None:
        kwargs["device_requests"] = [DeviceRequest(device_ids=plan.gpu_device_ids, capabilities=[["gpu"]])]
    if plan.healthcheck is not None:
        kwargs["healthcheck"] = plan.healthcheck
    if plan.ports:
        kwargs["ports"] = {f"{cport}/tcp": (ip, hport) for cport, (ip, hport) in plan.ports.items()}
    if plan.entrypoint is not None:
        kwargs["entrypoint"] = plan.entrypoint
    if plan.working_dir is not None:
        kwargs["working_dir"] = plan.working_dir
    if plan.ipc_mode is not None:
        kwargs["ipc_mode"] = plan.ipc_mode
    return {k: v for k, v in kwargs.items() if v is not None}
