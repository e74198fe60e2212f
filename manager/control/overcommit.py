"""Overcommit (``GTM_OVERCOMMIT``): more tenants than fit awake, each one's wake still guaranteed.

Pure decisions with every number in the answer, like ``admission``:

- ``plan_wake``: an asleep tenant has a request waiting. Does its reservation fit beside the
  tenants awake now? If not, which idle tenants, least recently used first, are put to sleep to
  make room? A tenant with a request in flight (or held) is never chosen, nor one that is always
  on, nor one still starting. When the idle ones are not enough but the busy ones would be, the
  wake waits (``WakePlan.wait``: their requests end in seconds, their starts in a minute); when
  even every tenant that may sleep would not make room, the answer is a refusal naming the numbers.
- ``counted_beside``: what admission counts beside a new (or resized) reservation. Only the
  always-on tenants are counted in full, since every other tenant can be put to sleep; a new
  always-on tenant also counts the largest reservation of one that may sleep, whose wake must
  still fit beside it.

What a sleeper keeps (``Resident.kept``): on a GPU its engine sleeps in place (vLLM's sleep mode,
level 1), keeping its process, CUDA context, CUDA graph pools and every tensor outside vLLM's sleep
pools: NVML's figure for it once it has slept, else ``Platform.kept_asleep``, counted for every
sleeper; in cpu mode its engine is stopped and it keeps nothing (its gateway is a small process
beside).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from manager.control.records import TenantRow
from manager.domain import TenantStatus
from manager.sizes import format_size


@dataclass(frozen=True)
class Resident:
    """A tenant on the device, as the overcommit decisions see it."""

    name: str
    reserved: int
    awake: bool
    """Holds its reservation now: every status but asleep (a failed engine starts again)."""
    always_on: bool = False
    idle: bool = False
    """Running, with no request in flight and none held: it may be put to sleep now."""
    last_used: float = 0.0
    """When it last took a request (or began to run, if it took none since)."""
    running: bool = True
    """Its engine serves (else it is starting, waking or failed)."""
    kept: int = 0
    """What it keeps of the device asleep (its engine's process and what stays resident with it)."""


def resident(row: TenantRow, idle: bool = False, last_used: float = 0.0, kept: int = 0) -> Resident:
    """``kept``: what a sleeper keeps by default (``Platform.kept_asleep``; 0 when engines stop),
    replaced by the tenant's own figure, measured when it last slept in place."""
    measured = row.sleep.kept_asleep
    return Resident(
        row.spec.name,
        row.spec.gpu_memory,
        row.status != TenantStatus.ASLEEP,
        row.spec.always_on,
        idle,
        last_used,
        row.status == TenantStatus.RUNNING,
        measured if kept and measured is not None else kept,
    )


@dataclass(frozen=True)
class Room:
    """What the device gives tenants: its usable memory less the headroom; each engine also holds
    one process's overhead beside its reservation (as admission counts it)."""

    usable: int
    headroom: int
    process_overhead: int

    @property
    def capacity(self) -> int:
        return self.usable - self.headroom


@dataclass(frozen=True)
class WakePlan:
    fits: bool
    evict: tuple[str, ...]
    """Put to sleep first, least recently used first; empty when it fits beside those awake."""
    message: str
    numbers: dict[str, int] = field(default_factory=dict)
    wait: bool = False
    """It does not fit now, but will once tenants that may sleep finish what they serve or their
    start: the request goes on waiting (its gateway's deadline bounds it)."""


def plan_wake(reserved: int, others: Sequence[Resident], room: Room) -> WakePlan:
    """Whether a tenant reserving ``reserved`` can wake beside ``others`` (the device's other
    tenants), and whom it puts to sleep first."""
    f, overhead = format_size, room.process_overhead
    needed = reserved + overhead
    awake = [o for o in others if o.awake]
    kept_by_sleepers = sum(o.kept for o in others if not o.awake)
    taken = sum(o.reserved + overhead for o in awake) + kept_by_sleepers
    free = room.capacity - taken
    sleepable = sorted((o for o in awake if o.idle and not o.always_on), key=lambda o: (o.last_used, o.name))
    evict: list[str] = []
    freed = 0
    for o in sleepable:
        if free + freed >= needed:
            break
        evict.append(o.name)
        freed += o.reserved + overhead - o.kept
    numbers = {
        "needed": needed,
        "capacity": room.capacity,
        "awake_tenants": len(awake),
        "awake_reserved": taken,
        "kept_by_sleepers": kept_by_sleepers,
        "free": free,
        "freed_by_sleeping": freed,
    }
    asked = f(needed) + (f" ({f(reserved)} + {f(overhead)} per-process overhead)" if overhead else "")
    if needed <= free:
        return WakePlan(True, (), f"{asked} needed; {f(free)} of {f(room.capacity)} is free beside the awake", numbers)
    if free + freed >= needed:
        return WakePlan(
            True,
            tuple(evict),
            f"{asked} needed but {f(max(free, 0))} of {f(room.capacity)} is free beside the {len(awake)} awake; "
            f"putting {', '.join(evict)} to sleep (least recently used) frees {f(freed)}",
            numbers,
        )
    serving = [o.name for o in awake if o.running and not o.idle and not o.always_on]
    starting = [o.name for o in awake if not o.running and not o.always_on]
    pinned = [o.name for o in awake if o.always_on]
    later = sum(o.reserved + overhead - o.kept for o in awake if not o.always_on) - freed
    numbers["freed_once_idle"] = later
    held = f"{f(taken)} with their overhead" if overhead or kept_by_sleepers else f"{f(taken)} reserved"
    message = (
        f"it needs {asked} but {f(max(free, 0))} of {f(room.capacity)} is free beside the {len(awake)} tenants "
        f"awake ({held}), and putting every idle one that may sleep to sleep frees only {f(freed)}"
    )
    if serving:
        message += f"; serving requests now: {', '.join(serving)}"
    if starting:
        message += f"; starting or waking: {', '.join(starting)}"
    if pinned:
        message += f"; always on: {', '.join(pinned)}"
    return WakePlan(False, (), message + ".", numbers, wait=free + freed + later >= needed)


def counted_beside(others: Sequence[Resident], always_on: bool, overhead: int = 0) -> tuple[int, int]:
    """What admission counts beside a new (or resized) reservation under overcommit: (bytes, how
    many engines, each with its process overhead). Every tenant that may sleep counts what it keeps
    asleep (``Resident.kept``, its process included). A new always-on tenant also counts the wake
    of the largest of them: its reservation and ``overhead``, less what it keeps already."""
    pinned = [o for o in others if o.always_on]
    sleepers = [o for o in others if not o.always_on]
    reserved, engines = sum(o.reserved for o in pinned) + sum(o.kept for o in sleepers), len(pinned)
    if always_on and sleepers:
        largest = max(sleepers, key=lambda o: o.reserved + overhead - o.kept)
        if largest.kept:
            reserved += largest.reserved + overhead - largest.kept  # its process is in what it keeps
        else:
            reserved, engines = reserved + largest.reserved, engines + 1
    return reserved, engines
