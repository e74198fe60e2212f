"""The admin side of a gateway, reachable only on the control network (never
published on the host): config push from the manager, usage by cursor, activity (for the
manager's sleeper), metrics."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import Response
from prometheus_client import generate_latest

from manager.contract import GatewayActivity, GatewayConfig, GatewayStatus, Limits, MemberConfig, UsagePage
from manager.gateway.state import GatewayState


def auth(request: Request, authorization: Annotated[str, Header()] = "") -> None:
    token: str = request.app.state.admin_token
    presented = authorization.removeprefix("Bearer ").strip()
    if not token or not hmac.compare_digest(presented.encode(), token.encode()):
        raise HTTPException(401, "wrong gateway admin token")


Auth = Annotated[None, Depends(auth)]


def create_admin_app(state: GatewayState, token: str) -> FastAPI:
    app = FastAPI(title="gpu-tenant-manager gateway admin", docs_url=None, redoc_url=None)
    app.state.admin_token = token

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "config_version": state.version}

    @app.get("/admin/config")
    def get_config(_: Auth) -> GatewayStatus:
        return GatewayStatus(
            version=state.version,
            key_ids=sorted(state.keys),
            limits=Limits.of(state.quotas.limits),
            members=[MemberConfig(name=n, limits=Limits.of(m.limits)) for n, m in sorted(state.members.items())],
        )

    @app.put("/admin/config")
    def put_config(body: GatewayConfig, _: Auth) -> dict[str, str]:
        state.apply(body)
        return {"version": state.version}

    @app.get("/admin/activity")
    def activity(_: Auth) -> GatewayActivity:
        return GatewayActivity(
            last_request_at=state.last_request_at,
            in_flight=state.quotas.in_flight,
            waiting=state.hold.waiting,
            hold=state.hold.on,
        )

    @app.get("/admin/usage")
    def usage(_: Auth, after: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=10000)) -> UsagePage:
        return state.store.after(after, limit)

    @app.get("/metrics")
    def metrics(_: Auth) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type="text/plain; version=0.0.4")

    return app
