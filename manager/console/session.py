"""Signed session cookies and CSRF tokens, with nothing stored server-side.

The cookie holds ``user|expires|csrf`` and an HMAC-SHA256 over it; the CSRF token
of a session must come back in every form post.

Failed logins are limited per *bucket*, so that an attacker slows only themself
(OWASP's "device cookie" pattern): a browser that has logged in before carries a
signed device cookie and has a bucket of its own; every other client shares the
bucket of its address. Locally every client arrives from the Docker bridge's
address, so without device cookies one person guessing would lock everyone out.
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
DEVICE_COOKIE = "gtm_device"
DEVICE_LIFETIME_S = 365 * 86400


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

    def issue_device(self) -> str:
        """A new device cookie for a browser that just logged in."""
        device = secrets.token_urlsafe(12)
        return f"{device}.{self._sign('device|' + device)}"

    def device(self, cookie: str | None) -> str | None:
        """The device id of a genuine device cookie, else None."""
        if not cookie or "." not in cookie:
            return None
        device, signature = cookie.rsplit(".", 1)
        return device if hmac.compare_digest(signature, self._sign("device|" + device)) else None


def login_bucket(device: str | None, client: str) -> str:
    return f"device:{device}" if device else f"client:{client}"


class LoginLimiter:
    """At most ``attempts`` failed logins per bucket per ``window_s``; while a bucket is
    blocked its attempts are not even checked. A success clears the bucket."""

    MAX_BUCKETS = 10_000

    def __init__(self, attempts: int = 5, window_s: float = 60.0) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, bucket: str, now: float | None = None) -> float:
        """Seconds until the bucket may try again (0: now)."""
        now = time.time() if now is None else now
        q = self._failures.get(bucket)
        while q and q[0] <= now - self.window_s:
            q.popleft()
        if q and len(q) >= self.attempts:
            return q[0] + self.window_s - now
        if q is not None and not q:
            del self._failures[bucket]
        return 0.0

    def failed(self, bucket: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if len(self._failures) >= self.MAX_BUCKETS and bucket not in self._failures:
            for key in [k for k, q in self._failures.items() if not q or q[-1] <= now - self.window_s]:
                del self._failures[key]
        self._failures.setdefault(bucket, deque()).append(now)

    def succeeded(self, bucket: str) -> None:
        self._failures.pop(bucket, None)


class Flashes:
    """What a form post shows once after its redirect (post/redirect/get): a message, or a new API
    key. Kept in memory only, for one session (its CSRF token names it), read at most once and for
    ``ttl_s`` at most, so a key never sits in a URL, a cookie or the database, and a reload or the
    back button shows nothing."""

    MAX = 1000

    def __init__(self, ttl_s: float = 120.0) -> None:
        self.ttl_s = ttl_s
        self._items: dict[str, tuple[str, float, dict[str, object]]] = {}

    def put(self, owner: str, payload: dict[str, object], now: float | None = None) -> str:
        now = time.time() if now is None else now
        for token in [t for t, (_, at, _) in self._items.items() if at <= now - self.ttl_s]:
            del self._items[token]
        while len(self._items) >= self.MAX:
            del self._items[next(iter(self._items))]
        token = secrets.token_urlsafe(16)
        self._items[token] = (owner, now, payload)
        return token

    def pop(self, token: str | None, owner: str, now: float | None = None) -> dict[str, object]:
        """The payload under ``token`` for ``owner`` (then gone), else nothing."""
        if not token or token not in self._items:
            return {}
        put_by, at, payload = self._items[token]
        if put_by != owner:
            return {}
        del self._items[token]
        return payload if at > (time.time() if now is None else now) - self.ttl_s else {}
