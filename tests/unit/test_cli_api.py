"""Every admin command against the real API app in process (the in-memory runtime behind it, no
Docker): the real parser, the real command code and the API's real answers, so the CLI cannot
drift from the API the way a hand-copied answer can. Exit codes and error lines as a shell sees
them (``cli.main``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from manager import cli, names
from manager.runtime.memory import MemoryRuntime
from manager.settings import Settings
from manager.wiring import create_app

from .conftest import TOKEN, write_demo_model
from .fakes import FakeGateway

INSTANCE = "gtmcli"
runtime = MemoryRuntime()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[cli.Api]:
    root = tmp_path_factory.mktemp("cli")
    write_demo_model(root / "models")
    settings = Settings(
        gpu_mode="cpu",
        instance=INSTANCE,
        state_dir=root / "state",
        models_dir=root / "models",
        admin_token=TOKEN,
        reconcile_interval_s=3600,
    )
    app = create_app(settings, runtime=runtime, connect=FakeGateway())
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield cli.Api.of(client)


def manager(api: cli.Api, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``docker exec manager <argv>``: the exit code, stdout and stderr."""
    code = cli.main(list(argv), api)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_speaks_the_apis_answers(api: cli.Api, capsys: pytest.CaptureFixture[str]) -> None:
    def ok(*argv: str) -> str:
        code, out, err = manager(api, capsys, *argv)
        assert code == 0, f"{argv}: exit {code}, {err}"
        return out

    added = ok("add-tenant", "--name", "lab", "--gpu-memory", "1536M", "--port", "30011", "--rpm-limit", "30")
    assert "tenant lab admitted: 1.5 GiB on port 30011" in added and "API key (shown once" in added
    deadline = time.monotonic() + 10
    both = (names.engine(INSTANCE, "lab"), names.gateway(INSTANCE, "lab"))
    # the reconciler's worker creates the gateway, then the engine (after the page-cache warm-up)
    while any(runtime.container(c) is None for c in both) and time.monotonic() < deadline:
        time.sleep(0.05)
    for container in (names.engine(INSTANCE, "lab"), names.gateway(INSTANCE, "lab")):
        runtime.set_health(container, "healthy")  # what Docker's health checks would say
    ok("wait-tenant", "--name", "lab", "--timeout", "30")
    listed = ok("list-tenants")
    assert "lab" in listed and "30011" in listed and "running" in listed
    (row,) = json.loads(ok("list-tenants", "--json"))
    assert (row["name"], row["quotas"]["rpm_limit"]) == ("lab", 30)
    assert "tokens_per_day" in ok("update-tenant", "--name", "lab", "--tokens-per-day", "1000", "--json")
    member = ok("add-member", "--tenant", "lab", "--name", "alice", "--rpm-limit", "5")
    assert "member alice added to lab" in member and "API key (shown once" in member
    assert "alice" in ok("list-members", "--tenant", "lab")
    ok("update-member", "--tenant", "lab", "--name", "alice", "--tokens-per-day", "100")
    (alice,) = [m for m in json.loads(ok("list-members", "--tenant", "lab", "--json")) if m["name"] == "alice"]
    assert (alice["quotas"]["rpm_limit"], alice["quotas"]["tokens_per_day"]) == (5, 100)
    assert "gtm_" in ok("rotate-key", "--name", "lab", "--grace", "0")
    assert "lab" in ok("capacity") and "GPU sharing" not in ok("capacity")
    assert json.loads(cli_json(api, capsys, "capacity"))["gpu_sharing"] == "none"
    assert "demo" in ok("list-models")
    what_if = json.loads(cli_json(api, capsys, "what-if", "--gpu-memory", "1G"))
    assert isinstance(what_if["admitted"], bool)
    audit = ok("audit", "--name", "lab")
    for action in ("add-tenant", "update-tenant", "add-member", "update-member", "rotate-key"):
        assert action in audit, action
    ok("remove-member", "--tenant", "lab", "--name", "alice")
    assert "alice" not in ok("list-members", "--tenant", "lab")
    assert "tenant lab is removed" in ok("remove-tenant", "--name", "lab", "--timeout", "30")  # it waits
    assert json.loads(ok("list-tenants", "--json")) == []


def cli_json(api: cli.Api, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = manager(api, capsys, *argv, "--json")
    assert code in (0, 5), err  # what-if: 5 when it would not fit
    return out


def test_refusals_say_what_to_do_with_the_exit_code_of_their_kind(
    api: cli.Api, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = manager(api, capsys, "update-tenant", "--name", "nobody", "--rpm-limit", "1")
    assert code == 3 and "no tenant named 'nobody'" in err and "list-tenants" in err
    code, _, err = manager(api, capsys, "add-tenant", "--name", "Bad_Name", "--gpu-memory", "1G", "--port", "30012")
    assert code == 2 and err.startswith("error: ")
    code, _, err = manager(api, capsys, "add-tenant", "--name", "huge", "--gpu-memory", "100T", "--port", "30013")
    assert code == 5 and "numbers:" in err  # refused by admission, with the numbers that decided it
    assert manager(api, capsys, "list-tenants", "--json")[1].strip() == "[]"


def test_idle_sleep_is_set_as_a_duration_and_listed(api: cli.Api, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = manager(
        api, capsys, "add-tenant", "--name", "nap", "--gpu-memory", "1536M", "--port", "30019", "--idle-sleep", "10m"
    )
    assert code == 0, err
    code, out, _ = manager(api, capsys, "list-tenants", "--json")
    (nap,) = [t for t in json.loads(out) if t["name"] == "nap"]
    assert nap["idle_sleep_s"] == 600 and (nap["sleeps"], nap["wakes"]) == (0, 0)
    code, out, _ = manager(api, capsys, "list-tenants")
    header, *rows = out.splitlines()
    assert "SLEEP" in header and "LAST REQUEST (UTC)" in header
    assert "after 10m" in next(r for r in rows if r.startswith("nap "))
    columns = header.split()
    assert columns.index("SLEEP") < columns.index("REASON"), "the reason stays last"
    nap_row = next(r for r in rows if r.startswith("nap "))
    assert nap_row.index("after 10m") == header.index("SLEEP"), "each value under its own heading"
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error, as for any bad option
        manager(api, capsys, "update-tenant", "--name", "nap", "--idle-sleep", "soon")
    assert usage.value.code == 2 and "expected a duration such as 15s, 10m or 2h" in capsys.readouterr().err
    code, _, err = manager(api, capsys, "update-tenant", "--name", "nap", "--idle-sleep", "3s")
    assert code == 2 and "idle sleep must be between 5 s" in err
    code, out, err = manager(api, capsys, "update-tenant", "--name", "nap", "--idle-sleep", "0", "--json")
    assert code == 0 and json.loads(out)["idle_sleep_s"] is None, err
    # always on: never put to sleep; it and --idle-sleep contradict each other, and the error says so
    code, _, err = manager(api, capsys, "update-tenant", "--name", "nap", "--always-on", "--idle-sleep", "10m")
    assert code == 2 and "drop --idle-sleep" in err
    code, out, err = manager(api, capsys, "update-tenant", "--name", "nap", "--always-on")
    assert code == 0, err
    rows = manager(api, capsys, "list-tenants")[1].splitlines()
    assert "always on" in next(r for r in rows if r.startswith("nap "))
    code, out, err = manager(api, capsys, "update-tenant", "--name", "nap", "--no-always-on", "--json")
    assert code == 0 and json.loads(out)["always_on"] is False, err
    assert manager(api, capsys, "remove-tenant", "--name", "nap", "--no-wait")[0] == 0


def test_a_setting_that_does_not_validate_is_named_as_the_admin_set_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GTM_GPU_MODE", "cpu")
    monkeypatch.setenv("GTM_HEADROOM", "-5")
    assert cli.main(["list-tenants"]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid settings: GTM_HEADROOM: size must be positive, got '-5'"
