"""Dependencies of the routes: the tenant service and the admin-token check, both put in the
app's state by the composition root (``manager.wiring``)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from manager.control.service import TenantService
from manager.errors import Unauthorized

_bearer = HTTPBearer(auto_error=False)


def require_admin(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The actor name for the audit trail; 401 without the admin token."""
    token: str = request.app.state.admin_token
    if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
        raise Unauthorized(
            "missing or wrong admin token: send 'Authorization: Bearer <token>' "
            "(the token is GTM_ADMIN_TOKEN or the file admin-token in the state dir)"
        )
    return "admin"


def service(request: Request) -> TenantService:
    """The tenant service the composition root (``manager.wiring``) put in the app's state."""
    svc: TenantService = request.app.state.service
    return svc


Admin = Annotated[str, Depends(require_admin)]
Service = Annotated[TenantService, Depends(service)]
