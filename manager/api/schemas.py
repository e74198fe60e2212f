"""Request and response models of the admin API. Storage rows never leave as they are."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field

from manager.control.admission import Decision
from manager.control.service import Capacity
from manager.control.store import AuditRow, KeyRow, TenantRow, UsageTotals
from manager.sizes import format_size, parse_size

Size = Annotated[int, BeforeValidator(parse_size)]


class QuotaFields(BaseModel):
    rpm_limit: int | None = Field(None, ge=1, description="requests per minute")
    tokens_per_day: int | None = Field(None, ge=1)
    requests_per_month: int | None = Field(None, ge=1)
    max_in_flight: int | None = Field(None, ge=1, description="requests in flight at once")


class TenantCreate(QuotaFields):
    name: str = Field(description="DNS-safe: lowercase letters, digits, '-'")
    port: int = Field(description="the tenant's OpenAI API port on the host")
    gpu_memory: Size = Field(description="reservation, e.g. '10G' or bytes")
    model: str | None = Field(None, description="directory name under the models volume")
    max_model_len: int | None = Field(None, ge=16)
    quantization: str | None = None
    shm_size: Size | None = None


class TenantUpdate(QuotaFields):
    gpu_memory: Size | None = None
    port: int | None = None
    model: str | None = None
    max_model_len: int | None = Field(None, ge=16)
    quantization: str | None = None
    shm_size: Size | None = None


class Quotas(BaseModel):
    rpm_limit: int | None
    tokens_per_day: int | None
    requests_per_month: int | None
    max_in_flight: int | None


class TenantPublic(BaseModel):
    name: str
    port: int
    gpu_memory: int
    gpu_memory_human: str
    model: str
    max_model_len: int
    quantization: str | None
    shm_size: int
    quotas: Quotas
    status: str
    reason: str
    status_since: float
    created_at: float
    measured: int | None = None
    requests_today: int = 0
    tokens_today: int = 0

    @classmethod
    def of(cls, row: TenantRow, measured: int | None = None, today: UsageTotals | None = None) -> TenantPublic:
        s = row.spec
        return cls(name=s.name, port=s.port, gpu_memory=s.gpu_memory, gpu_memory_human=format_size(s.gpu_memory),
                   model=s.model, max_model_len=s.max_model_len, quantization=s.quantization,
                   shm_size=s.shm_size, quotas=Quotas(**s.quotas.__dict__), status=row.status.value,
                   reason=row.reason, status_since=row.status_since, created_at=row.created_at,
                   measured=measured, requests_today=today.requests if today else 0,
                   tokens_today=today.tokens if today else 0)


class DecisionPublic(BaseModel):
    admitted: bool
    failed_checks: list[str]
    messages: list[str]
    numbers: dict[str, int | None]

    @classmethod
    def of(cls, d: Decision) -> DecisionPublic:
        return cls(admitted=d.admitted, failed_checks=list(d.failed_checks), messages=list(d.messages),
                   numbers=d.numbers)


class IssuedKeyPublic(BaseModel):
    key_id: str
    api_key: str = Field(description="shown once; only its SHA-256 is stored")


class TenantCreated(BaseModel):
    tenant: TenantPublic
    key: IssuedKeyPublic
    admission: DecisionPublic


class KeyPublic(BaseModel):
    id: str
    prefix: str
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    active: bool

    @classmethod
    def of(cls, k: KeyRow, now: float) -> KeyPublic:
        return cls(id=k.id, prefix=k.prefix, created_at=k.created_at, expires_at=k.expires_at,
                   last_used_at=k.last_used_at, active=k.active(now))


class RotateKey(BaseModel):
    grace_s: float = Field(3600.0, ge=0, description="how long older keys stay valid; 0 revokes them at once")


class WhatIf(BaseModel):
    gpu_memory: Size
    model: str | None = None
    max_model_len: int | None = Field(None, ge=16)
    quantization: str | None = None
    tenant: str | None = Field(None, description="an existing tenant to resize; its own reservation is freed")


class DevicePublic(BaseModel):
    index: int
    uuid: str
    name: str
    kind: str
    total: int
    free: int
    used: int


class TenantCapacity(BaseModel):
    name: str
    reserved: int
    measured: int | None


class CapacityPublic(BaseModel):
    mode: str
    device: DevicePublic
    headroom: int
    reserved: int
    unreserved: int
    tenants: list[TenantCapacity]

    @classmethod
    def of(cls, c: Capacity) -> CapacityPublic:
        return cls(mode=c.mode, device=DevicePublic(**c.device.__dict__), headroom=c.headroom, reserved=c.reserved,
                   unreserved=c.unreserved, tenants=[TenantCapacity(**t.__dict__) for t in c.tenants])


class AuditEntry(BaseModel):
    id: int
    at: float
    actor: str
    action: str
    tenant: str | None
    result: str
    detail: dict[str, Any]

    @classmethod
    def of(cls, row: AuditRow) -> AuditEntry:
        return cls(**row.__dict__)


class UsageSummary(BaseModel):
    tenant: str
    since: float
    until: float
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
