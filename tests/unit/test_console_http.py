"""The console's doors over HTTP (the in-memory runtime behind the real app): security
headers on every page, and a login lockout that stops the one guessing, not the admin."""

from __future__ import annotations

import httpx

from manager.console.session import DEVICE_COOKIE

from .conftest import TOKEN


def login(client: httpx.Client, password: str) -> httpx.Response:
    return client.post("/login", data={"username": "admin", "password": password})


def test_pages_carry_security_headers(base_url: str) -> None:
    r = httpx.get(f"{base_url}/login")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp.replace("style-src-attr 'unsafe-inline'", "")
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "same-origin"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" in httpx.get(f"{base_url}/static/console.css").headers


def test_a_guesser_is_locked_out_with_429_but_a_known_browser_logs_in(base_url: str) -> None:
    with httpx.Client(base_url=base_url) as admin, httpx.Client(base_url=base_url) as guesser:
        # the admin's browser logged in before: it holds a device cookie from then on
        first = login(admin, TOKEN)
        assert first.status_code == 303 and DEVICE_COOKIE in admin.cookies
        admin.cookies.delete("gtm_session")

        for _ in range(5):
            assert login(guesser, "wrong").status_code == 401
        locked = login(guesser, TOKEN)  # even the right password waits: the bucket is blocked
        assert locked.status_code == 429
        assert 1 <= int(locked.headers["retry-after"]) <= 61
        assert "Too many failed logins" in locked.text

        # same address, other bucket: the admin is not locked out by the guesser
        again = login(admin, TOKEN)
        assert again.status_code == 303
        assert again.headers["location"] == "/"


def test_a_forged_device_cookie_is_the_guessers_bucket(base_url: str) -> None:
    with httpx.Client(base_url=base_url, cookies={DEVICE_COOKIE: "made-up.0000"}) as forger:
        for _ in range(5):
            login(forger, "wrong")
        assert login(forger, TOKEN).status_code == 429
