"""What the host's devices hold: each tenant's reservation beside what its engine measurably
uses (NVML per-process memory mapped to its container, or its cgroup memory on a host-memory
platform), device by device."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from manager import names
from manager.control.records import TenantRow
from manager.control.store import TenantStore
from manager.gpu import DeviceMemory, Inventory, placed_on
from manager.runtime.protocol import Runtime
from manager.settings import Settings

T = TypeVar("T")
MEASURE_THREADS = 16
"""Engines measured at once; more tenants than this on one host take a second per 16."""


@dataclass(frozen=True)
class TenantUsage:
    name: str
    reserved: int
    measured: int | None
    unknown: bool = False
    """The engine runs but the driver does not tell its use (MIG, vGPU): ``measured`` is None."""


@dataclass(frozen=True)
class DeviceCapacity:
    """One device's ledger: its tenants' reservations, each with a process overhead beside it."""

    device: DeviceMemory
    headroom: int
    process_overhead: int
    tenants: list[TenantUsage] = field(default_factory=list)

    @property
    def reserved(self) -> int:
        return sum(t.reserved for t in self.tenants)

    @property
    def unreserved(self) -> int:
        """The largest reservation a new tenant can have here (its own overhead counted)."""
        taken = self.reserved + (len(self.tenants) + 1) * self.process_overhead
        return self.device.usable - self.headroom - taken


@dataclass(frozen=True)
class Capacity:
    mode: str
    devices: list[DeviceCapacity]
    headroom: int

    @property
    def device(self) -> DeviceMemory:
        """The host's first device (the only one in cpu mode)."""
        return self.devices[0].device

    @property
    def tenants(self) -> list[TenantUsage]:
        return [t for d in self.devices for t in d.tenants]

    @property
    def reserved(self) -> int:
        return sum(d.reserved for d in self.devices)

    @property
    def unreserved(self) -> int:
        """The largest reservation one new tenant can get on any device."""
        return max(d.unreserved for d in self.devices)


def device_of(row: TenantRow, devices: list[DeviceMemory]) -> DeviceMemory | None:
    return placed_on(row.device, devices)


def on_device(row: TenantRow, devices: list[DeviceMemory], device: DeviceMemory) -> bool:
    placed = device_of(row, devices)
    return placed is not None and placed.uuid == device.uuid


class Meter:
    """Reads what the engines use and what each device's ledger holds."""

    def __init__(self, settings: Settings, store: TenantStore, runtime: Runtime, inventory: Inventory) -> None:
        self.settings = settings
        self.platform = settings.platform
        self.store = store
        self.runtime = runtime
        self.inventory = inventory

    def measured_use(self, only: str | None = None) -> dict[str, int | None]:
        """Each tenant's measured use (or ``only`` that tenant's): NVML per-process memory mapped to
        its engine container (nvml), or its engine's cgroup memory (cpu). Engines are read at once,
        not one after another: Docker answers a memory read in about a second (20.10 waits for its
        next stats sample even for a one-shot read): read in turn, N engines would cost N seconds of
        every list-tenants, console page, /metrics scrape and admission."""
        inst = self.settings.instance
        engines = {
            c.tenant: c
            for c in self.runtime.containers(names.selector(inst, role=names.Role.ENGINE))
            if c.tenant and c.status == "running" and only in (None, c.tenant)
        }
        if not engines:
            return {}
        containers = [c.name for c in engines.values()]
        if self.platform.reservation_is_host_memory:  # its cgroup memory is its use
            return dict(zip(engines, self._each(self.runtime.memory_usage, containers), strict=True))
        procs = self.inventory.processes()
        pids = self._each(self.runtime.container_pids, containers)
        out: dict[str, int | None] = {}
        for tenant, ps in zip(engines, pids, strict=True):
            mine = [p.used for p in procs if p.pid in ps]
            # one process whose use the driver hides (MIG, vGPU) makes the engine's use unknown, not less
            out[tenant] = None if None in mine else sum(u for u in mine if u is not None)
        return out

    @staticmethod
    def _each(read: Callable[[str], T], containers: list[str]) -> list[T]:
        """``read`` of every container, concurrently; results in the containers' order."""
        if len(containers) == 1:
            return [read(containers[0])]
        with ThreadPoolExecutor(min(len(containers), MEASURE_THREADS), thread_name_prefix="measure") as pool:
            return list(pool.map(read, containers))

    @property
    def process_overhead(self) -> int:
        """What each engine holds beyond its reservation (``Platform.process_overhead``)."""
        return self.platform.process_overhead(self.settings.process_overhead)

    @property
    def kept_asleep(self) -> int:
        """What a sleeping tenant keeps of its device until its own is measured (``Platform.kept_asleep``)."""
        return self.settings.effective_kept_asleep

    def capacity(self) -> Capacity:
        devices = self.inventory.devices()
        rows = self.store.tenants()
        measured = self.measured_use()
        ledgers = []
        for device in devices:
            usage = [
                TenantUsage(
                    r.spec.name,
                    r.spec.gpu_memory,
                    measured.get(r.spec.name),
                    r.spec.name in measured and measured[r.spec.name] is None,
                )
                for r in rows
                if on_device(r, devices, device)
            ]
            ledgers.append(DeviceCapacity(device, self.settings.headroom, self.process_overhead, usage))
        return Capacity(self.platform.name, ledgers, self.settings.headroom)
