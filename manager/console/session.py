"""Signed session cookies and CSRF tokens, with nothing stored server-side.

The cookie holds ``user|expires|csrf`` and an HMAC-SHA256 over it; the CSRF token
of a session must come back in every form post. Failed logins are limited per
client address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass

COOKIE = "gtm_session"
LIFETIME_S = 12 * 3600


@dataclass(frozen=True)
class Session:
    user: str
    expires: float
    csrf: str


class Sessions:
    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"gtm-console|" + secret.encode()).digest()

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, user: str, now: float | None = None) -> tuple[str, Session]:
        session = Session(user, (time.time() if now is None else now) + LIFETIME_S, secrets.token_urlsafe(24))
        payload = f"{session.user}|{session.expires:.0f}|{session.csrf}"
        raw = base64.urlsafe_b64encode(payload.encode()).decode()
        return f"{raw}.{self._sign(payload)}", session

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        if not cookie or "." not in cookie:
            return None
        raw, signature = cookie.rsplit(".", 1)
        try:
            payload = base64.urlsafe_b64decode(raw.encode()).decode()
            user, expires, csrf = payload.split("|")
        except (ValueError, UnicodeDecodeError):
            return None
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        if float(expires) < (time.time() if now is None else now):
            return None
        return Session(user, float(expires), csrf)


class LoginLimiter:
    """At most ``attempts`` failed logins per client per ``window_s``."""

    def __init__(self, attempts: int = 5, window_s: float = 60.0) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, client: str, now: float | None = None) -> float:
        """Seconds until the client may try again (0: now)."""
        now = time.time() if now is None else now
        q = self._failures.get(client)
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if q and len(q) >= self.attempts:
            return q[0] + self.window_s - now
        return 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        self._failures.setdefault(client, deque()).append(time.time() if now is None else now)
