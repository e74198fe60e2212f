"""Request and response models of the admin API. Storage rows never leave as they are."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.config import JsonDict

from manager.control.admission import Decision
from manager.control.members import MemberView
from manager.control.records import AuditRow, KeyRow, TenantRow, UsageTotals
from manager.control.service import Capacity
from manager.domain import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    MAX_GRACE_S,
    MAX_IDLE_SLEEP_S,
    MAX_IMAGE_PIXELS,
    MAX_IMAGES,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    MAX_PORT,
    MIN_IDLE_SLEEP_S,
    MIN_IMAGE_PIXELS,
    MIN_MODEL_LEN,
    MIN_PORT,
    QUOTA_KINDS,
)
from manager.gpu import DeviceMemory
from manager.names import TENANT_NAME
from manager.sizes import MAX_SIZE, format_size, parse_size

SIZE_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_SIZE},
        {"type": "string", "pattern": r"^\s*\d{1,15}(\.\d{1,9})?\s*([bB]|[kKmMgGtT]([iI]?[bB])?)\s*$"},
    ],
    "description": "bytes, or a size with a binary unit: 512M, 1.5G, 10G, 10GiB (1G = 1024^3 bytes); at most 1024T",
}
Size = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(SIZE_SCHEMA)]
Port = Annotated[int, Field(ge=MIN_PORT, le=MAX_PORT, description="the tenant's OpenAI API port on the host")]
ModelLen = Annotated[int, Field(ge=MIN_MODEL_LEN, le=MAX_MODEL_LEN, description="longest context in tokens")]
MAX_BODY_TEXT = (
    "largest request body on the tenant's port (64K to 64M; default 32M: a 20 MB image as a base64 data: URL)"
)
NAME_SCHEMA: JsonDict = {"pattern": TENANT_NAME.pattern, "minLength": 2, "maxLength": 32}


class Strict(BaseModel):
    """Request bodies: unknown fields are refused, so a typo is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


def _quota(name: str) -> Any:
    """A quota field: its meaning and bounds from ``manager.domain.QUOTA_KINDS``."""
    kind = QUOTA_KINDS[name]
    return Field(None, ge=1, le=kind.max, description=kind.meaning + " (null: no limit)")


class QuotaFields(Strict):
    rpm_limit: int | None = _quota("rpm_limit")
    tokens_per_day: int | None = _quota("tokens_per_day")
    requests_per_month: int | None = _quota("requests_per_month")
    max_in_flight: int | None = _quota("max_in_flight")


class EngineOptionFields(Strict):
    """Image limits and engine options (manager.domain.ENGINE_OPTIONS); null: the default (create)
    or unchanged (update)."""

    max_images: int | None = Field(
        None,
        ge=0,
        le=MAX_IMAGES,
        description=f"images in one chat request, checked by the gateway and the engine's per-prompt limit "
        f"(default {DEFAULT_MAX_IMAGES}; 0: no images)",
    )
    max_image_pixels: int | None = Field(
        None,
        ge=MIN_IMAGE_PIXELS,
        le=MAX_IMAGE_PIXELS,
        description=f"width x height of the largest image, read from its header (default {DEFAULT_MAX_IMAGE_PIXELS})",
    )
    enable_prefix_caching: bool | None = Field(
        None, description="the engine's prefix cache, salted per member (default on)"
    )
    trust_remote_code: bool | None = Field(
        None, description="let the engine run Python code shipped with the model (default off)"
    )
    max_num_seqs: int | None = Field(
        None,
        ge=0,
        le=MAX_NUM_SEQS,
        description="sequences the engine batches at once "
        "(0 or null: what the reservation holds, at most vLLM's default 128)",
    )


class SleepFields(Strict):
    """Sleeping when idle (``control.sleeper``); null: unchanged on update."""

    idle_sleep_s: float | None = Field(
        None,
        ge=0,
        le=MAX_IDLE_SLEEP_S,
        description=f"after this many seconds without a request the tenant sleeps: its engine stops, and the "
        f"next request starts it again (held meanwhile); at least {MIN_IDLE_SLEEP_S:.0f}; 0: never (the default)",
    )
    always_on: bool | None = Field(
        None,
        description="never put to sleep: neither when idle nor, on a host with GTM_OVERCOMMIT, to make room for "
        "another tenant's wake (default: false)",
    )


class TenantCreate(QuotaFields, EngineOptionFields, SleepFields):
    name: str = Field(
        description="2-32 lowercase letters, digits and '-', starting with a letter", json_schema_extra=NAME_SCHEMA
    )
    port: Port
    gpu_memory: Size = Field(description="the reservation: " + str(SIZE_SCHEMA["description"]))
    model: str | None = Field(None, description="directory name under the models volume", max_length=200)
    max_model_len: ModelLen | None = None
    quantization: str | None = Field(None, max_length=64)
    shm_size: Size | None = None
    max_body: Size | None = Field(None, description=MAX_BODY_TEXT)
    gpu: str | None = Field(
        None,
        max_length=64,
        description="the device to place the tenant on: its index in /capacity or its UUID (GPU-... or MIG-...); "
        "default: the device where it fits tightest",
    )


class TenantUpdate(QuotaFields, EngineOptionFields, SleepFields):
    gpu_memory: Size | None = None
    port: Port | None = None
    model: str | None = Field(None, max_length=200)
    max_model_len: ModelLen | None = None
    quantization: str | None = Field(None, max_length=64)
    shm_size: Size | None = None
    max_body: Size | None = Field(None, description=MAX_BODY_TEXT)
    gpu: str | None = Field(
        None,
        max_length=64,
        description="the device to place the tenant on: its index in /capacity or its UUID (GPU-... or MIG-...); "
        "moves the tenant (its engine restarts there); default: it stays on its own",
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable: invalid_input, not_found, conflict, admission_refused, ...")
    message: str = Field(description="what went wrong and what to do next")
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    """Every error of the admin API has this shape."""

    error: ErrorDetail


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
    max_body: int
    max_images: int
    max_image_pixels: int
    enable_prefix_caching: bool
    trust_remote_code: bool
    max_num_seqs: int | None
    quotas: Quotas
    idle_sleep_s: float | None = Field(None, description="seconds without a request before it sleeps; null: never")
    always_on: bool = Field(False, description="never put to sleep (when idle or by overcommit)")
    wake_refusal: str = Field(
        "", description="asleep: why it cannot wake now, with the numbers (overcommit: nothing can sleep to make room)"
    )
    last_request_at: float | None = Field(None, description="when its gateway last took a request, as last read")
    sleeps: int = Field(0, description="times it went to sleep")
    wakes: int = Field(0, description="times a request woke it")
    last_wake_s: float | None = Field(
        None, description="seconds its last wake took, from the request that found it asleep to its engine serving"
    )
    status: str
    reason: str
    status_since: float
    created_at: float
    measured: int | None = None
    device: str = Field("", description="the UUID of the device its engine runs on ('' for the host's first)")
    requests_today: int = 0
    tokens_today: int = 0
    concurrency: int | None = Field(
        None,
        description="sequences its engine runs at once: the tenant's max_num_seqs, else what its reservation "
        "holds (at most vLLM's default, 128); requests beyond it wait in the engine's queue",
    )

    @classmethod
    def of(
        cls,
        row: TenantRow,
        measured: int | None = None,
        today: UsageTotals | None = None,
        concurrency: int | None = None,
    ) -> TenantPublic:
        s = row.spec
        return cls(
            name=s.name,
            port=s.port,
            gpu_memory=s.gpu_memory,
            gpu_memory_human=format_size(s.gpu_memory),
            model=s.model,
            max_model_len=s.max_model_len,
            quantization=s.quantization,
            shm_size=s.shm_size,
            max_body=s.max_body,
            **s.options(),
            quotas=Quotas(**s.quotas.__dict__),
            idle_sleep_s=s.idle_sleep_s,
            always_on=s.always_on,
            wake_refusal=row.sleep.wake_refusal,
            last_request_at=row.sleep.last_request_at,
            sleeps=row.sleep.sleeps,
            wakes=row.sleep.wakes,
            last_wake_s=row.sleep.last_wake_s,
            status=row.status.value,
            reason=row.reason,
            status_since=row.status_since,
            created_at=row.created_at,
            measured=measured,
            device=row.device,
            requests_today=today.requests if today else 0,
            tokens_today=today.tokens if today else 0,
            concurrency=concurrency,
        )


class DecisionPublic(BaseModel):
    admitted: bool
    failed_checks: list[str]
    messages: list[str]
    numbers: dict[str, int | None]
    device: str = Field("", description="the device the numbers are of (on a host with several, or --gpu)")
    by_overcommit: bool = Field(
        False,
        description="it fits only while other tenants sleep (GTM_OVERCOMMIT): it starts asleep, and its first "
        "request wakes it",
    )

    @classmethod
    def of(cls, d: Decision) -> DecisionPublic:
        return cls(
            admitted=d.admitted,
            failed_checks=list(d.failed_checks),
            messages=list(d.messages),
            numbers=d.numbers,
            device=d.device,
            by_overcommit=d.by_overcommit,
        )


class IssuedKeyPublic(BaseModel):
    key_id: str
    api_key: str = Field(description="shown once; only its SHA-256 is stored")


class TenantCreated(BaseModel):
    tenant: TenantPublic
    key: IssuedKeyPublic
    admission: DecisionPublic


class KeyPublic(BaseModel):
    id: str
    member: str = Field(description="the member holding the key")
    prefix: str = Field(description="how the key starts, e.g. gtm_1a2b3c4d_ (the rest is never stored)")
    created_at: float
    expires_at: float | None
    last_used_at: float | None
    active: bool

    @classmethod
    def of(cls, k: KeyRow, now: float) -> KeyPublic:
        # the visible start of the key (the id is part of it), to match a key against this list
        return cls(
            id=k.id,
            member=k.member,
            prefix=f"{k.prefix}_{k.id}_",
            created_at=k.created_at,
            expires_at=k.expires_at,
            last_used_at=k.last_used_at,
            active=k.active(now),
        )


class RotateKey(Strict):
    grace_s: float = Field(
        3600.0,
        ge=0,
        le=MAX_GRACE_S,
        allow_inf_nan=False,
        description="how long older keys stay valid; 0 revokes them at once",
    )


class MemberCreate(QuotaFields):
    """A member: its own key and quotas nested in the tenant's (null: bounded only by the tenant's)."""

    name: str = Field(
        description="2-32 lowercase letters, digits and '-', starting with a letter (the tenant name rule)",
        json_schema_extra=NAME_SCHEMA,
    )


class MemberUpdate(QuotaFields):
    """Only the quotas sent change; null lifts one."""


class UsageCount(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, t: UsageTotals) -> UsageCount:
        return cls(
            requests=t.requests,
            prompt_tokens=t.prompt_tokens,
            completion_tokens=t.completion_tokens,
            total_tokens=t.tokens,
        )


class MemberPublic(BaseModel):
    tenant: str
    name: str
    quotas: Quotas = Field(description="the member's own limits, nested in the tenant's (null: no own limit)")
    created_at: float
    keys: list[KeyPublic]
    today: UsageCount = Field(description="since 00:00 UTC")
    month: UsageCount = Field(description="since the first of the month, 00:00 UTC")
    last_used_at: float | None = Field(description="the member's last metered request")

    @classmethod
    def of(cls, view: MemberView, now: float) -> MemberPublic:
        m = view.row
        return cls(
            tenant=m.tenant,
            name=m.name,
            quotas=Quotas(**m.quotas.__dict__),
            created_at=m.created_at,
            keys=[KeyPublic.of(k, now) for k in view.keys],
            today=UsageCount.of(view.usage.today),
            month=UsageCount.of(view.usage.month),
            last_used_at=view.usage.last_used_at,
        )


class MemberCreated(BaseModel):
    member: MemberPublic
    key: IssuedKeyPublic


class WhatIf(Strict):
    gpu_memory: Size
    model: str | None = Field(None, max_length=200)
    max_model_len: ModelLen | None = None
    quantization: str | None = Field(None, max_length=64)
    tenant: str | None = Field(
        None, description="an existing tenant to resize; its own reservation is freed", max_length=32
    )
    gpu: str | None = Field(
        None,
        max_length=64,
        description="the device to place the tenant on: its index in /capacity or its UUID (GPU-... or MIG-...); "
        "default: every device (a resized tenant: its own)",
    )


class ModelImport(Strict):
    source: str = Field(
        max_length=4096,
        description="a directory on the manager (config.json, tokenizer, *.safetensors), or a Hugging Face "
        "cache entry (models--org--name)",
    )
    name: str | None = Field(None, max_length=100, description="the model's name (default: the directory's)")


class Removal(BaseModel):
    status: str = Field(description="'removing': the reconciler tears the tenant down in the background")


class DevicePublic(BaseModel):
    index: int = Field(description="what --gpu N names")
    uuid: str = Field(description="GPU-... or MIG-...; host-memory in cpu mode")
    name: str
    kind: str = Field(description="gpu, mig or host-memory")
    total: int
    free: int
    used: int
    reserved: int = Field(0, description="kept by the driver (NVML v2); never usable")


class TenantCapacity(BaseModel):
    name: str
    reserved: int
    measured: int | None
    unknown: bool = Field(False, description="its engine runs but the driver hides its use (MIG, vGPU)")


class DeviceCapacityPublic(BaseModel):
    device: DevicePublic
    reserved: int
    process_overhead: int = Field(description="each engine's CUDA context, held beside its reservation")
    unreserved: int = Field(description="the largest reservation a new tenant can get on this device")
    tenants: list[TenantCapacity]


class CapacityPublic(BaseModel):
    mode: str
    device: DevicePublic = Field(description="the first device (the only one in cpu mode); see devices")
    headroom: int
    reserved: int = Field(description="reserved on all devices")
    unreserved: int = Field(description="the largest reservation one new tenant can get on any device")
    tenants: list[TenantCapacity]
    devices: list[DeviceCapacityPublic]

    @classmethod
    def of(cls, c: Capacity) -> CapacityPublic:
        def device(d: DeviceMemory) -> DevicePublic:
            return DevicePublic(**d.__dict__)

        return cls(
            mode=c.mode,
            device=device(c.device),
            headroom=c.headroom,
            reserved=c.reserved,
            unreserved=c.unreserved,
            tenants=[TenantCapacity(**t.__dict__) for t in c.tenants],
            devices=[
                DeviceCapacityPublic(
                    device=device(d.device),
                    reserved=d.reserved,
                    process_overhead=d.process_overhead,
                    unreserved=d.unreserved,
                    tenants=[TenantCapacity(**t.__dict__) for t in d.tenants],
                )
                for d in c.devices
            ],
        )


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
