"""Hosts without a GPU: the reserved resource is host memory (engines get cgroup limits)."""

from __future__ import annotations

from pathlib import Path

from manager.gpu.inventory import DeviceMemory, ProcessMemory


def read_meminfo(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


class HostMemoryInventory:
    def __init__(self, meminfo: Path = Path("/proc/meminfo")) -> None:
        self._meminfo = meminfo

    def devices(self) -> list[DeviceMemory]:
        info = read_meminfo(self._meminfo)
        total, free = info["MemTotal"], info["MemAvailable"]
        return [
            DeviceMemory(
                index=0,
                uuid="host-memory",
                name="host memory",
                kind="host-memory",
                total=total,
                free=free,
                used=total - free,
            )
        ]

    def processes(self) -> list[ProcessMemory]:
        return []  # per-tenant use comes from the containers' cgroups (the runtime adapter)

    def close(self) -> None:
        return None
