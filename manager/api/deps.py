"""Dependencies of the routes: the wired components and the admin-token check."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from manager.control.service import TenantService
from manager.errors import Unauthorized
from manager.settings import Settings


@dataclass
class Components:
    settings: Settings
    service: TenantService
    admin_token: str


def admin_token_file(settings: Settings) -> Path:
    return settings.state_dir / "admin-token"


def load_admin_token(settings: Settings) -> str:
    """GTM_ADMIN_TOKEN, else the token saved in the state dir, else a new one saved there (0600).

    The CLI inside the manager container reads the same file, so `docker exec
    manager add-tenant ...` needs no token on the command line.
    """
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = admin_token_file(settings)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def components(request: Request) -> Components:
    c: Components = request.app.state.components
    return c


_bearer = HTTPBearer(auto_error=False)


def require_admin(
    c: Annotated[Components, Depends(components)],
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The actor name for the audit trail; 401 without the admin token."""
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), c.admin_token.encode()):
        raise Unauthorized(
            "missing or wrong admin token: send 'Authorization: Bearer <token>' "
            "(the token is GTM_ADMIN_TOKEN or the file admin-token in the state dir)"
        )
    return "admin"


def service(c: Annotated[Components, Depends(components)]) -> TenantService:
    return c.service


Admin = Annotated[str, Depends(require_admin)]
Service = Annotated[TenantService, Depends(service)]
