"""Pure helpers that turn state into what the pages draw (unit-tested, no HTTP)."""

from __future__ import annotations

from dataclasses import dataclass

from manager.control.capacity import DeviceCapacity
from manager.gpu import DeviceMemory
from manager.sizes import format_size

PALETTE = ["#3b82f6", "#10b981", "#f59e0b", "#8b5cf6", "#ef4444", "#14b8a6", "#ec4899", "#84cc16"]


@dataclass(frozen=True)
class Segment:
    label: str
    title: str
    percent: float
    color: str
    measured_percent: float  # of this segment's own width
    kind: str  # tenant, headroom, free

    @property
    def show_label(self) -> bool:
        """Whether the label fits inside the segment on a desktop-wide bar (about 0.7% of the bar a
        character); a narrower segment is named by its hover title and the legend, never clipped."""
        return self.percent >= 1.5 + 0.7 * len(self.label)


def label_of(device: DeviceMemory) -> str:
    """A device as the pages name it: ``GPU 0``, ``MIG 2``, or ``host memory``; on a swarm with its
    node (``GPU 1 on gpu-b``, ``host memory on gpu-a``): every node has a host memory and a GPU 0."""
    where = f" on {device.node_label}" if device.node else ""
    if device.kind == "host-memory":
        return f"host memory{where}"
    return f"{'MIG' if device.kind == 'mig' else 'GPU'} {device.index}{where}"


def capacity_segments(cap: DeviceCapacity) -> list[Segment]:
    """One device's capacity bar, left to right: each tenant's reservation (with its measured use
    inside), the engines' CUDA contexts beside their reservations (nvml), the unreserved rest,
    the headroom that is never reserved, and what the driver keeps. The parts add up to the
    device's total."""
    total = cap.device.total or 1
    out = []
    for i, t in enumerate(sorted(cap.tenants, key=lambda t: -t.reserved)):
        measured = t.measured or 0
        out.append(
            Segment(
                t.name,
                f"{t.name}: reserved {format_size(t.reserved)}, measured "
                f"{format_size(measured) if t.measured is not None else 'unknown'}",
                100 * t.reserved / total,
                PALETTE[i % len(PALETTE)],
                min(100.0, 100 * measured / t.reserved) if t.reserved else 0.0,
                "tenant",
            )
        )
    contexts = len(cap.tenants) * cap.process_overhead
    if contexts:
        title = f"engines' CUDA contexts: {len(cap.tenants)} x {format_size(cap.process_overhead)}"
        out.append(Segment("contexts", title, 100 * contexts / total, "#cbd5e1", 0, "overhead"))
    free = max(cap.device.usable - cap.headroom - cap.reserved - contexts, 0)
    out.append(Segment("free", f"unreserved: {format_size(free)}", 100 * free / total, "#e5e7eb", 0, "free"))
    out.append(
        Segment(
            "headroom", f"headroom: {format_size(cap.headroom)}", 100 * cap.headroom / total, "#9ca3af", 0, "headroom"
        )
    )
    if cap.device.reserved:
        title = f"kept by the driver: {format_size(cap.device.reserved)}"
        out.append(Segment("driver", title, 100 * cap.device.reserved / total, "#6b7280", 0, "driver"))
    return out


def day_bars(daily: list[tuple[str, int, int]], days: list[str]) -> list[dict[str, object]]:
    """Per day of ``days``: requests and tokens, with heights in percent of the busiest day."""
    by_day = {d: (n, t) for d, n, t in daily}
    top_n = max((n for _, n, _ in daily), default=0) or 1
    top_t = max((t for _, _, t in daily), default=0) or 1
    return [
        {
            "day": d,
            "requests": by_day.get(d, (0, 0))[0],
            "tokens": by_day.get(d, (0, 0))[1],
            "req_pct": 100 * by_day.get(d, (0, 0))[0] / top_n,
            "tok_pct": 100 * by_day.get(d, (0, 0))[1] / top_t,
        }
        for d in days
    ]
