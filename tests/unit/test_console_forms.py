"""The console's forms over HTTP (the in-memory runtime behind the real app): the tenant page
changes what update-tenant changes, members are added and limited, and every successful form
redirects (post/redirect/get) so that a reload never posts again and a new key shows once."""

from __future__ import annotations

import contextlib
import re

import httpx

from .conftest import TOKEN


def login(client: httpx.Client, password: str) -> httpx.Response:
    return client.post("/login", data={"username": "admin", "password": password})


def _signed_in(base_url: str) -> httpx.Client:
    client = httpx.Client(base_url=base_url)
    assert login(client, TOKEN).status_code == 303
    return client


def _form_of(html: str, action: str) -> dict[str, str]:
    """The named fields of the form posting to ``action``, with the values the page put in them."""
    form = html[html.index(f'action="{action}"') :]
    form = form[: form.index("</form>")]
    fields = dict(re.findall(r'<input name="(\w+)"[^>]*?value="([^"]*)"', form))
    fields["csrf"] = re.findall(r'name="csrf" value="([^"]+)"', form)[0]
    for name, options in re.findall(r'<select name="(\w+)">(.*?)</select>', form, re.S):
        fields[name] = re.findall(r'<option value="(\w+)" selected', options)[0]
    return fields


def add_tenant(base_url: str, name: str, port: int) -> dict[str, str]:
    """A tenant added through the admin API; the admin's auth header."""
    admin = {"Authorization": f"Bearer {TOKEN}"}
    created = httpx.post(
        f"{base_url}/api/v1/tenants", headers=admin, json={"name": name, "port": port, "gpu_memory": "1536M"}
    )
    assert created.status_code == 201, created.text
    return admin


def test_the_tenant_page_changes_what_update_tenant_changes(base_url: str) -> None:
    admin = add_tenant(base_url, "edit-me", 30601)
    console = _signed_in(base_url)
    with contextlib.closing(console):
        form = _form_of(console.get("/tenants/edit-me").text, "/tenants/edit-me/update")
        assert form["gpu_memory"] == "1536M" and form["port"] == "30601" and form["enable_prefix_caching"] == "on"

        # saved untouched: nothing changes, and the page says so
        same = console.post("/tenants/edit-me/update", data=form)
        assert same.status_code == 422 and "nothing to change" in same.text

        # a bad value: the service's own message, what was typed kept, nothing saved
        bad = console.post("/tenants/edit-me/update", data={**form, "gpu_memory": "-1G", "rpm_limit": "7"})
        assert bad.status_code == 422 and "size must be positive" in bad.text and 'value="-1G"' in bad.text
        assert httpx.get(f"{base_url}/api/v1/tenants/edit-me", headers=admin).json()["quotas"]["rpm_limit"] is None

        # port, a quota and an engine option at once; then the redirect shows the message once
        saved = console.post(
            "/tenants/edit-me/update",
            data={**form, "port": "30602", "rpm_limit": "7", "enable_prefix_caching": "off"},
        )
        assert saved.status_code == 303 and saved.headers["location"].startswith("/tenants/edit-me?shown=")
        shown = console.get(saved.headers["location"])
        assert "the engine is recreated" in shown.text
        assert "the engine is recreated" not in console.get(saved.headers["location"]).text  # once
        tenant = httpx.get(f"{base_url}/api/v1/tenants/edit-me", headers=admin).json()
        assert (tenant["port"], tenant["quotas"]["rpm_limit"], tenant["enable_prefix_caching"]) == (30602, 7, False)
        audit = httpx.get(f"{base_url}/api/v1/audit", headers=admin, params={"tenant": "edit-me"}).json()
        assert audit[0]["action"] == "update-tenant" and audit[0]["actor"] == "admin"


def test_the_tenant_page_sets_and_shows_sleeping_when_idle(base_url: str) -> None:
    admin = add_tenant(base_url, "sleepy", 30621)
    console = _signed_in(base_url)
    with contextlib.closing(console):
        page = console.get("/tenants/sleepy").text
        assert re.search(r'data-testid="sleep">\s*never', page)
        form = _form_of(page, "/tenants/sleepy/update")
        assert form["idle_sleep_s"] == ""
        saved = console.post("/tenants/sleepy/update", data={**form, "idle_sleep_s": "600"})
        assert saved.status_code == 303
        assert "without restarting the engine" in console.get(saved.headers["location"]).text
        tenant = httpx.get(f"{base_url}/api/v1/tenants/sleepy", headers=admin).json()
        assert tenant["idle_sleep_s"] == 600
        page = console.get("/tenants/sleepy").text
        assert "after 600 s without a request" in page
        form = _form_of(page, "/tenants/sleepy/update")
        assert form["idle_sleep_s"] == "600"
        too_short = console.post("/tenants/sleepy/update", data={**form, "idle_sleep_s": "2"})
        assert too_short.status_code == 422 and "idle sleep must be between 5 s" in too_short.text
        assert console.post("/tenants/sleepy/update", data={**form, "idle_sleep_s": ""}).status_code == 303
        assert httpx.get(f"{base_url}/api/v1/tenants/sleepy", headers=admin).json()["idle_sleep_s"] is None
        # always on: never put to sleep; with --idle-sleep it is refused with the way out
        form = _form_of(console.get("/tenants/sleepy").text, "/tenants/sleepy/update")
        assert form["always_on"] == "off"
        both = console.post("/tenants/sleepy/update", data={**form, "always_on": "on", "idle_sleep_s": "600"})
        assert both.status_code == 422 and "always on never sleeps" in both.text
        assert console.post("/tenants/sleepy/update", data={**form, "always_on": "on"}).status_code == 303
        assert httpx.get(f"{base_url}/api/v1/tenants/sleepy", headers=admin).json()["always_on"] is True
        assert re.search(r'data-testid="sleep">\s*never: always on', console.get("/tenants/sleepy").text)


def test_members_are_added_and_limited_with_post_redirect_get(base_url: str) -> None:
    admin = add_tenant(base_url, "team-prg", 30611)
    console = _signed_in(base_url)
    with contextlib.closing(console):
        form = _form_of(console.get("/tenants/team-prg").text, "/tenants/team-prg/members")
        added = console.post("/tenants/team-prg/members", data={**form, "member": "carol", "tokens_per_day": "900"})
        assert added.status_code == 303, added.text
        assert added.headers["location"].startswith("/tenants/team-prg?shown=")
        other = httpx.Client(base_url=base_url)  # another signed-in browser cannot read this one's key
        assert login(other, TOKEN).status_code == 303
        assert "new-key" not in other.get(added.headers["location"]).text
        page = console.get(added.headers["location"]).text
        key = re.findall(r'data-testid="new-key">([^<]+)<', page)[0]
        assert key.startswith("gtm_") and "Member carol added." in page
        again = console.get(added.headers["location"]).text  # reload, back button: the key is gone
        assert key not in again and "Member carol added." not in again

        limits = _form_of(again, "/tenants/team-prg/members/carol/update")
        assert limits["tokens_per_day"] == "900"
        saved = console.post("/tenants/team-prg/members/carol/update", data={**limits, "rpm_limit": "3"})
        assert saved.status_code == 303
        assert "Limits of member carol saved" in console.get(saved.headers["location"]).text
        (carol,) = [
            m
            for m in httpx.get(f"{base_url}/api/v1/tenants/team-prg/members", headers=admin).json()
            if m["name"] == "carol"
        ]
        assert (carol["quotas"]["rpm_limit"], carol["quotas"]["tokens_per_day"]) == (3, 900)
        lifted = console.post("/tenants/team-prg/members/carol/update", data={**limits, "tokens_per_day": ""})
        assert lifted.status_code == 303
        refused = console.post("/tenants/team-prg/members/carol/update", data={**limits, "rpm_limit": "-5"})
        assert refused.status_code == 422 and "rpm limit" in refused.text.lower()
        other.close()


def test_the_tenant_page_shows_its_volume_and_a_host_that_cannot_encrypt_says_why(base_url: str) -> None:
    add_tenant(base_url, "vault-me", 30641)
    console = _signed_in(base_url)
    with contextlib.closing(console):
        page = console.get("/tenants/vault-me").text
        assert re.search(r'data-testid="volume">plain Docker volume<', page)
        form = _form_of(page, "/tenants/vault-me/update")
        assert form["volume"] == "plain"
        refused = console.post("/tenants/vault-me/update", data={**form, "volume": "encrypted:/data"})
        assert refused.status_code == 409, refused.text
        assert (
            "cannot have an encrypted volume on this host" in refused.text and 'value="encrypted:/data"' in refused.text
        )
        wrong = console.post("/tenants/vault-me/update", data={**form, "volume": "encrypted:/srv"})
        assert wrong.status_code == 422 and "the engine&#39;s volume is /data either way" in wrong.text
