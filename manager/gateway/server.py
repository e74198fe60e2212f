"""Runs a gateway: the public proxy and the admin app on one event loop."""

from __future__ import annotations

import asyncio
import logging

import httpx
import uvicorn

from manager.gateway.admin import create_admin_app
from manager.gateway.http import protocol_for
from manager.gateway.proxy import Proxy
from manager.gateway.settings import GatewaySettings
from manager.gateway.state import GatewayState
from manager.gateway.store import SPOOL_FILE, GatewayStore


async def serve(settings: GatewaySettings, engine: httpx.Client | None = None) -> None:
    """``engine``: a client of the engine for the admin app's sleep-mode calls (they run on its threads)."""
    state = GatewayState(GatewayStore(settings.data_dir / SPOOL_FILE))
    proxy = Proxy(settings, state)
    admin = create_admin_app(state, settings.admin_token.get_secret_value(), engine)
    public = uvicorn.Server(
        uvicorn.Config(
            proxy,
            host=settings.host,
            port=settings.public_port,
            log_level="warning",
            access_log=False,
            loop="uvloop",
            http=protocol_for(settings),
            proxy_headers=False,
            limit_concurrency=settings.max_connections,
        )
    )
    private = uvicorn.Server(
        uvicorn.Config(
            admin, host=settings.host, port=settings.admin_port, log_level="warning", access_log=False, loop="uvloop"
        )
    )
    try:
        await asyncio.gather(public.serve(), private.serve())
    finally:
        state.store.close()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore"):  # a line per forwarded request would cost more than the proxying
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = GatewaySettings()
    import uvloop

    with httpx.Client(base_url=settings.upstream, timeout=30.0) as engine:
        uvloop.run(serve(settings, engine))
    return 0
