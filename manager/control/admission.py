"""Admission: does a reservation fit? One pure decision, with every number that decided it.

Three checks, all evaluated so a refusal can name each one that failed:

1. ``ledger``: reservations of the others plus the request fit the device total
   minus the headroom.
2. ``measured``: the memory the inventory reports free, less what the other tenants
   have reserved but not yet taken, covers the request plus one process's
   CUDA-context overhead (the GPU may hold processes that are not ours).
3. ``model_fit``: the request covers the model's weights, a minimal KV cache and
   the engine's overhead.

Serialising decisions (so that two requests cannot both take the last gigabyte)
is the caller's job: see ``service.TenantService``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Decision:
    admitted: bool
    failed_checks: tuple[str, ...]
    messages: tuple[str, ...]
    numbers: dict[str, int | None] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        if self.admitted:
            return "fits: " + "; ".join(self.messages)
        return "refused: " + " ".join(self.messages)


def decide(data: AdmissionInput) -> Decision:
    f = format_size
    failed: list[str] = []
    messages: list[str] = []

    ledger_free = data.total - data.headroom - data.reserved_by_others
    if data.requested > ledger_free:
        failed.append("ledger")
        messages.append(
            f"ledger: {f(data.requested)} requested but only {f(max(ledger_free, 0))} is unreserved "
            f"(total {f(data.total)} - headroom {f(data.headroom)} - reserved by others "
            f"{f(data.reserved_by_others)})."
        )

    usable = data.measured_free + data.reclaimable - data.not_yet_taken_by_others
    needed = data.requested + data.process_overhead
    if needed > usable:
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
        messages.append(f"{f(data.requested)} of {f(ledger_free)} unreserved; {f(usable - needed)} measured slack left")
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
    }
    return Decision(not failed, tuple(failed), tuple(messages), numbers)
