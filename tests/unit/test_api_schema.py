"""A bounded schemathesis run against the admin API: generated requests (valid and
invalid) against the real app on a real socket, with the in-memory runtime behind it
(no Docker: the runtime is not what is tested here). No response may be a server error,
and every response must be one the OpenAPI schema documents, in its documented shape."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from manager.settings import Settings
from manager.wiring import create_app

from .conftest import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# the schema as the app publishes it (building the app starts nothing; the server fixture serves it)
schema = schemathesis.openapi.from_dict(create_app(Settings(gpu_mode="cpu", admin_token=TOKEN)).openapi())


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_admin_api_keeps_its_contract(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, headers=AUTH, checks=CHECKS)


def test_the_schema_states_the_bounds(base_url: str) -> None:
    import httpx

    spec = httpx.get(f"{base_url}/openapi.json").json()
    create = spec["components"]["schemas"]["TenantCreate"]["properties"]
    assert create["name"]["pattern"].startswith("^[a-z]")
    assert create["port"]["maximum"] == 65535
    assert {"integer", "string"} == {branch["type"] for branch in create["gpu_memory"]["anyOf"]}
    assert max(b.get("maximum", 0) for b in create["rpm_limit"]["anyOf"]) <= 2**63 - 1
    post = spec["paths"]["/api/v1/tenants"]["post"]["responses"]
    assert {"201", "400", "401", "409", "422", "503"} <= set(post)


def test_errors_have_one_shape(base_url: str) -> None:
    import httpx

    with httpx.Client(base_url=base_url, headers=AUTH) as api:
        not_json = api.post("/api/v1/tenants", content=b"{not json", headers={"content-type": "application/json"})
        assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
        huge = api.post("/api/v1/tenants", json={"name": "big", "port": 30001, "gpu_memory": "1G", "rpm_limit": 2**63})
        assert huge.status_code == 422 and "rpm_limit" in huge.json()["error"]["message"]
        shm = api.post(
            "/api/v1/tenants", json={"name": "big", "port": 30001, "gpu_memory": "1G", "shm_size": "99999999T"}
        )
        assert shm.status_code == 422 and "too large" in shm.json()["error"]["message"]
        assert api.get("/api/v1/usage", params={"since": "nan"}).status_code == 422
        assert api.get("/api/v1/cost", params={"month": "2026-11", "total": "inf"}).status_code == 422
        assert api.get("/api/v1/nope").json()["error"]["code"] == "not_found"
        assert httpx.get(f"{base_url}/api/v1/tenants").json()["error"]["code"] == "unauthorized"


def test_the_docs_pages_load_nothing_from_another_host(base_url: str) -> None:
    """/docs works on a host whose browsers reach no CDN: every script, style and icon it names is
    served by the manager, and Swagger UI is a release that reads OpenAPI 3.1."""
    import re

    import httpx

    html = httpx.get(base_url + "/docs").text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert len(assets) == 3, assets  # script, style, icon
    for url in assets:
        assert url.startswith("/"), f"/docs loads {url} from another host"
        assert httpx.get(base_url + url).status_code == 200, url
    assert httpx.get(base_url + "/redoc").status_code == 404, "ReDoc's page loads its logo from a CDN"
    bundle = httpx.get(base_url + "/docs/assets/swagger-ui-bundle.js").text
    (version,) = set(re.findall(r'PACKAGE_VERSION:"(\d+)\.', bundle))
    assert int(version) >= 5, "Swagger UI 4 cannot render FastAPI's OpenAPI 3.1 schema"
    assert httpx.get(base_url + "/openapi.json").json()["openapi"].startswith("3.1")
