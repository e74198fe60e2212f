"""The web console in a real browser (Debian's headless Chromium driven by Playwright),
against the real manager with its real database and the real Docker engine."""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import RunningManager, start_manager, wait_for, wait_status

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
def manager(manager_settings) -> Iterator[RunningManager]:
    mgr = start_manager(manager_settings(usage_interval_s=2.0))
    yield mgr
    mgr.stop()


@pytest.mark.slow
def test_console_in_a_real_browser(manager: RunningManager) -> None:
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    base = manager.url
    seen: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.on("request", lambda request: seen.append(request.url))
        failed: list[str] = []  # requests the browser saw fail (the server's side of a flake)
        page.on("requestfailed", lambda request: failed.append(f"{request.url}: {request.failure}"))
        blocked: list[str] = []  # the Content-Security-Policy must not break any page
        page.on("console", lambda msg: blocked.append(msg.text) if "Content Security Policy" in msg.text else None)

        # without a session every page leads to the login
        page.goto(base + "/tenants/new")
        assert page.url == base + "/login"
        page.fill("input[name=password]", "wrong")
        page.click("button[type=submit]")
        expect(page.locator(".error")).to_contain_text("Wrong user name or password")
        page.fill("input[name=password]", manager.token)
        page.click("button[type=submit]")
        assert page.url == base + "/"

        # three tenants of different sizes, through the form (what-if answered live)
        keys = {}
        for name, size, port in (("small", "1536M", 30501), ("medium", "1792M", 30502), ("large", "2G", 30503)):
            page.goto(base + "/tenants/new")
            page.fill("input[name=name]", name)
            page.fill("input[name=gpu_memory]", size)
            expect(page.locator("[data-whatif-answer]")).to_contain_text("Fits:")
            page.fill("input[name=port]", str(port))
            if name == "large":  # engine options, as the admin sets them in the form
                page.click("details summary")
                page.fill("input[name=max_num_seqs]", "8")
                page.select_option("select[name=enable_prefix_caching]", "off")
            page.click("form[data-whatif] button[type=submit]")
            keys[name] = page.locator("[data-testid=new-key]").inner_text().strip()
            assert keys[name].startswith("gtm_")
        page.goto(base + "/tenants/large")
        expect(page.locator("[data-testid=engine-options]")).to_contain_text("prefix caching off")
        expect(page.locator("[data-testid=engine-options]")).to_contain_text("max sequences 8")
        expect(page.locator("[data-testid=images]")).to_contain_text("none (text only)")
        page.goto(base + "/tenants/new")
        page.fill("input[name=gpu_memory]", "900G")
        expect(page.locator("[data-whatif-answer]")).to_contain_text("Does not fit: ledger")
        page.screenshot(path=str(ARTIFACTS / "tenant-new.png"), full_page=True)

        # the tenant's edit form: every current value shown, only what changes saved, the CLI's checks
        page.goto(base + "/tenants/large")
        edit = page.locator("[data-testid=edit-tenant]")
        expect(edit.locator("input[name=gpu_memory]")).to_have_value("2G")
        edit.locator("input[name=max_model_len]").fill("100000")
        edit.locator("button[type=submit]").click()
        expect(page.locator(".error")).to_contain_text("100000")  # beyond the model's own positions
        expect(edit.locator("input[name=max_model_len]")).to_have_value("100000")  # what was typed stays
        edit.locator("input[name=max_model_len]").fill("512")
        edit.locator("input[name=rpm_limit]").fill("120")
        edit.locator("button[type=submit]").click()
        expect(page.locator(".ok")).to_contain_text("applies at once")
        assert "?shown=" in page.url  # post/redirect/get: a reload does not post again
        expect(page.locator("dl.spec")).to_contain_text("120/min")
        page.reload()
        expect(page.locator(".ok")).to_have_count(0)

        page.goto(base + "/")
        rows = page.locator("tbody tr")
        expect(rows).to_have_count(3)
        for name in ("small", "medium", "large"):
            expect(page.locator(f"tbody tr:has(a:text-is('{name}')) .status")).to_have_text(
                re.compile("pending|starting|running")
            )
        widths = {
            name: page.locator(f".seg[title^='{name}:']").bounding_box()["width"]  # type: ignore[index]
            for name in ("small", "medium", "large")
        }
        assert widths["small"] < widths["medium"] < widths["large"], widths
        page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(ARTIFACTS / "overview-phone.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 900})

        # rotate a key: the new key is shown once and never again
        page.goto(base + "/tenants/small")
        page.click("form[action$='/rotate'] button")
        new_key = page.locator("[data-testid=new-key]").inner_text().strip()
        assert new_key.startswith("gtm_") and new_key != keys["small"]
        page.screenshot(path=str(ARTIFACTS / "tenant.png"), full_page=True)
        page.goto(base + "/tenants/small")
        assert new_key not in page.content()
        assert keys["small"] not in page.content()
        expect(page.locator("[data-testid=keys] tbody tr")).to_have_count(2)

        # members: added on the tenant page, the member's key shown exactly once
        page.fill("[data-testid=add-member] input[name=member]", "Bob!")
        page.click("[data-testid=add-member] button[type=submit]")
        expect(page.locator(".error")).to_contain_text("invalid member name")
        expect(page.locator("[data-testid=members] tbody tr")).to_have_count(1)  # nothing half-created
        page.fill("[data-testid=add-member] input[name=member]", "alice")
        page.fill("[data-testid=add-member] input[name=tokens_per_day]", "5000")
        page.click("[data-testid=add-member] button[type=submit]")
        expect(page.locator("[data-testid=new-key-member]")).to_have_text("alice")
        alice_key = page.locator("[data-testid=new-key]").inner_text().strip()
        assert alice_key.startswith("gtm_")
        expect(page.locator("[data-testid=members] tr[data-member=alice]")).to_contain_text("5000 tokens/day")
        assert "/members" not in page.url.split("#")[0]  # redirected off the POST
        alice_limits = page.locator("[data-testid=members] tr[data-member=alice] details.edit-limits")
        alice_limits.locator("summary").click()
        alice_limits.locator("input[name=tokens_per_day]").fill("6000")
        alice_limits.locator("button[type=submit]").click()
        expect(page.locator(".ok")).to_contain_text("Limits of member alice saved")
        expect(page.locator("[data-testid=members] tr[data-member=alice]")).to_contain_text("6000 tokens/day")
        page.screenshot(path=str(ARTIFACTS / "members.png"), full_page=True)
        page.goto(base + "/tenants/small")
        assert alice_key not in page.content()
        expect(page.locator("[data-testid=members] tbody tr")).to_have_count(2)

        # real usage by alice and by the first member, through the OpenAI SDK on the tenant's port
        api_client = manager.client()
        wait_status(api_client, "small", "running")
        for key, n in ((alice_key, 2), (new_key, 1)):
            client = openai.OpenAI(base_url="http://127.0.0.1:30501/v1", api_key=key, max_retries=0)
            for _ in range(n):
                client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4)

        def member_today() -> dict[str, dict[str, int]]:
            listing = api_client.get("/api/v1/tenants/small/members").json()
            return {m["name"]: m["today"] for m in listing}

        today = wait_for(
            lambda: (t := member_today())["alice"]["requests"] == 2 and t["small"]["requests"] == 1 and t,
            60,
            "the members' usage to be collected",
        )
        page.goto(base + "/tenants/small")
        alice_row = page.locator("[data-testid=members] tr[data-member=alice]")
        expect(alice_row).to_contain_text(f"2 req, {today['alice']['total_tokens']} tok")
        # the 30-day chart: scales with today's figures, and today's bar names them on hover
        tokens_today = today["alice"]["total_tokens"] + today["small"]["total_tokens"]
        expect(page.locator("[data-testid=chart-axes]")).to_contain_text("3 requests")
        expect(page.locator("[data-testid=chart-axes]")).to_contain_text(f"{tokens_today} tokens")
        last_bar = page.locator(".chart .col").last
        assert last_bar.get_attribute("title") == f"{datetime.now(UTC).date()}: 3 requests, {tokens_today} tokens"
        page.screenshot(path=str(ARTIFACTS / "tenant-usage.png"), full_page=True)

        # rotate alice's key from the members table: the new key once, for alice
        alice_row.locator("form[action$='/rotate'] button").click()
        expect(page.locator("[data-testid=new-key-member]")).to_have_text("alice")
        rotated = page.locator("[data-testid=new-key]").inner_text().strip()
        assert rotated.startswith("gtm_") and rotated != alice_key
        page.goto(base + "/tenants/small")
        assert rotated not in page.content()

        # remove alice (the browser asks first): her row goes, her usage stays for the cost split below
        page.once("dialog", lambda dialog: dialog.accept())
        page.locator("[data-testid=members] tr[data-member=alice] form[action$='/remove'] button").click()
        expect(page.locator("[data-testid=members] tr[data-member=alice]")).to_have_count(0)
        expect(page.locator("[data-testid=members] tbody tr")).to_have_count(1)

        # a form post without a valid CSRF token is refused, even with the session cookie
        refused = page.request.post(base + "/tenants/small/rotate", form={"grace_s": "0"})
        assert refused.status == 403
        refused = page.request.post(base + "/tenants/small/rotate", form={"grace_s": "0", "csrf": "forged"})
        assert refused.status == 403

        # the cost CSV matches the API (tenants removed first, so the memory-hours stop growing)
        admin = {"Authorization": f"Bearer {manager.token}"}
        for name in keys:
            assert httpx.delete(f"{base}/api/v1/tenants/{name}", headers=admin).status_code == 202
        month = datetime.now(UTC).strftime("%Y-%m")
        page.goto(f"{base}/usage?month={month}&cost=1000")
        with page.expect_download() as download_info:
            page.click("a[download]")
        text = Path(download_info.value.path()).read_text()
        rows_csv = list(csv.DictReader(io.StringIO(text)))
        from_csv = {r["tenant"]: r for r in rows_csv if not r["member"]}
        api = httpx.get(f"{base}/api/v1/cost", params={"month": month, "total": 1000}, headers=admin).json()

        # the members' split of small's cost: in the page, the CSV and the API alike
        (small,) = [s for s in api if s["tenant"] == "small"]
        split = {m["member"]: m for m in small["members"]}
        assert set(split) == {"small", "alice"}
        assert split["alice"]["tokens"] == today["alice"]["total_tokens"]
        assert split["alice"]["cost_by_tokens"] + split["small"]["cost_by_tokens"] == pytest.approx(
            small["cost_by_memory"], abs=0.02
        )
        assert split["alice"]["share_by_requests"] == pytest.approx(2 / 3, abs=1e-5)
        cell = page.locator("[data-testid=member-shares] tr[data-member='small/alice']")
        expect(cell).to_contain_text(f"{split['alice']['cost_by_tokens']:.2f}")
        expect(cell).to_contain_text("66.7%")
        member_rows = {r["member"]: r for r in rows_csv if r["tenant"] == "small" and r["member"]}
        assert float(member_rows["alice"]["member_cost_by_tokens"]) == pytest.approx(split["alice"]["cost_by_tokens"])
        assert int(member_rows["alice"]["tokens"]) == today["alice"]["total_tokens"]
        page.screenshot(path=str(ARTIFACTS / "usage.png"), full_page=True)
        assert set(from_csv) == {"small", "medium", "large"}
        for share in api:
            row = from_csv[share["tenant"]]
            assert float(row["cost_by_memory"]) == pytest.approx(share["cost_by_memory"])
            assert float(row["share_by_memory"]) == pytest.approx(share["share_by_memory"])
        assert sum(float(r["cost_by_memory"]) for r in from_csv.values()) == pytest.approx(1000, abs=0.05)
        total_hours = sum(float(r["gib_hours"]) for r in from_csv.values())
        for row in from_csv.values():
            assert float(row["share_by_memory"]) == pytest.approx(float(row["gib_hours"]) / total_hours, rel=0.05)

        # the audit page filters, and the failed login is on it
        page.goto(base + "/audit?action=console-login")
        expect(page.locator("tbody")).to_contain_text("failed")
        page.goto(base + "/audit?tenant=small")
        expect(page.locator("tbody")).to_contain_text("rotate-key")
        expect(page.locator("tbody")).to_contain_text("add-member")
        page.screenshot(path=str(ARTIFACTS / "audit.png"), full_page=True)

        # the API's documentation renders with the manager's own copy of Swagger UI (no CDN: below)
        page.goto(base + "/docs")
        try:
            expect(page.locator(".opblock-summary-path").first).to_be_visible()
        except AssertionError as e:
            raise AssertionError(f"{e}\nrequests that failed: {failed}") from None
        expect(page.locator('[data-path="/api/v1/tenants/{name}/members"]').first).to_be_visible()

        # errors render as a page; logging out ends the session
        page.goto(base + "/tenants/nobody")
        expect(page.locator(".error")).to_contain_text("no tenant named 'nobody'")
        page.goto(base + "/no-such-page")
        expect(page.locator(".error")).to_contain_text("Not Found")
        expect(page.locator("nav a[href='/']")).to_be_visible()  # the navigation stays on an error page
        page.screenshot(path=str(ARTIFACTS / "error.png"), full_page=True)
        page.goto(base + "/")
        page.click("button.link")
        page.goto(base + "/")
        assert page.url == base + "/login"
        browser.close()

    foreign = [u for u in seen if not u.startswith(base + "/") and not u.startswith("data:")]
    assert foreign == [], f"pages contacted other hosts: {foreign}"
    assert blocked == [], f"the console's own CSP blocked: {blocked}"
