"""Admin API routes: tenants, keys, capacity, what-if, audit."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response, status

from manager.api.deps import Admin, Service
from manager.api.schemas import (
    AuditEntry,
    CapacityPublic,
    DecisionPublic,
    EncryptionPublic,
    ErrorResponse,
    IssuedKeyPublic,
    KeyPublic,
    MemberCreate,
    MemberCreated,
    MemberPublic,
    MemberUpdate,
    ModelImport,
    Removal,
    RotateKey,
    TenantCreate,
    TenantCreated,
    TenantPublic,
    TenantUpdate,
    UsageSummary,
    VolumeKeysRotated,
    WhatIf,
)
from manager.control.catalog import CatalogEntry
from manager.control.costs import Share
from manager.control.records import Reach, TenantRow
from manager.control.service import TenantService
from manager.domain import MAX_MODEL_LEN, MIN_MODEL_LEN, Quotas
from manager.utc import start_of_day


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "the body is not JSON",
        401: "missing or wrong admin token",
        404: "no such tenant, member, key or model (the message lists the models there are)",
        409: "conflict: the name or port (or member name) is taken, the tenant is being removed, or it does not fit "
        "(admission_refused, with every number in details), or the host cannot make or open an encrypted volume "
        "now (encryption_unavailable: the message says what it lacks)",
        422: "invalid input: the message says which field and what it accepts",
        503: "the container runtime (Docker) or the GPU did not answer",
    }
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


router = APIRouter(prefix="/api/v1", responses=error_responses(401, 422, 503))
TenantName = Annotated[str, Path(max_length=64, description="the tenant's name")]
MemberName = Annotated[str, Path(max_length=64, description="the member's name")]
ModelLenQuery = Annotated[int | None, Query(ge=MIN_MODEL_LEN, le=MAX_MODEL_LEN, description="context length")]
UnixTime = Annotated[float, Query(ge=0, le=1e11, allow_inf_nan=False, description="UNIX seconds")]


@router.get("/tenants", tags=["tenants"])
def list_tenants(svc: Service, _: Admin) -> list[TenantPublic]:
    measured = svc.meter.measured_use()
    day = start_of_day(time.time())
    rows = svc.tenants()
    reach = svc.reach(rows)
    return [
        TenantPublic.of(
            r,
            measured.get(r.spec.name),
            svc.usage(r.spec.name, day),
            svc.models.concurrency(r.spec),
            reach.get(r.spec.name, Reach()),
        )
        for r in rows
    ]


def _public(svc: TenantService, row: TenantRow) -> TenantPublic:
    """One tenant as GET shows it: what it uses, what it served today, where it is reached."""
    name = row.spec.name
    today = svc.usage(name, start_of_day(time.time()))
    measured = svc.meter.measured_use(name).get(name)
    reach = svc.reach([row]).get(name, Reach())
    return TenantPublic.of(row, measured, today, svc.models.concurrency(row.spec), reach)


@router.post(
    "/tenants", status_code=status.HTTP_201_CREATED, tags=["tenants"], responses=error_responses(400, 404, 409)
)
def create_tenant(body: TenantCreate, svc: Service, actor: Admin) -> TenantCreated:
    """Admit and create a tenant. 409 with every number when it does not fit. The key is shown once."""
    values = body.model_dump()
    gpu = values.pop("gpu")
    spec = svc.new_spec(**values)
    created = svc.create(spec, actor, gpu=gpu)
    return TenantCreated(
        tenant=TenantPublic.of(
            created.tenant,
            concurrency=svc.models.concurrency(created.tenant.spec),
            reach=svc.reach([created.tenant]).get(spec.name, Reach()),
        ),
        key=IssuedKeyPublic(key_id=created.key.id, api_key=created.key.secret_key),
        admission=DecisionPublic.of(created.decision),
    )


@router.get("/tenants/{name}", tags=["tenants"], responses=error_responses(404))
def get_tenant(name: TenantName, svc: Service, _: Admin) -> TenantPublic:
    return _public(svc, svc.tenant(name))


@router.get("/usage", tags=["usage"])
def usage(svc: Service, _: Admin, since: UnixTime = 0.0, until: UnixTime | None = None) -> list[UsageSummary]:
    """Requests and tokens per tenant between ``since`` and ``until`` (UNIX seconds), as collected
    from the gateways (every ``GTM_USAGE_INTERVAL_S``)."""
    end = until or time.time() + 1
    out = []
    for row in svc.tenants():
        t = svc.usage(row.spec.name, since, end)
        out.append(
            UsageSummary(
                tenant=row.spec.name,
                since=since,
                until=end,
                requests=t.requests,
                prompt_tokens=t.prompt_tokens,
                completion_tokens=t.completion_tokens,
                total_tokens=t.tokens,
            )
        )
    return out


@router.patch("/tenants/{name}", tags=["tenants"], responses=error_responses(400, 404, 409))
def update_tenant(name: TenantName, body: TenantUpdate, svc: Service, actor: Admin) -> TenantPublic:
    """Resize or change options (engine recreated) or quotas (engine untouched)."""
    row = svc.update(name, actor, **body.model_dump(exclude_unset=True))
    return _public(svc, row)  # the same figures as GET (a quota change keeps its engine)


@router.delete(
    "/tenants/{name}", status_code=status.HTTP_202_ACCEPTED, tags=["tenants"], responses=error_responses(404)
)
def remove_tenant(name: TenantName, svc: Service, actor: Admin) -> Removal:
    """Removes the tenant's containers, network and volume (asynchronously, by the reconciler)."""
    svc.remove(name, actor)
    return Removal(status="removing")


@router.get("/tenants/{name}/keys", tags=["keys"], responses=error_responses(404))
def list_keys(name: TenantName, svc: Service, _: Admin) -> list[KeyPublic]:
    now = time.time()
    return [KeyPublic.of(k, now) for k in svc.api_keys(name)]


@router.post(
    "/tenants/{name}/keys", status_code=status.HTTP_201_CREATED, tags=["keys"], responses=error_responses(400, 404)
)
def rotate_key(name: TenantName, body: RotateKey, svc: Service, actor: Admin) -> IssuedKeyPublic:
    """Issue a new key for the tenant's first member (named like the tenant); its older keys stay
    valid for ``grace_s`` seconds (0: revoked at once). Other members: ``/members/{member}/keys``."""
    issued = svc.rotate_key(name, actor, body.grace_s)
    return IssuedKeyPublic(key_id=issued.id, api_key=issued.secret_key)


@router.delete(
    "/tenants/{name}/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["keys"],
    responses=error_responses(404),
)
def revoke_key(name: TenantName, key_id: Annotated[str, Path(max_length=64)], svc: Service, actor: Admin) -> Response:
    svc.revoke_key(name, key_id, actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/tenants/{name}/members", tags=["members"], responses=error_responses(404))
def list_members(name: TenantName, svc: Service, _: Admin) -> list[MemberPublic]:
    """The tenant's members: keys (by id and prefix), quotas, requests and tokens today and this
    month (UTC), last use."""
    now = time.time()
    return [MemberPublic.of(v, now) for v in svc.members.views(name, now)]


@router.post(
    "/tenants/{name}/members",
    status_code=status.HTTP_201_CREATED,
    tags=["members"],
    responses=error_responses(400, 404, 409),
)
def add_member(name: TenantName, body: MemberCreate, svc: Service, actor: Admin) -> MemberCreated:
    """Add a member with its own key (shown once) and quotas nested in the tenant's."""
    values = body.model_dump()
    member, weight = values.pop("name"), values.pop("weight", None)
    row, issued = svc.members.add(name, member, Quotas(**values), actor, weight)
    now = time.time()
    return MemberCreated(
        member=MemberPublic.of(svc.members.view(name, row.name, now), now),
        key=IssuedKeyPublic(key_id=issued.id, api_key=issued.secret_key),
    )


@router.patch("/tenants/{name}/members/{member}", tags=["members"], responses=error_responses(400, 404, 409))
def update_member(name: TenantName, member: MemberName, body: MemberUpdate, svc: Service, actor: Admin) -> MemberPublic:
    """Change a member's quotas (applied live by the gateway); only the fields sent change."""
    changes = body.model_dump(exclude_unset=True)
    weight = changes.pop("weight", None)
    svc.members.update(name, member, changes, actor, weight)
    now = time.time()
    return MemberPublic.of(svc.members.view(name, member, now), now)


@router.delete(
    "/tenants/{name}/members/{member}",
    status_code=status.HTTP_204_NO_CONTENT,
    tags=["members"],
    responses=error_responses(404, 409),
)
def remove_member(name: TenantName, member: MemberName, svc: Service, actor: Admin) -> Response:
    """Remove a member: its keys stop working on the tenant's port within seconds; its usage stays."""
    svc.members.remove(name, member, actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/tenants/{name}/members/{member}/keys",
    status_code=status.HTTP_201_CREATED,
    tags=["members"],
    responses=error_responses(400, 404),
)
def rotate_member_key(
    name: TenantName, member: MemberName, body: RotateKey, svc: Service, actor: Admin
) -> IssuedKeyPublic:
    """Issue a new key for the member; its older keys stay valid for ``grace_s`` seconds (0: revoked at once)."""
    issued = svc.members.rotate_key(name, actor, body.grace_s, member)
    return IssuedKeyPublic(key_id=issued.id, api_key=issued.secret_key)


@router.get("/models", tags=["models"])
def list_models(svc: Service, _: Admin, max_model_len: ModelLenQuery = None) -> list[CatalogEntry]:
    """The models in the models volume and the smallest reservation that fits each (the same
    computation as admission's model-fit check), at the default and at ``max_model_len``."""
    return svc.models.entries(max_model_len)


@router.post("/models", status_code=status.HTTP_201_CREATED, tags=["models"], responses=error_responses(400, 404, 409))
def import_model(body: ModelImport, svc: Service, actor: Admin) -> CatalogEntry:
    """Checks a model directory on the manager (config, tokenizer, safetensors headers) and copies it
    into the models volume; an incomplete one is refused and nothing is written."""
    return svc.models.import_model(body.source, body.name, actor)


@router.delete(
    "/models/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["models"], responses=error_responses(404, 409)
)
def remove_model(name: Annotated[str, Path(max_length=100)], svc: Service, actor: Admin) -> Response:
    """Deletes a model from the models volume; 409 naming the tenants while any uses it."""
    svc.models.remove(name, actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/capacity", tags=["capacity"])
def capacity(svc: Service, _: Admin) -> CapacityPublic:
    out = CapacityPublic.of(svc.meter.capacity())
    out.encrypted_volumes = EncryptionPublic.model_validate(svc.volume_status())
    out.gpu_sharing = svc.settings.gpu_sharing
    return out


@router.post("/volume-keys/rotate", tags=["capacity"], responses=error_responses(409))
def rotate_volume_keys(svc: Service, actor: Admin) -> VolumeKeysRotated:
    """Rewraps every encrypted volume's data key under the first key of the volume key file
    (``GTM_VOLUME_KEY_FILE``); no data is touched."""
    kek_id, done = svc.rotate_volume_keys(actor)
    return VolumeKeysRotated(kek_id=kek_id, rewrapped=done)


@router.post("/what-if", tags=["capacity"], responses=error_responses(400, 404))
def what_if(body: WhatIf, svc: Service, _: Admin) -> DecisionPublic:
    """Would this reservation fit? Creates nothing."""
    if body.tenant:
        svc.tenant(body.tenant)
    decision = svc.placer.assess(
        body.gpu_memory,
        body.model or svc.settings.default_model,
        body.max_model_len or svc.settings.default_max_model_len,
        body.quantization,
        tenant=body.tenant,
        gpu=body.gpu,
    )
    return DecisionPublic.of(decision)


@router.get("/audit", tags=["audit"])
def audit(
    svc: Service, _: Admin, tenant: str | None = None, action: str | None = None, limit: int = Query(200, ge=1, le=5000)
) -> list[AuditEntry]:
    return [AuditEntry.of(r) for r in svc.audit_log(tenant, action, limit)]


@router.get("/cost", tags=["usage"])
def cost(
    svc: Service,
    _: Admin,
    month: Annotated[str, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$", description="YYYY-MM")],
    total: Annotated[float, Query(ge=0, le=1e12, allow_inf_nan=False, description="the month's host cost")],
    asleep_rate: Annotated[
        float | None,
        Query(
            ge=0,
            le=1,
            allow_inf_nan=False,
            description="what an asleep GiB-hour costs as a fraction of an awake one; default: what a sleeper "
            "keeps of its reservation (0: its engine is stopped)",
        ),
    ] = None,
) -> list[Share]:
    """The month's cost split by reserved memory-hours (asleep ones at their own rate) and by tokens
    (the console's CSV, as JSON)."""
    return svc.cost(month, total, asleep_rate)
