"""The control plane's records: what the store reads and writes, as plain typed values. The
service, the API's schemas and the console build from these, never from the store's internals
(its SQL, its rows, its connection)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from manager.domain import Quotas, TenantSpec, TenantStatus


@dataclass(frozen=True)
class SleepState:
    """How a tenant with ``idle_sleep_s`` sleeps and wakes (all zero/None for one that never slept)."""

    last_request_at: float | None = None
    """When its gateway last took a request, as the manager last read it."""
    sleeps: int = 0
    wakes: int = 0
    wake_started_at: float | None = None
    """When its current or last wake began (a request found it asleep)."""
    last_wake_s: float | None = None
    """How long its last wake took: from the request that found it asleep to its engine serving."""
    wake_refusal: str = ""
    """Why it cannot wake now, with the numbers (overcommit: nothing can be put to sleep to make
    room); '' when it can. Its gateway answers requests with it (a 503) until it is cleared."""
    kept_asleep: int | None = None
    """What its engine kept of its device when it last slept in place (nvml: NVML's per-process
    figure, measured after the sleep); None until then, and where the driver hides it."""


@dataclass(frozen=True)
class TenantRow:
    spec: TenantSpec
    status: TenantStatus
    reason: str
    status_since: float
    created_at: float
    updated_at: float
    gateway_token: str = ""
    device: str = ""
    """The UUID of the device its engine runs on ('' for the host's first device)."""
    sleep: SleepState = SleepState()


@dataclass(frozen=True)
class EngineFailure:
    """A tenant's engine failures in a row: ``marker`` identifies the last one counted (the
    container's finish time), ``retry_at`` is when the backoff lets it start again."""

    count: int
    marker: str
    retry_at: float
    log: str = ""
    """The engine's log tail at the last failure: kept after the container is replaced."""


@dataclass(frozen=True)
class VolumeKeyRow:
    """An encrypted volume's data key as the state keeps it: wrapped (``manager.volumes.keyring``)."""

    tenant: str
    volume_id: str
    """The volume's filesystem UUID, which the wrapping is bound to."""
    kek_id: str
    """Which key-encryption key wrapped it."""
    wrapped: bytes
    size: int
    """The volume's size in bytes, fixed when it was made."""
    created_at: float


@dataclass(frozen=True)
class UsageTotals:
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True)
class MemberRow:
    """A member of a tenant: an accounting boundary with its own keys, quotas and usage."""

    tenant: str
    name: str
    quotas: Quotas
    created_at: float
    weight: float = 1.0
    """Its share of the tenant's engine while members wait for it (fair queuing): 2 is twice 1's."""


@dataclass(frozen=True)
class MemberUsage:
    """A member's metered use: today, this month, and its last request."""

    today: UsageTotals
    month: UsageTotals
    last_used_at: float | None


@dataclass(frozen=True)
class KeyRow:
    id: str
    tenant: str
    prefix: str
    hash: str
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    member: str = ""

    def active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: float
    actor: str
    action: str
    tenant: str | None
    result: str
    detail: dict[str, Any]


class ReservationEvent(StrEnum):
    ADD = "add"
    RESIZE = "resize"
    REMOVE = "remove"
    SLEEP = "sleep"
    """Its engine stops: from here the reservation is priced at the asleep rate (``costs``)."""
    WAKE = "wake"
    """A request found it asleep: from here it holds its reservation again."""


@dataclass(frozen=True)
class ReservationRow:
    """A tenant's reservation from ``at`` on: added, resized (``gpu_memory`` its new size) or
    removed (0). What the cost split prices."""

    id: int
    tenant: str
    event: ReservationEvent
    gpu_memory: int
    at: float


@dataclass(frozen=True)
class Reach:
    """Where a tenant's clients reach it: its OpenAI base URL ('' unknown) and its swarm node ('')."""

    url: str = ""
    node: str = ""
