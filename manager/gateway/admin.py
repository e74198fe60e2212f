"""The admin side of a gateway, reachable only on the control network (never
published on the host): config push from the manager, usage by cursor, activity (for the
manager's sleeper), the engine's sleep mode (for the manager's reconciler), metrics.

The engine's sleep endpoints (vLLM's dev-mode ``/sleep``, ``/wake_up``, ``/is_sleeping``) are
reached only from here: the tenant's port forwards an allowlist of OpenAI paths, never these."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import Response
from prometheus_client import generate_latest

from manager.contract import (
    ENGINE_SLEEP_LEVEL,
    EngineSleep,
    GatewayActivity,
    GatewayConfig,
    GatewayStatus,
    MemberConfig,
    UsagePage,
)
from manager.gateway.state import GatewayState


def auth(request: Request, authorization: Annotated[str, Header()] = "") -> None:
    token: str = request.app.state.admin_token
    presented = authorization.removeprefix("Bearer ").strip()
    if not token or not hmac.compare_digest(presented.encode(), token.encode()):
        raise HTTPException(401, "wrong gateway admin token")


Auth = Annotated[None, Depends(auth)]


ENGINE_SLEEP_TIMEOUT_S = 300.0
"""A level-1 sleep copies the weights to host memory, a wake copies them back: seconds, more for
tens of GB."""


def warm_up(on_engine: Callable[..., httpx.Response]) -> None:
    """One token from the engine's own model (its name read from ``/v1/models``)."""
    models = on_engine("GET", "/v1/models").json()
    model = models["data"][0]["id"] if isinstance(models, dict) and models.get("data") else None
    if model:
        body = {"model": model, "prompt": "warm", "max_tokens": 1}
        on_engine("POST", "/v1/completions", json=body, timeout=ENGINE_SLEEP_TIMEOUT_S)


def create_admin_app(state: GatewayState, token: str, engine: httpx.Client | None = None) -> FastAPI:
    """``engine``: a client of the tenant's engine (its base URL), for its sleep mode."""
    app = FastAPI(title="gpu-tenant-manager gateway admin", docs_url=None, redoc_url=None)
    app.state.admin_token = token

    def on_engine(method: str, path: str, **kwargs: object) -> httpx.Response:
        """The handlers are plain functions: FastAPI runs them on its threads, never on the loop."""
        if engine is None:
            raise HTTPException(501, "this gateway has no engine to reach")
        try:
            answer = engine.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise HTTPException(502, f"the engine did not answer {method} {path}: {exc}") from exc
        if answer.status_code == 404:
            raise HTTPException(
                502,
                f"the engine has no {path}: it was started without sleep mode (--enable-sleep-mode and "
                "VLLM_SERVER_DEV_MODE=1)",
            )
        if answer.status_code >= 400:
            raise HTTPException(
                502, f"the engine answered {method} {path} with {answer.status_code}: {answer.text[:300]}"
            )
        return answer

    def sleeping() -> EngineSleep:
        body = on_engine("GET", "/is_sleeping").json()
        return EngineSleep(sleeping=bool(body.get("is_sleeping")) if isinstance(body, dict) else False)

    @app.get("/admin/engine/sleeping")
    def engine_sleeping(_: Auth) -> EngineSleep:
        return sleeping()

    @app.post("/admin/engine/sleep")
    def engine_sleep(_: Auth) -> EngineSleep:
        """vLLM's sleep mode, level 1: the weights go to host memory, the KV cache is freed; the
        process, and its CUDA context, stay."""
        on_engine("POST", "/sleep", params={"level": str(ENGINE_SLEEP_LEVEL)}, timeout=ENGINE_SLEEP_TIMEOUT_S)
        return sleeping()

    @app.post("/admin/engine/wake")
    def engine_wake(_: Auth) -> EngineSleep:
        """Wakes the engine, then has it write one token: sleep emptied its activation cache, which
        would otherwise grow back under the next engine's start on the device (the manager holds
        the device's start gate until this answers), and the tenant's first request would pay for
        it. The warm-up is the manager's, not the tenant's: it is not metered."""
        on_engine("POST", "/wake_up", timeout=ENGINE_SLEEP_TIMEOUT_S)
        now = sleeping()
        if not now.sleeping:
            warm_up(on_engine)
        return now

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "config_version": state.version}

    @app.get("/admin/config")
    def get_config(_: Auth) -> GatewayStatus:
        return GatewayStatus(
            version=state.version,
            key_ids=sorted(state.keys),
            limits=state.quotas.limits,
            members=[MemberConfig(name=n, limits=m.limits) for n, m in sorted(state.members.items())],
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
            waiting_since=state.hold.waiting_since,
        )

    @app.get("/admin/usage")
    def usage(_: Auth, after: int = Query(0, ge=0), limit: int = Query(1000, ge=1, le=10000)) -> UsagePage:
        return state.store.after(after, limit)

    @app.get("/metrics")
    def metrics(_: Auth) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type="text/plain; version=0.0.4")

    return app
