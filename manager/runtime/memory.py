"""An in-memory ``Runtime``: containers, networks and volumes as plain records.

For fast tests of the control plane (reconciler, service, API). It keeps the
promises of the ``Runtime`` protocol, checked by the same conformance test as the
Docker adapter. Tests drive what Docker would do on its own through the ``exit``,
``set_health`` and ``fail_next`` hooks.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from manager.errors import Conflict, RuntimeUnavailable
from manager.runtime.types import ContainerPlan, ContainerState, NetworkPlan, Resource, RuntimeEvent, VolumePlan


def _matches(labels: dict[str, str], selector: list[str]) -> bool:
    for item in selector:
        key, _, value = item.partition("=")
        if labels.get(key) != value:
            return False
    return True


@dataclass
class _Container:
    plan: ContainerPlan
    state: ContainerState
    networks: dict[str, str] = field(default_factory=dict)  # network -> IP
    logs: str = ""
    pids: set[int] = field(default_factory=set)


def _bindable(host_ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host_ip, port))
        except OSError:
            return False
    return True


class _Events:
    """One subscriber's events; ``close`` ends its iteration, an unavailable runtime raises."""

    def __init__(self, runtime: MemoryRuntime, selector: list[str]) -> None:
        self.selector = selector
        self._runtime = runtime
        self._queue: queue.Queue[RuntimeEvent | str] = queue.Queue()

    def put(self, event: RuntimeEvent | str) -> None:
        """An event, or ``"closed"`` / ``"broken"``: the end of the stream."""
        self._queue.put(event)

    def __iter__(self) -> Iterator[RuntimeEvent]:
        while True:
            event = self._queue.get()
            if event == "broken":
                raise RuntimeUnavailable("the container runtime did not answer")
            if isinstance(event, str):
                return
            yield event

    def close(self) -> None:
        self._runtime.unsubscribe(self)
        self._queue.put("closed")


DOCKER_NETWORKS = ("none", "bridge", "host")
"""The networks every Docker engine has."""


class MemoryRuntime:
    def __init__(self, bind_check: bool = False) -> None:
        """``bind_check``: ``publish_error`` also tries to bind each port on this host, as Docker does
        (the runtime contract); off, unit tests do not depend on what else listens here."""
        self.bind_check = bind_check
        self._lock = threading.RLock()
        self._containers: dict[str, _Container] = {}
        self._networks: dict[str, NetworkPlan] = {}
        self._volumes: dict[str, VolumePlan] = {}
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)
        self.available = True
        self.started: list[str] = []  # names, in the order they were started
        self.completed: list[str] = []  # one-off containers run to completion, in order
        self._fail_next: dict[str, str] = {}
        self.effects: dict[str, Callable[[ContainerPlan], str | None]] = {}
        """One-off container name -> what running it does (a copy job's files, in a test) and what it
        prints (None: nothing)."""
        self.images: dict[str, str] = {}  # name -> ID; a name not set here exists as "sha256:<name>"
        self.foreign_ports: set[int] = set()  # host ports held by programs Docker does not know
        self._subscribers: list[_Events] = []

    # ---------------------------------------------------------------- test hooks
    def exit(self, name: str, code: int = 1, logs: str = "", oom_killed: bool = False) -> None:
        """The container's process ends, as if it crashed (or was OOM-killed)."""
        with self._lock:
            c = self._containers[name]
            c.logs += logs
            c.state = replace(
                c.state, status="exited", health=None, exit_code=code, oom_killed=oom_killed, finished_at=self._stamp()
            )
            if oom_killed:
                self._emit(c.state, "oom")
            self._emit(c.state, "die")

    def set_image(self, name: str, image_id: str) -> None:
        """The image name now points at another build (a rebuilt image under the same tag)."""
        self.images[name] = image_id

    def set_health(self, name: str, health: str) -> None:
        with self._lock:
            c = self._containers[name]
            c.state = replace(c.state, health=health)
            self._emit(c.state, "health_status")

    def plan(self, name: str) -> ContainerPlan | None:
        """The plan a container was run from (what Docker would have been asked for)."""
        with self._lock:
            c = self._containers.get(name)
            return c.plan if c else None

    def set_logs(self, name: str, logs: str) -> None:
        """What the container has printed (a simulated engine's start-up)."""
        with self._lock:
            self._containers[name].logs = logs

    def set_pids(self, name: str, pids: set[int]) -> None:
        """The host PIDs of a running container's processes (what ``docker top`` would list)."""
        with self._lock:
            self._containers[name].pids = set(pids)

    def go_away(self) -> None:
        """The runtime stops answering (a dockerd restart): every event stream ends with an error."""
        with self._lock:
            self.available = False
            for sub in self._subscribers:
                sub.put("broken")
            self._subscribers = []

    def _emit(self, state: ContainerState, action: str) -> None:
        event = RuntimeEvent(state.name, dict(state.labels), action)
        for sub in self._subscribers:
            if _matches(state.labels, sub.selector):
                sub.put(event)

    def unsubscribe(self, sub: _Events) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)

    def plan_of(self, name: str) -> ContainerPlan:
        """The plan a container was run from (its mounts, limits, ...)."""
        with self._lock:
            return self._containers[name].plan

    def fail_next(self, name: str, error: str) -> None:
        """The next ``run`` of ``name`` fails as Docker would (for example a port already taken)."""
        self._fail_next[name] = error

    # ---------------------------------------------------------------- protocol
    def _check(self) -> None:
        if not self.available:
            raise RuntimeUnavailable("the container runtime did not answer")

    def _stamp(self) -> str:
        return f"t{next(self._clock):08d}"

    def ping(self) -> bool:
        self._check()
        return True

    def ensure_network(self, plan: NetworkPlan) -> None:
        with self._lock:
            self._check()
            self._networks.setdefault(plan.name, plan)

    def ensure_volume(self, plan: VolumePlan) -> None:
        with self._lock:
            self._check()
            self._volumes.setdefault(plan.name, plan)

    def networks(self, selector: list[str]) -> list[Resource]:
        with self._lock:
            self._check()
            return [Resource(n.name, dict(n.labels)) for n in self._networks.values() if _matches(n.labels, selector)]

    def volumes(self, selector: list[str]) -> list[Resource]:
        with self._lock:
            self._check()
            return [Resource(v.name, dict(v.labels)) for v in self._volumes.values() if _matches(v.labels, selector)]

    def remove_network(self, name: str) -> None:
        with self._lock:
            self._check()
            if any(name in c.networks for c in self._containers.values()):
                raise Conflict(f"removing network {name}: it has active endpoints")
            self._networks.pop(name, None)

    def remove_volume(self, name: str) -> None:
        with self._lock:
            self._check()
            if any(m.source == name for c in self._containers.values() for m in c.plan.mounts):
                raise Conflict(f"removing volume {name}: it is in use")
            self._volumes.pop(name, None)

    def containers(self, selector: list[str]) -> list[ContainerState]:
        with self._lock:
            self._check()
            return [c.state for c in self._containers.values() if _matches(c.state.labels, selector)]

    def container(self, name: str) -> ContainerState | None:
        with self._lock:
            self._check()
            c = self._containers.get(name)
            return c.state if c else None

    def image_id(self, name: str) -> str | None:
        with self._lock:
            self._check()
            return self.images.get(name, f"sha256:{name}")

    def run(self, plan: ContainerPlan) -> ContainerState:
        with self._lock:
            self._check()
            self._containers.pop(plan.name, None)
            error = self._fail_next.pop(plan.name, None)
            if error is not None:
                raise RuntimeUnavailable(f"starting {plan.name}: {error}")
            running = {
                hp: c.plan.name
                for c in self._containers.values()
                if c.state.status == "running"
                for _, hp in c.plan.ports.values()
            }
            for host_ip, host_port in plan.ports.values():
                owner = running.get(host_port)
                if owner is not None:
                    raise RuntimeUnavailable(
                        f"starting {plan.name}: port {host_ip}:{host_port} is already allocated by {owner}"
                    )
            self._check_ipc(plan)
            for network in [plan.network, *plan.extra_networks]:
                if network not in self._networks and network not in DOCKER_NETWORKS:
                    raise RuntimeUnavailable(f"starting {plan.name}: network {network} not found")
            n = next(self._ids)
            state = ContainerState(
                id=f"{n:012x}",
                name=plan.name,
                labels=dict(plan.labels),
                status="running",
                health="starting" if plan.healthcheck else None,
                exit_code=None,
                oom_killed=False,
                error="",
                started_at=self._stamp(),
                finished_at="",
                ports={f"{p}/tcp": [{"HostIp": ip, "HostPort": str(hp)}] for p, (ip, hp) in plan.ports.items()},
            )
            nets = {
                net: f"10.{n // 250 % 250}.{n % 250}.{i + 2}"
                for i, net in enumerate([plan.network, *plan.extra_networks])
            }
            self._containers[plan.name] = _Container(plan, state, nets)
            self.started.append(plan.name)
            self._emit(state, "start")
            return state

    def _check_ipc(self, plan: ContainerPlan) -> None:
        """Docker starts a container that joins another's IPC namespace only while that one runs
        and was made shareable."""
        if plan.ipc_mode is None or not plan.ipc_mode.startswith("container:"):
            return
        donor = self._containers.get(plan.ipc_mode.removeprefix("container:"))
        if donor is None or donor.state.status != "running" or donor.plan.ipc_mode != "shareable":
            raise RuntimeUnavailable(f"starting {plan.name}: cannot join the IPC namespace of {plan.ipc_mode}")

    def run_to_completion(self, plan: ContainerPlan, timeout_s: float, log_lines: int | None = 20) -> tuple[int, str]:
        with self._lock:
            self._check()
            error = self._fail_next.pop(plan.name, None)
            self._check_ipc(plan)
            self.completed.append(plan.name)
            if error is not None:
                return 1, error
            out = self.effects[plan.name](plan) if plan.name in self.effects else None
            lines = (out or "").splitlines(keepends=True)
            return 0, "".join(lines if log_lines is None else lines[-log_lines:] if log_lines else [])

    def container_ip(self, name: str, network: str) -> str | None:
        with self._lock:
            self._check()
            c = self._containers.get(name)
            return c.networks.get(network) if c and c.state.status == "running" else None

    def stop_container(self, name: str, timeout: int = 5) -> None:
        with self._lock:
            self._check()
            c = self._containers.get(name)
            if c and c.state.status == "running":
                c.state = replace(c.state, status="exited", health=None, exit_code=137, finished_at=self._stamp())
                self._emit(c.state, "die")

    def remove_container(self, name: str) -> None:
        with self._lock:
            self._check()
            c = self._containers.pop(name, None)
            if c is not None:
                if c.state.status == "running":
                    self._emit(c.state, "die")
                self._emit(c.state, "destroy")

    def logs_tail(self, name: str, lines: int = 40) -> str:
        with self._lock:
            self._check()
            c = self._containers.get(name)
            return "\n".join(c.logs.splitlines()[-lines:]) if c else ""

    def memory_usage(self, name: str) -> int | None:
        with self._lock:
            self._check()
            return None  # an in-memory container uses no memory to measure

    def container_pids(self, name: str) -> set[int]:
        with self._lock:
            self._check()
            c = self._containers.get(name)
            return set(c.pids) if c and c.state.status == "running" else set()

    def publish_error(self, plan: ContainerPlan) -> str | None:
        """As Docker: a port another container publishes is "already allocated"; one the host cannot
        bind (a program holds it, or a test's ``foreign_ports``) is "address already in use"."""
        with self._lock:
            self._check()
            for host_ip, host_port in plan.ports.values():
                if any(host_port in [p for _, p in c.plan.ports.values()] for c in self._containers.values()):
                    return f"Bind for {host_ip}:{host_port} failed: port is already allocated"
                if host_port in self.foreign_ports or (self.bind_check and not _bindable(host_ip, host_port)):
                    bind = f"listen tcp4 {host_ip}:{host_port}: bind: address already in use"
                    return f"Error starting userland proxy: {bind}"
            return None

    def published_ports(self) -> dict[int, str]:
        with self._lock:
            self._check()
            return {hp: c.plan.name for c in self._containers.values() for _, hp in c.plan.ports.values()}

    def events(self, selector: list[str]) -> _Events:
        with self._lock:
            self._check()
            sub = _Events(self, list(selector))
            self._subscribers.append(sub)
            return sub
