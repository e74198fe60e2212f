"""The composition root: where the manager is put together, and the only module that knows
every room. It builds the control plane (store, runtime, inventory, reconciler, tenant service)
from the settings, and the one FastAPI application that serves its two faces: the admin API
(``manager.api``) and the console (``manager.console``), which import neither each other nor
the store; it gives them the tenant service and the admin token through the app's state. Also
here: the errors' one JSON-or-page answer, /healthz and /metrics, the admin token's file, and
``serve`` (what ``manager serve`` runs).

    cli -> wiring -> api | console -> control -> runtime | gpu -> shared modules
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from manager import __version__, names
from manager.api.deps import Admin
from manager.api.docs import DOCS_PATHS, add_docs
from manager.api.metrics import Metrics
from manager.api.routes import error_responses, router
from manager.console.routes import LoginRequired
from manager.console.routes import router as console_router
from manager.console.session import COOKIE, Flashes, LoginLimiter, Sessions
from manager.control.drains import SpoolDrainer
from manager.control.gateway_client import Connect, GatewayClient
from manager.control.plan import control_network_plan, node_agent_plan
from manager.control.reconciler import Reconciler
from manager.control.service import TenantService
from manager.control.sqlite_store import SqliteStore, preflight
from manager.control.store import TenantStore
from manager.errors import AdmissionRefused, GtmError
from manager.gpu import Inventory, open_inventory
from manager.gpu.nodes import NodesInventory
from manager.runtime.docker import DockerRuntime
from manager.runtime.nodes import AgentReader
from manager.runtime.protocol import Runtime
from manager.runtime.swarm import SwarmRuntime
from manager.settings import Settings

log = logging.getLogger(__name__)
API_PATHS = ("/api/", "/metrics", "/healthz", "/console/", *DOCS_PATHS, "/openapi.json", "/static/")
CONSOLE_HEADERS = {
    # every asset is served by the manager itself; inline style attributes carry the capacity bars' widths
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "style-src-attr 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
}


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) + " (see the API's schema at /docs)"


@dataclass
class Components:
    """The control plane, built once per manager process."""

    store: TenantStore
    inventory: Inventory
    reconciler: Reconciler
    service: TenantService
    admin_token: str


def admin_token_file(settings: Settings) -> Path:
    return settings.state_dir / "admin-token"


def load_admin_token(settings: Settings) -> str:
    """GTM_ADMIN_TOKEN, else the token saved in the state dir, else a new one saved there (0600).

    The CLI inside the manager container reads the same file, so `docker exec
    manager add-tenant ...` needs no token on the command line.
    """
    return _load_token(settings.admin_token, admin_token_file(settings))


def load_agent_token(settings: Settings) -> str:
    """GTM_AGENT_TOKEN, else the one saved in the state dir, else a new one saved there (0600):
    what the manager gives its node agents and presents to them."""
    return _load_token(settings.agent_token, settings.state_dir / "agent-token")


def _load_token(given: SecretStr | None, path: Path) -> str:
    if given is not None:
        return given.get_secret_value()
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def build_components(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    inventory: Inventory | None = None,
    connect: Connect | None = None,
) -> Components:
    """The control plane; ``runtime``, ``inventory`` and ``connect`` (the gateways' admin
    client) replace the real ones in tests."""
    swarm = open_swarm(settings) if settings.runtime == "swarm" and runtime is None else None
    if swarm is not None:
        runtime, agents = swarm
        inventory = inventory or NodesInventory(agents, runtime.node_addresses)
    inventory = inventory or open_inventory(settings.platform)
    runtime = runtime or DockerRuntime()
    store = SqliteStore(settings.database_path)
    reconciler = Reconciler(settings, store, runtime, inventory, connect=connect or GatewayClient)
    if swarm is not None:
        swarm_runtime, agents = swarm
        reconciler.drainer = SpoolDrainer(
            settings,
            store,
            swarm_runtime,
            inventory,
            agents,
            swarm_runtime.node_addresses,
            agents.remove_volume,
            reconciler.tenant_turn,
        )
    service = TenantService(settings, store, runtime, inventory, reconciler)
    return Components(store, inventory, reconciler, service, load_admin_token(settings))


def open_swarm(settings: Settings) -> tuple[SwarmRuntime, AgentReader]:
    """The swarm's runtime and the reader of the node agents, which it starts on every node (a
    global service on the control overlay, replaced when the manager's image or the agents' token
    changes). The manager must run on that overlay to reach them."""
    token = load_agent_token(settings)
    runtime = SwarmRuntime()
    agents = names.node_agent(settings.instance)
    control = control_network_plan(settings)
    reader = AgentReader(lambda: runtime.task_addresses(agents, control.name), token, settings.agent_port)
    runtime.reports = reader
    runtime.ensure_network(control)
    runtime.run_everywhere(node_agent_plan(settings, token, runtime.image_id(settings.manager_image) or ""))
    return runtime, reader


def create_app(settings: Settings, **overrides: Any) -> FastAPI:
    """The manager's app: the admin API, the console and /metrics; its parts (store, runtime,
    reconciler, ...) are built when it starts (``overrides``: parts the tests bring)."""
    app = FastAPI(
        title="gpu-tenant-manager",
        version=__version__,
        lifespan=_lifespan(settings, overrides),
        description="Admin API: tenants, API keys, capacity, admission what-if, audit trail.",
        docs_url=None,
        redoc_url=None,
    )
    add_docs(app)
    app.include_router(router)
    app.include_router(console_router)
    _add_console(app, settings)
    _add_error_handlers(app)
    _add_health(app)
    return app


def _lifespan(settings: Settings, overrides: dict[str, Any]) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        components = build_components(settings, **overrides)
        app.state.service = components.service
        app.state.admin_token = components.admin_token
        app.state.metrics = Metrics(components.service, components.reconciler, components.inventory)
        app.state.sessions = Sessions(components.admin_token)
        password = settings.console_password.get_secret_value() if settings.console_password else None
        # without GTM_CONSOLE_PASSWORD the admin token is the console password: never a default one
        app.state.console_credentials = (settings.console_user, password or components.admin_token)
        # the schema is built once, before the first visit to /docs asks for it
        await asyncio.to_thread(app.openapi)
        components.reconciler.start()
        try:
            yield
        finally:
            components.reconciler.stop()
            components.store.close()
            components.inventory.close()

    return lifespan


def _add_console(app: FastAPI, settings: Settings) -> None:
    """The console's templates, static files, login limits, one-time messages and headers."""
    templates_dir = settings.effective_templates_dir
    app.state.templates = Jinja2Templates(directory=templates_dir)
    app.state.templates.env.filters["timestamp"] = lambda ts: time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))
    app.state.login_limiter = LoginLimiter()
    app.state.flashes = Flashes()
    app.mount("/static", StaticFiles(directory=templates_dir / "static"), name="static")

    @app.middleware("http")
    async def console_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        if not request.url.path.startswith(("/api/", *DOCS_PATHS, "/openapi.json", "/metrics", "/healthz")):
            response.headers.update(CONSOLE_HEADERS)
        return response


def _error_page(request: Request, error: GtmError, status: int) -> Response:
    """An error as a console page; a signed-in admin keeps the navigation (on a 404 too)."""
    session = request.app.state.sessions.read(request.cookies.get(COOKIE))
    page: Response = request.app.state.templates.TemplateResponse(
        request, "error.html", {"session": session, "error": error, "now": 0}, status_code=status
    )
    return page


async def gtm_error(request: Request, exc: Exception, status: int | None = None) -> Response:
    """One handler: JSON for the API, a readable page for the console."""
    assert isinstance(exc, GtmError)
    if isinstance(exc, AdmissionRefused):
        for check in exc.details.get("failed_checks", []):
            request.app.state.metrics.refusals.labels(check).inc()
    if request.url.path.startswith(API_PATHS):
        return JSONResponse({"error": exc.to_dict()}, status_code=status or exc.http_status)
    return _error_page(request, exc, status or exc.http_status)


async def invalid_request(request: Request, exc: Exception) -> Response:
    """Bodies and parameters that do not validate: the API's one error shape, 400 for a body
    that is not JSON at all, 422 otherwise."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    not_json = any(e.get("type") == "json_invalid" for e in errors)
    error = GtmError(
        ("the request body is not valid JSON: " if not_json else "invalid input: ") + _validation_message(errors),
        details={"errors": jsonable_encoder(errors)},
    )
    error.code = "invalid_json" if not_json else "invalid_input"
    return await gtm_error(request, error, status=400 if not_json else 422)


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own errors (unknown path, wrong method, unparseable body): the same JSON/page split."""
    assert isinstance(exc, StarletteHTTPException)
    error = GtmError(f"{exc.detail} ({request.method} {request.url.path})")
    if request.url.path.startswith(API_PATHS):
        error.code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return JSONResponse({"error": error.to_dict()}, status_code=exc.status_code, headers=exc.headers)
    return _error_page(request, error, exc.status_code)


async def login_required(request: Request, exc: Exception) -> Response:
    return RedirectResponse("/login", status_code=303)


def _add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GtmError, gtm_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(LoginRequired, login_required)


def _add_health(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["health"],
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"},
            **error_responses(401, 503),
        },
    )
    def metrics(request: Request, _: Admin) -> Response:
        return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


def serve(settings: Settings) -> int:
    """The manager: its store checked first (a clear error before anything starts, never a
    half-started manager), then the app on the API port."""
    import uvicorn

    preflight(settings.database_path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="info")
    return 0
