"""Request and response models of the admin API. Storage rows never leave as they are."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Self, TypeAlias, get_type_hints

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, create_model
from pydantic.config import JsonDict

from manager.control.admission import Decision
from manager.control.capacity import Capacity
from manager.control.members import MAX_WEIGHT, MIN_WEIGHT, MemberView
from manager.control.records import AuditRow, KeyRow, Reach, TenantRow, UsageTotals
from manager.domain import (
    MAX_GRACE_S,
    MAX_MODEL_LEN,
    MIN_MODEL_LEN,
    QUOTA_DECLARED,
    SPEC_DECLARED,
    TENANT_FIELDS,
    Quotas,
)
from manager.fields import Kind, TenantField
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
ModelLen = Annotated[int, Field(ge=MIN_MODEL_LEN, le=MAX_MODEL_LEN, description="longest context in tokens")]
NAME_SCHEMA: JsonDict = {"pattern": TENANT_NAME.pattern, "minLength": 2, "maxLength": 32}
GPU_TEXT = (
    "the device to place the tenant on: its index in /capacity or its UUID (GPU-... or MIG-...); on a swarm also "
    "'<node>/' (any device of that node: its host name or ID) or '<node>/<i>' (the node's own device i); "
)
TEXT_MAX = {"quantization": 64}
"""The longest text a field takes (200 unless named)."""


class Strict(BaseModel):
    """Request bodies: unknown fields are refused, so a typo is an error, not a silent no-op."""

    model_config = ConfigDict(extra="forbid")


def _typed(f: TenantField, public: bool = False) -> Any:
    """The field's value type: a size is taken as bytes or as text with a unit (10G) and given as bytes."""
    kind = f.d.kind
    if kind is Kind.SIZE:
        return int if public else Size
    return {Kind.INT: int, Kind.DURATION: float, Kind.BOOL: bool, Kind.TEXT: str}[kind]


def request_field(f: TenantField, create: bool) -> tuple[Any, Any]:
    """A declared field as a request body's field: its type, bounds and description from the
    declaration (create: a field the spec needs is required; update: null leaves it as it is,
    except a quota, which null lifts)."""
    bounds: dict[str, Any] = {}
    if f.d.kind in (Kind.INT, Kind.DURATION) and f.d.hi is not None:
        bounds = {"ge": 0 if f.d.zero_unsets else f.d.lo, "le": f.d.hi}
    if f.d.kind is Kind.DURATION:
        bounds["allow_inf_nan"] = False
    if f.d.kind is Kind.TEXT:
        bounds["max_length"] = TEXT_MAX.get(f.name, 200)
    text = f.d.help
    if f.quota:
        text += " (null: no limit)"
    elif not create:
        text += "; null: unchanged"
    if create and f.d.required:
        return _typed(f), Field(description=text, **bounds)
    return _typed(f) | None, Field(None, description=text, **bounds)


def _derived(name: str, base: type[BaseModel], fields: dict[str, tuple[Any, Any]], doc: str) -> Any:
    return create_model(name, __base__=base, __doc__=doc, **fields)  # type: ignore[call-overload]


if TYPE_CHECKING:  # the fields below are derived from the declarations when the module loads
    TenantCreate: TypeAlias = Strict
    TenantUpdate: TypeAlias = Strict
    MemberCreate: TypeAlias = Strict
    MemberUpdate: TypeAlias = Strict
else:
    _gpu = (str | None, Field(None, max_length=64, description=GPU_TEXT + "default: the device where it fits tightest"))
    _moves = GPU_TEXT + "moves the tenant (its engine restarts there); default: it stays on its own"
    _member_name = Field(
        description="2-32 lowercase letters, digits and '-', starting with a letter (the tenant name rule)",
        json_schema_extra=NAME_SCHEMA,
    )
    _weight = (
        float | None,
        Field(
            None,
            ge=MIN_WEIGHT,
            le=MAX_WEIGHT,
            allow_inf_nan=False,
            description="its share of the tenant's engine while members' requests wait (fair queuing): 2 gets twice "
            "1's; null: 1 for a new member, unchanged for an update",
        ),
    )
    TenantCreate = _derived(
        "TenantCreate",
        Strict,
        {
            "name": (
                str,
                Field(
                    description="2-32 lowercase letters, digits and '-', starting with a letter",
                    json_schema_extra=NAME_SCHEMA,
                ),
            ),
            **{f.name: request_field(f, True) for f in TENANT_FIELDS},
            "gpu": _gpu,
        },
        "A new tenant: every declared field (manager.domain.TenantSpec); null or missing: the default.",
    )
    TenantUpdate = _derived(
        "TenantUpdate",
        Strict,
        {
            **{f.name: request_field(f, False) for f in TENANT_FIELDS},
            "gpu": (str | None, Field(None, max_length=64, description=_moves)),
        },
        "Only the fields sent change: quotas and the request size at once, the port recreates the gateway, "
        "the rest recreates the engine.",
    )
    MemberCreate = _derived(
        "MemberCreate",
        Strict,
        {"name": (str, _member_name), **{f.name: request_field(f, True) for f in QUOTA_DECLARED}, "weight": _weight},
        "A member: its own key and quotas nested in the tenant's (null: bounded only by the tenant's).",
    )
    MemberUpdate = _derived(
        "MemberUpdate",
        Strict,
        {**{f.name: request_field(f, True) for f in QUOTA_DECLARED}, "weight": _weight},
        "Only the quotas (and weight) sent change; null lifts a quota.",
    )


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable: invalid_input, not_found, conflict, admission_refused, ...")
    message: str = Field(description="what went wrong and what to do next")
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    """Every error of the admin API has this shape."""

    error: ErrorDetail


class TenantState(BaseModel):
    """What a tenant is now, beside its spec (``TenantPublic`` adds every declared field)."""

    name: str
    gpu_memory_human: str
    quotas: Quotas
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
    url: str = Field(
        "",
        description="where its clients reach it (the OpenAI base URL): on a swarm at its node's address, on one "
        "host at the address its port is bound to; '' when that is every interface",
    )
    node: str = Field("", description="the swarm node it runs on (its host name); '' on a single host")
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
        reach: Reach | None = None,
    ) -> Self:
        s = row.spec
        return cls(
            name=s.name,
            gpu_memory_human=format_size(s.gpu_memory),
            **{f.name: getattr(s, f.name) for f in SPEC_DECLARED},
            quotas=s.quotas,
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
            url=reach.url if reach else "",
            node=reach.node if reach else "",
            requests_today=today.requests if today else 0,
            tokens_today=today.tokens if today else 0,
            concurrency=concurrency,
        )


def _public(f: TenantField) -> tuple[Any, Any]:
    typed = _typed(f, public=True)
    if f.nullable:
        return typed | None, Field(description=f.d.help + f" (null: {f.d.unset})")
    return typed, Field(description=f.d.help)


if TYPE_CHECKING:
    TenantPublic: TypeAlias = TenantState
else:
    TenantPublic = _derived(
        "TenantPublic",
        TenantState,
        {f.name: _public(f) for f in SPEC_DECLARED},
        "A tenant: every declared field (manager.domain.TenantSpec), its quotas, and what it is now.",
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
    weight: float = Field(1.0, description="its share of the engine while requests wait (fair queuing)")
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
            quotas=m.quotas,
            weight=m.weight,
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
        description=GPU_TEXT + "default: every device (a resized tenant: its own)",
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
    uuid: str = Field(description="GPU-... or MIG-...; host-memory in cpu mode (host-memory@<node ID> on a swarm)")
    name: str
    kind: str = Field(description="gpu, mig or host-memory")
    total: int
    free: int
    used: int
    reserved: int = Field(0, description="kept by the driver (NVML v2); never usable")
    node: str = Field("", description="the swarm node's ID (GTM_RUNTIME=swarm); '' on a single host")
    node_name: str = Field("", description="that node's host name")
    node_index: int | None = Field(None, description="its index on its node (what --node N --gpu I names)")


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


class EncryptionPublic(BaseModel):
    """Whether this host can make ``--volume encrypted:/data``, and if not, what it lacks."""

    mechanism: str
    available: bool
    problem: str | None
    default_size: int
    volumes: int = Field(description="encrypted volumes made")


class VolumeKeysRotated(BaseModel):
    kek_id: str = Field(description="the key-encryption key every data key is wrapped under now")
    rewrapped: list[str] = Field(description="the tenants whose key was rewrapped")


class CapacityPublic(BaseModel):
    mode: str
    device: DevicePublic = Field(description="the first device (the only one in cpu mode); see devices")
    headroom: int
    reserved: int = Field(description="reserved on all devices")
    unreserved: int = Field(description="the largest reservation one new tenant can get on any device")
    tenants: list[TenantCapacity]
    devices: list[DeviceCapacityPublic]
    encrypted_volumes: EncryptionPublic | None = None
    gpu_sharing: str = Field("none", description="how engines on one GPU share it: none, or mps (GTM_GPU_SHARING)")

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


class AuditPublic(BaseModel):
    @classmethod
    def of(cls, row: AuditRow) -> Self:
        return cls(**row.__dict__)


if TYPE_CHECKING:
    AuditEntry: TypeAlias = AuditPublic
else:  # every field of an audit row is public: the model is the row's fields, read from it
    AuditEntry = _derived(
        "AuditEntry",
        AuditPublic,
        {name: (hint, ...) for name, hint in get_type_hints(AuditRow).items()},
        "One entry of the audit trail.",
    )


class UsageSummary(BaseModel):
    tenant: str
    since: float
    until: float
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
