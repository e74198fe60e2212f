"""Console pages. Thin: every action goes through ``TenantService`` like the API does."""

from __future__ import annotations

import csv
import hmac
import inspect
import io
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from manager import keys
from manager.console.forms import edit_changes, new_values, quota_values, recreates_engine, section, shown, weight_of
from manager.console.session import (
    COOKIE,
    DEVICE_COOKIE,
    DEVICE_LIFETIME_S,
    LIFETIME_S,
    Flashes,
    LoginLimiter,
    Session,
    Sessions,
    login_bucket,
)
from manager.console.views import capacity_segments, day_bars, label_of
from manager.control.records import Reach
from manager.control.service import TenantService
from manager.detail import detail_text
from manager.domain import Quotas
from manager.errors import GtmError, InvalidInput
from manager.sizes import exact_size, format_size, parse_size
from manager.utc import start_of_day

router = APIRouter(include_in_schema=False)


class LoginRequired(Exception):
    """Raised by pages without a valid session; answered with a redirect to /login."""


class CsrfFailed(GtmError):
    http_status = 403
    code = "csrf_failed"


def templates(request: Request) -> Jinja2Templates:
    t: Jinja2Templates = request.app.state.templates
    return t


def svc_of(request: Request) -> TenantService:
    """The tenant service the composition root (``manager.wiring``) put in the app's state."""
    svc: TenantService = request.app.state.service
    return svc


def current(request: Request) -> Session:
    sessions: Sessions = request.app.state.sessions
    session = sessions.read(request.cookies.get(COOKIE))
    if session is None:
        raise LoginRequired()
    return session


async def form_with_csrf(request: Request, session: Session) -> dict[str, str]:
    form = await request.form()
    if form.get("csrf") != session.csrf:
        raise CsrfFailed("the form is missing a valid CSRF token: reload the page and submit it again")
    return {k: str(v) for k, v in form.items()}


def form_action(act: Callable[..., Response]) -> Callable[..., Awaitable[Response]]:
    """A form the console posts: its body (and CSRF token) is read on the event loop, then ``act``,
    which calls the synchronous service (SQLite, Docker: a stats read takes a second on Docker
    20.10), runs on a worker thread, so /healthz and every other request are answered meanwhile.
    ``act(request, session, form, **path_parameters)``; the route's signature is the path's."""

    async def route(request: Request, **params: str) -> Response:
        session = current(request)
        form = await form_with_csrf(request, session)
        return await run_in_threadpool(act, request, session, form, **params)

    signature = inspect.signature(act)
    kept = [p for name, p in signature.parameters.items() if name not in ("session", "form")]
    route.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    route.__name__, route.__doc__ = act.__name__, act.__doc__
    return route


def page(
    request: Request,
    name: str,
    session: Session | None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    return templates(request).TemplateResponse(
        request,
        name,
        {
            "session": session,
            "format_size": format_size,
            "exact_size": exact_size,
            "utc": _utc,
            "shown": shown,
            "section": section,
            "now": time.time(),
            **context,
        },
        status_code=status_code,
        headers=headers,
    )


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def _grace(form: dict[str, str]) -> float:
    value = form.get("grace_s", "").strip() or "3600"
    try:
        return float(value)
    except ValueError as exc:
        raise InvalidInput(f"the grace period must be a number of seconds, got {value!r}") from exc


# ---------------------------------------------------------------- login
@router.get("/login")
def login_page(request: Request) -> HTMLResponse:
    return page(request, "login.html", None, error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    sessions: Sessions = request.app.state.sessions
    client = request.client.host if request.client else "unknown"
    device = sessions.device(request.cookies.get(DEVICE_COOKIE))
    bucket = login_bucket(device, client)
    form = await request.form()
    user, password = str(form.get("username", "")), str(form.get("password", ""))
    return await run_in_threadpool(_login, request, user, password, client, device, bucket)


def _login(request: Request, user: str, password: str, client: str, device: str | None, bucket: str) -> Response:
    """Checks the password and audits the attempt (SQLite: on a worker thread)."""
    service = svc_of(request)
    limiter: LoginLimiter = request.app.state.login_limiter
    sessions: Sessions = request.app.state.sessions
    wait = limiter.blocked(bucket)
    if wait:
        service.record(
            user or "?", "console-login", "rate-limited", {"client": client, "known_device": device is not None}
        )
        return page(
            request,
            "login.html",
            None,
            status_code=429,
            headers={"retry-after": str(int(wait) + 1)},
            error=f"Too many failed logins from this browser; try again in {wait:.0f} s.",
        )
    expected_user, expected_password = request.app.state.console_credentials
    if not (
        hmac.compare_digest(user.encode(), expected_user.encode())
        and hmac.compare_digest(password.encode(), expected_password.encode())
    ):
        limiter.failed(bucket)
        service.record(user or "?", "console-login", "failed", {"client": client, "known_device": device is not None})
        return page(request, "login.html", None, status_code=401, error="Wrong user name or password.")
    limiter.succeeded(bucket)
    cookie, _ = sessions.issue(user)
    service.record(user, "console-login", "ok", {"client": client, "known_device": device is not None})
    response = RedirectResponse("/", status_code=303)
    secure = request.url.scheme == "https"
    response.set_cookie(COOKIE, cookie, max_age=LIFETIME_S, httponly=True, samesite="strict", secure=secure)
    if device is None:  # this browser has now proven itself: its own bucket from here on
        response.set_cookie(
            DEVICE_COOKIE,
            sessions.issue_device(),
            max_age=DEVICE_LIFETIME_S,
            httponly=True,
            samesite="strict",
            secure=secure,
        )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = current(request)
    await form_with_csrf(request, session)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


# ---------------------------------------------------------------- overview
def _today() -> float:
    return start_of_day(time.time())


@router.get("/")
def overview(request: Request) -> HTMLResponse:
    session = current(request)
    svc = svc_of(request)
    cap = svc.meter.capacity()
    measured = {t.name: t.measured for t in cap.tenants}
    unknown = {t.name for t in cap.tenants if t.unknown}  # the driver hides its use (MIG, vGPU)
    rows = []
    day = _today()
    for r in svc.tenants():
        today = svc.usage(r.spec.name, day)
        q = r.spec.quotas
        left = []
        if q.rpm_limit:
            left.append(f"{q.rpm_limit}/min")
        if q.tokens_per_day:
            left.append(f"{max(q.tokens_per_day - today.tokens, 0)} tokens left today")
        rows.append(
            {
                "row": r,
                "measured": measured.get(r.spec.name),
                "unknown": r.spec.name in unknown,
                "today": today,
                "quota": ", ".join(left) or "no limits",
            }
        )
    bars = [(ledger, capacity_segments(ledger)) for ledger in cap.devices]
    colors = {seg.label: seg.color for _, segments in bars for seg in segments if seg.kind == "tenant"}
    device_of = {t.name: label_of(ledger.device) for ledger in cap.devices for t in ledger.tenants}
    return page(
        request,
        "overview.html",
        session,
        cap=cap,
        bars=bars,
        rows=rows,
        colors=colors,
        device_of=device_of,
        label_of=label_of,
    )


# ---------------------------------------------------------------- tenants
@router.get("/tenants/new")
def new_tenant_page(request: Request) -> HTMLResponse:
    session = current(request)
    return page(request, "tenant_new.html", session, error=None, form={}, created=None)


@router.post("/tenants/new")
@form_action
def new_tenant(request: Request, session: Session, form: dict[str, str]) -> HTMLResponse:
    svc = svc_of(request)
    try:
        created = svc.create(svc.new_spec(**new_values(form)), session.user, gpu=form.get("gpu", "").strip() or None)
    except GtmError as exc:
        return page(request, "tenant_new.html", session, error=exc.message, form=form, created=None)
    return page(request, "tenant_new.html", session, error=None, form={}, created=created)


def _tenant_context(request: Request, name: str) -> dict[str, Any]:
    svc = svc_of(request)
    row = svc.tenant(name)
    now = time.time()
    start = datetime.now(UTC).date() - timedelta(days=29)
    days = [(start + timedelta(days=i)).isoformat() for i in range(30)]
    since = datetime.combine(start, datetime.min.time(), UTC).timestamp()
    logs = svc.failure_log(name)
    return {
        "row": row,
        "keys": svc.api_keys(name),
        "members": svc.members.views(name, now),
        "key_now": now,
        "measured": svc.meter.measured_use(name).get(name),
        "bars": day_bars(svc.usage_daily(name, since), days),
        "today": svc.usage(name, _today()),
        "logs": logs,
        "models": svc.models.names(),
        "concurrency": svc.models.concurrency(row.spec),
        "latency": svc.latency(name, now),
        "reach": svc.reach([row]).get(name, Reach()),
    }


def _tenant_page(request: Request, session: Session, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """The tenant page; ``new_key`` (shown this once), ``new_key_member``, ``message``, ``error``."""
    defaults: dict[str, Any] = {
        "new_key": None,
        "new_key_member": None,
        "message": None,
        "error": None,
        "member_form": None,
        "edit_form": None,
    }
    return page(
        request,
        "tenant.html",
        session,
        status_code=status_code,
        **{**defaults, **context},
        **_tenant_context(request, name),
    )


def _refused(request: Request, session: Session, name: str, exc: GtmError, **context: Any) -> HTMLResponse:
    """A form the service refused: the page again, with the message and what was typed."""
    return _tenant_page(request, session, name, status_code=exc.http_status, error=exc.message, **context)


def _done(
    request: Request,
    session: Session,
    name: str,
    message: str | None = None,
    new_key: keys.IssuedKey | None = None,
    member: str | None = None,
    anchor: str = "",
) -> Response:
    """A form that worked: redirect to the tenant page (post/redirect/get), which shows the message
    and a new key once; the key is kept in memory for that one read, never in the URL."""
    flashes: Flashes = request.app.state.flashes
    payload: dict[str, object] = {"message": message}
    if new_key is not None:
        payload.update(new_key=new_key, new_key_member=member)
    token = flashes.put(session.csrf, payload)  # this browser's session only
    return RedirectResponse(f"/tenants/{name}?shown={token}{anchor}", status_code=303)


@router.get("/tenants/{name}")
def tenant_page(request: Request, name: str, shown: str = "") -> HTMLResponse:
    session = current(request)
    flashes: Flashes = request.app.state.flashes
    flash: dict[str, Any] = flashes.pop(shown, session.csrf)
    return _tenant_page(request, session, name, **flash)


@router.post("/tenants/{name}/rotate")
@form_action
def rotate(request: Request, session: Session, form: dict[str, str], name: str) -> Response:
    try:
        issued = svc_of(request).rotate_key(name, session.user, _grace(form))
    except GtmError as exc:
        return _refused(request, session, name, exc)
    # the new key (the first member's) is shown once after the redirect; it is never stored or shown again
    return _done(request, session, name, new_key=issued, member=name)


@router.post("/tenants/{name}/members")
@form_action
def add_member(request: Request, session: Session, form: dict[str, str], name: str) -> Response:
    svc = svc_of(request)
    try:
        quotas = Quotas(**quota_values(form))
        row, issued = svc.members.add(name, form.get("member", "").strip(), quotas, session.user, weight_of(form))
    except GtmError as exc:
        return _refused(request, session, name, exc, member_form=form)
    return _done(request, session, name, f"Member {row.name} added.", issued, row.name, "#members")


@router.post("/tenants/{name}/members/{member}/rotate")
@form_action
def rotate_member(request: Request, session: Session, form: dict[str, str], name: str, member: str) -> Response:
    try:
        issued = svc_of(request).members.rotate_key(name, session.user, _grace(form), member)
    except GtmError as exc:
        return _refused(request, session, name, exc)
    return _done(request, session, name, new_key=issued, member=member, anchor="#members")


@router.post("/tenants/{name}/members/{member}/update")
@form_action
def update_member(request: Request, session: Session, form: dict[str, str], name: str, member: str) -> Response:
    """A member's limits, as ``update-member`` sets them: an empty field is no limit of its own."""
    try:
        quotas = quota_values(form)
        svc_of(request).members.update(name, member, quotas, session.user, weight_of(form))
    except GtmError as exc:
        return _refused(request, session, name, exc)
    return _done(request, session, name, f"Limits of member {member} saved; they apply at once.", anchor="#members")


@router.post("/tenants/{name}/members/{member}/remove")
@form_action
def remove_member(request: Request, session: Session, form: dict[str, str], name: str, member: str) -> Response:
    svc_of(request).members.remove(name, member, session.user)
    return RedirectResponse(f"/tenants/{name}", status_code=303)


@router.post("/tenants/{name}/keys/{key_id}/revoke")
@form_action
def revoke(request: Request, session: Session, form: dict[str, str], name: str, key_id: str) -> Response:
    svc_of(request).revoke_key(name, key_id, session.user)
    return RedirectResponse(f"/tenants/{name}", status_code=303)


@router.post("/tenants/{name}/update")
@form_action
def update(request: Request, session: Session, form: dict[str, str], name: str) -> Response:
    """Everything ``update-tenant`` changes, with its checks and messages (the same service call)."""
    svc = svc_of(request)
    try:
        changes = edit_changes(form, svc.tenant(name).spec)
        if not changes:
            raise InvalidInput("nothing to change: edit at least one field before saving")
        svc.update(name, session.user, **changes)
    except GtmError as exc:
        return _refused(request, session, name, exc, edit_form=form)
    message = (
        "Saved: the engine is recreated with the new spec (the tenant is pending until it serves)."
        if recreates_engine(changes)
        else "Saved: it applies at once, without restarting the engine."
    )
    return _done(request, session, name, message)


@router.post("/tenants/{name}/remove")
@form_action
def remove(request: Request, session: Session, form: dict[str, str], name: str) -> Response:
    if form.get("confirm") != name:
        return _tenant_page(request, session, name, error=f"Type the tenant's name ({name}) to confirm the removal.")
    svc_of(request).remove(name, session.user)
    return RedirectResponse("/", status_code=303)


@router.get("/console/what-if")
def what_if(
    request: Request, gpu_memory: str, model: str = "", max_model_len: str = "", tenant: str = ""
) -> JSONResponse:
    current(request)
    svc = svc_of(request)
    try:
        decision = svc.placer.assess(
            parse_size(gpu_memory),
            model or svc.settings.default_model,
            int(max_model_len) if max_model_len else svc.settings.default_max_model_len,
            tenant=tenant or None,
        )
    except (GtmError, ValueError) as exc:
        message = exc.message if isinstance(exc, GtmError) else str(exc)
        return JSONResponse({"admitted": False, "messages": [message]})
    return JSONResponse({"admitted": decision.admitted, "messages": list(decision.messages)})


# ---------------------------------------------------------------- usage, cost, audit
def _month_and_cost(month: str | None, cost: str | None) -> tuple[str, float]:
    month = month or datetime.now(UTC).strftime("%Y-%m")
    try:
        total = float(cost) if cost else 0.0
    except ValueError as exc:
        raise InvalidInput(f"cost must be a number, got {cost!r}") from exc
    return month, total


def _rate(asleep_rate: str | None) -> float | None:
    """The asleep rate from the form: empty is the default (what a sleeper keeps)."""
    try:
        return float(asleep_rate) if asleep_rate else None
    except ValueError as exc:
        raise InvalidInput(
            f"the asleep rate must be a number from 0 to 1 (a fraction of the awake rate), got {asleep_rate!r}"
        ) from exc


@router.get("/usage")
def usage_page(
    request: Request, month: str | None = None, cost: str | None = None, asleep_rate: str | None = None
) -> HTMLResponse:
    session = current(request)
    month, total = _month_and_cost(month, cost)
    svc = svc_of(request)
    rate = _rate(asleep_rate)
    shares = svc.cost(month, total, rate)
    return page(request, "usage.html", session, month=month, cost=total, asleep_rate=asleep_rate or "", shares=shares)


def _iso(at: float | None) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds") if at else ""


@router.get("/usage.csv")
def usage_csv(
    request: Request, month: str | None = None, cost: str | None = None, asleep_rate: str | None = None
) -> Response:
    current(request)
    month, total = _month_and_cost(month, cost)
    shares = svc_of(request).cost(month, total, _rate(asleep_rate))
    out = io.StringIO()
    writer = csv.writer(out)
    # one row per tenant (member empty), then one per member of it: the member's part of the
    # tenant's cost by memory, by its tokens and by its requests
    writer.writerow(
        [
            "tenant",
            "member",
            "gib_hours",
            "requests",
            "tokens",
            "share_by_memory",
            "cost_by_memory",
            "share_by_tokens",
            "cost_by_tokens",
            "member_share_by_tokens",
            "member_cost_by_tokens",
            "member_share_by_requests",
            "member_cost_by_requests",
            "added_at",
            "removed_at",
            "gib_hours_awake",
            "gib_hours_asleep",
        ]
    )
    for s in shares:
        writer.writerow(
            [
                s.tenant,
                "",
                s.gib_hours,
                s.requests,
                s.tokens,
                s.share_by_memory,
                s.cost_by_memory,
                s.share_by_tokens,
                s.cost_by_tokens,
                "",
                "",
                "",
                "",
                _iso(s.added_at),
                _iso(s.removed_at),
                s.gib_hours_awake,
                s.gib_hours_asleep,
            ]
        )
        for m in s.members:
            writer.writerow(
                [
                    s.tenant,
                    m.member,
                    "",
                    m.requests,
                    m.tokens,
                    "",
                    "",
                    "",
                    "",
                    m.share_by_tokens,
                    m.cost_by_tokens,
                    m.share_by_requests,
                    m.cost_by_requests,
                    _iso(s.added_at),
                    _iso(s.removed_at),
                    "",
                    "",
                ]
            )
    return Response(
        out.getvalue(),
        media_type="text/csv",
        headers={"content-disposition": f'attachment; filename="cost-{month}.csv"'},
    )


AUDIT_PAGE = 50


@router.get("/audit")
def audit_page(request: Request, tenant: str = "", action: str = "", before: int | None = None) -> HTMLResponse:
    """The audit trail, newest first, a page at a time ("Older" follows the last id shown)."""
    session = current(request)
    svc = svc_of(request)
    rows = svc.audit_log(tenant or None, action or None, AUDIT_PAGE + 1, before)
    older = rows[AUDIT_PAGE - 1].id if len(rows) > AUDIT_PAGE else None
    return page(
        request,
        "audit.html",
        session,
        rows=rows[:AUDIT_PAGE],
        tenant=tenant,
        action=action,
        actions=svc.audit_actions(),
        older=older,
        paged=before is not None,
        detail_text=detail_text,
    )
