"""Admission: does a reservation fit? One pure decision, with every number that decided it.

Three checks per device, all evaluated so a refusal can name each one that failed:

1. ``ledger``: reservations of the others plus the request fit what the device can give
   processes (NVML's total less the driver's own reservation) minus the headroom, each
   reservation with one process's CUDA-context overhead beside it: vLLM's budget
   (``--gpu-memory-utilization``) holds weights, activations and KV cache, and its context
   lives outside it.
2. ``measured``: the memory the inventory reports free, less what the other tenants
   have reserved but not yet taken, covers the request plus one process's
   CUDA-context overhead (the GPU may hold processes that are not ours).
3. ``model_fit``: the request covers the model's weights, a minimal KV cache and
   the engine's overhead.

``place`` decides on every device of the host and picks the tightest one that fits (best
fit), so large reservations still find a device later.

On a GPU host one more check is host-wide, ``host_memory`` (``decide_host_memory``): every
engine's process holds host RAM, and an engine that sleeps in place keeps its weights' size
pinned in host RAM (vLLM backs them up with ``pin_memory=True``, and PyTorch's host allocator
keeps those blocks cached after a wake). They must fit the host's RAM less its headroom.

Serialising decisions (so that two requests cannot both take the last gigabyte)
is the caller's job: see ``service.TenantService``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from manager.sizes import format_size


@dataclass(frozen=True)
class AdmissionInput:
    requested: int
    total: int
    headroom: int
    reserved_by_others: int
    measured_free: int
    measured_used: int
    not_yet_taken_by_others: int
    reclaimable: int
    process_overhead: int
    model_minimum: int | None = None
    system_reserved: int = 0
    """What the driver keeps of the device (NVML v2 ``reserved``)."""
    others: int = 0
    """Tenants already on the device: each holds a process overhead beyond its reservation."""
    device: str = ""
    """The device, as a refusal names it (``GPU 1 (GPU-...)``); '' on a host with one."""
    measure: bool = True
    """False: the reservation is not taken now (overcommit admits a tenant asleep, to start on its
    first request), so what the device measures free now does not decide."""


@dataclass(frozen=True)
class Decision:
    admitted: bool
    failed_checks: tuple[str, ...]
    messages: tuple[str, ...]
    numbers: dict[str, int | None] = field(default_factory=dict)
    device: str = ""
    by_overcommit: bool = False
    """It fits only while other tenants sleep (``GTM_OVERCOMMIT``): the tenant starts asleep, and
    its first request wakes it once the least recently used idle tenants are put to sleep."""

    @property
    def summary(self) -> str:
        if self.admitted:
            return "fits: " + "; ".join(self.messages)
        return "refused: " + " ".join(self.messages)


def decide(data: AdmissionInput) -> Decision:
    f = format_size
    failed: list[str] = []
    messages: list[str] = []

    others_overhead = data.others * data.process_overhead
    ledger_free = data.total - data.system_reserved - data.headroom - data.reserved_by_others - others_overhead
    if data.requested + data.process_overhead > ledger_free:
        failed.append("ledger")
        taken = f"total {f(data.total)}"
        if data.system_reserved:
            taken += f" - driver reserved {f(data.system_reserved)}"
        taken += f" - headroom {f(data.headroom)} - reserved by others {f(data.reserved_by_others)}"
        if others_overhead:
            taken += f" - their {data.others} x {f(data.process_overhead)} per-process overhead"
        asked = f"{f(data.requested)} requested"
        if data.process_overhead:
            asked += f" (+ {f(data.process_overhead)} per-process overhead)"
        messages.append(f"ledger: {asked} but only {f(max(ledger_free, 0))} is unreserved ({taken}).")

    usable = data.measured_free + data.reclaimable - data.not_yet_taken_by_others
    needed = data.requested + data.process_overhead
    if data.measure and needed > usable:
        failed.append("measured")
        messages.append(
            f"measured: {f(data.measured_free)} free now (used {f(data.measured_used)}), "
            f"{f(data.not_yet_taken_by_others)} of it still promised to other tenants"
            + (f", {f(data.reclaimable)} freed by replacing this tenant's engine" if data.reclaimable else "")
            + f"; {f(needed)} needed ({f(data.requested)} + {f(data.process_overhead)} per-process overhead)."
        )

    if data.model_minimum is not None and data.requested < data.model_minimum:
        failed.append("model_fit")
        messages.append(
            f"model_fit: the model needs at least {f(data.model_minimum)} "
            f"(weights + minimal KV cache + engine overhead); request at least that."
        )

    if not failed:
        messages.append(
            f"{f(data.requested + data.process_overhead)} of {f(ledger_free)} unreserved"
            + (f"; {f(usable - needed)} measured slack left" if data.measure else "")
        )
    numbers: dict[str, int | None] = {
        "requested": data.requested,
        "total": data.total,
        "headroom": data.headroom,
        "reserved_by_others": data.reserved_by_others,
        "unreserved": ledger_free,
        "measured_used": data.measured_used,
        "measured_free": data.measured_free,
        "not_yet_taken_by_others": data.not_yet_taken_by_others,
        "reclaimable": data.reclaimable,
        "process_overhead": data.process_overhead,
        "model_minimum": data.model_minimum,
        "system_reserved": data.system_reserved,
        "others_overhead": others_overhead,
    }
    return Decision(not failed, tuple(failed), tuple(messages), numbers, data.device)


@dataclass(frozen=True)
class HostMemoryInput:
    """nvml: the host RAM engines hold beside their devices."""

    total: int
    """The host's RAM (MemTotal)."""
    headroom: int
    """Kept for the system, Docker, the manager and the gateways (``GTM_HOST_HEADROOM``)."""
    per_engine: int
    """Each engine process's own (``GTM_ENGINE_HOST_MEMORY``)."""
    engines: int
    """Engines of the other tenants."""
    pinned_by_others: int
    """Weights the other tenants that may sleep keep pinned."""
    sleepers: int
    """How many of the others may sleep."""
    requested_pinned: int
    """This tenant's weights, when it may sleep; else 0."""


def decide_host_memory(data: HostMemoryInput) -> tuple[bool, str, dict[str, int | None]]:
    """Whether one more engine (and, if it may sleep, its pinned weights) fits the host's RAM:
    (fits, the message, its numbers)."""
    f = format_size
    left = data.total - data.headroom - data.engines * data.per_engine - data.pinned_by_others
    needed = data.per_engine + data.requested_pinned
    numbers: dict[str, int | None] = {
        "host_total": data.total,
        "host_headroom": data.headroom,
        "host_per_engine": data.per_engine,
        "host_engines": data.engines,
        "host_pinned_by_others": data.pinned_by_others,
        "host_needed": needed,
        "host_left": left,
    }
    asked = f"{f(needed)} of host RAM needed ({f(data.per_engine)} for its engine's process"
    asked += f" + {f(data.requested_pinned)} of weights pinned while it sleeps)" if data.requested_pinned else ")"
    if needed <= left:
        return True, f"host_memory: {asked}, {f(left)} left", numbers
    return (
        False,
        f"host_memory: {asked} but only {f(max(left, 0))} is left (host RAM {f(data.total)} - headroom "
        f"{f(data.headroom)} - {data.engines} engines x {f(data.per_engine)} - {f(data.pinned_by_others)} of "
        f"weights pinned by {data.sleepers} tenants that may sleep). Turn sleeping off for some tenants "
        "(--idle-sleep 0), or add host RAM.",
        numbers,
    )


def place(candidates: Sequence[AdmissionInput]) -> tuple[int | None, Decision]:
    """The device a reservation goes to: of those where it fits, the one with the least left
    unreserved afterwards (best fit). Returns (its index in ``candidates``, its decision), or
    (None, a refusal naming every device's numbers)."""
    if not candidates:
        raise ValueError("no device to place a reservation on")
    decisions = [decide(c) for c in candidates]
    fits = [i for i, d in enumerate(decisions) if d.admitted]
    if fits:
        best = min(fits, key=lambda i: decisions[i].numbers["unreserved"] or 0)
        chosen = decisions[best]
        if chosen.device:
            chosen = replace(chosen, messages=(f"on {chosen.device}", *chosen.messages))
        return best, chosen
    if len(decisions) == 1:
        only = decisions[0]
        return None, replace(
            only, messages=(f"{only.device}: {only.messages[0]}", *only.messages[1:])
        ) if only.device else only
    failed = tuple(dict.fromkeys(check for d in decisions for check in d.failed_checks))
    messages = tuple(f"{d.device}: " + " ".join(d.messages) for d in decisions)
    numbers = min(decisions, key=lambda d: len(d.failed_checks)).numbers
    return None, Decision(False, failed, messages, numbers)
