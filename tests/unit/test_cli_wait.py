"""Commands that wait for their outcome, against a scripted API (httpx.MockTransport):
the real parser and command code, no manager."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from manager import cli
from manager.errors import EngineFailed, WaitTimedOut
from manager.settings import Settings

TENANT = {
    "name": "acme",
    "port": 30001,
    "gpu_memory": 1610612736,
    "gpu_memory_human": "1.5 GiB",
    "model": "demo",
    "max_model_len": 512,
    "quantization": None,
    "shm_size": 1 << 30,
    "quotas": {},
    "status": "pending",
    "reason": "",
    "status_since": 0.0,
    "created_at": 0.0,
    "measured": None,
    "requests_today": 0,
    "tokens_today": 0,
}


def scripted(statuses: list[tuple[int, str, str]]) -> tuple[cli.Api, list[str]]:
    """An Api whose GETs of the tenant answer the given (http status, tenant status, reason) in turn."""
    calls: list[str] = []
    remaining = list(statuses)

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        if request.method == "POST":
            return httpx.Response(
                201, json={"tenant": TENANT, "key": {"key_id": "k", "api_key": "gtm_k_s"}, "admission": {}}
            )
        if request.method == "DELETE":
            return httpx.Response(202, json={"status": "removing"})
        if request.method == "PATCH":
            return httpx.Response(200, json={**TENANT, "status": "pending"})
        code, status, reason = remaining.pop(0) if len(remaining) > 1 else remaining[0]
        if code == 404:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no tenant named 'acme'"}})
        return httpx.Response(200, json={**TENANT, "status": status, "reason": reason})

    settings = Settings(admin_token="cli-test-token-0123456789abcdef", api_url="http://manager")
    return cli.Api(settings, transport=httpx.MockTransport(handle)), calls


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "POLL_S", 0.0)


def run(argv: list[str], api: cli.Api) -> int:
    return cli.run(cli.build_parser().parse_args(argv), api)


ADD = ["add-tenant", "--name", "acme", "--gpu-memory", "1536M", "--port", "30001"]


def test_add_tenant_wait_returns_when_the_engine_serves(capsys: pytest.CaptureFixture[str]) -> None:
    api, calls = scripted([(200, "pending", ""), (200, "starting", ""), (200, "running", "")])
    assert run([*ADD, "--wait"], api) == 0
    out = capsys.readouterr().out
    assert "API key (shown once" in out and "acme is running" in out
    assert calls.count("GET /api/v1/tenants/acme") == 3


def test_add_tenant_wait_reports_the_engines_reason() -> None:
    api, _ = scripted([(200, "starting", ""), (200, "failed", "ValueError: bad config.json")])
    with pytest.raises(EngineFailed, match=r"ValueError: bad config\.json") as failure:
        run([*ADD, "--wait"], api)
    assert failure.value.exit_code == 9


def test_add_tenant_wait_times_out_with_the_status() -> None:
    api, _ = scripted([(200, "pending", "waiting for b's engine to finish starting")])
    with pytest.raises(WaitTimedOut, match="still pending"):
        run([*ADD, "--wait", "--timeout", "0"], api)


def test_add_tenant_without_wait_does_not_poll(capsys: pytest.CaptureFixture[str]) -> None:
    api, calls = scripted([(200, "pending", "")])
    assert run(ADD, api) == 0
    assert calls == ["POST /api/v1/tenants"]
    assert "starts in the background" in capsys.readouterr().out


def test_remove_tenant_waits_until_it_is_gone(capsys: pytest.CaptureFixture[str]) -> None:
    api, calls = scripted([(200, "removing", ""), (200, "removing", ""), (404, "", "")])
    assert run(["remove-tenant", "--name", "acme"], api) == 0
    assert "acme is removed" in capsys.readouterr().out
    assert calls.count("GET /api/v1/tenants/acme") == 3


def test_remove_tenant_no_wait_returns_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    api, calls = scripted([(200, "removing", "")])
    assert run(["remove-tenant", "--name", "acme", "--no-wait", "--json"], api) == 0
    assert calls == ["DELETE /api/v1/tenants/acme"]
    assert json.loads(capsys.readouterr().out) == {"status": "removing"}


def test_update_tenant_wait_waits_for_the_new_engine() -> None:
    api, _ = scripted([(200, "pending", ""), (200, "starting", ""), (200, "running", "")])
    assert run(["update-tenant", "--name", "acme", "--gpu-memory", "2G", "--wait"], api) == 0


def test_exit_codes_of_waiting_are_distinct() -> None:
    codes: list[Callable[..., Any]] = [EngineFailed, WaitTimedOut]
    assert sorted(c("x").exit_code for c in codes) == [9, 10]


def test_update_tenant_wait_waits_past_the_old_specs_failure() -> None:
    """A failed tenant moved to another port: the failure the PATCH still showed (port 30009 taken)
    is not the new spec's, so --wait waits for the new gateway instead of exiting 9 at once."""
    old = {**TENANT, "status": "failed", "status_since": 5.0, "reason": "port 30009 is in use by another program"}
    answers = [old, old, {**TENANT, "status": "pending", "status_since": 7.0}, {**TENANT, "status": "running"}]

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            return httpx.Response(200, json=old)
        return httpx.Response(200, json=answers.pop(0) if len(answers) > 1 else answers[0])

    settings = Settings(admin_token="cli-test-token-0123456789abcdef", api_url="http://manager")
    api = cli.Api(settings, transport=httpx.MockTransport(handle))
    assert run(["update-tenant", "--name", "acme", "--port", "30006", "--wait"], api) == 0
    # a failure of the new spec (a later status_since) still ends the wait
    answers[:] = [old, {**old, "status_since": 9.0, "reason": "ValueError: bad config.json"}]
    with pytest.raises(EngineFailed, match="bad config"):
        run(["update-tenant", "--name", "acme", "--port", "30007", "--wait"], api)
