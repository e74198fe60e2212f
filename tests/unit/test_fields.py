"""One declaration per tenant field (``domain.TenantSpec``'s metadata): every interface that
spells the fields out is derived from it, so each field is in each of them, with its bounds, and
what a change of it does is the declaration's."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from manager import cli
from manager.api import schemas
from manager.console.forms import edit_changes, new_values, shown
from manager.control.sqlite_store import SqliteStore
from manager.domain import (
    ENGINE_FIELDS,
    QUOTA_FIELDS,
    SPEC_DECLARED,
    TENANT_FIELDS,
    TenantSpec,
    check_bounds,
)
from manager.errors import InvalidInput
from manager.fields import Kind, TenantField, parse_duration

SPEC = TenantSpec(name="acme", port=30001, gpu_memory=2 * 1024**3, model="demo", max_model_len=512)


def _other(f: TenantField, value: Any) -> Any:
    """A valid value of ``f`` other than ``value``."""
    if f.d.kind is Kind.BOOL:
        return not value
    if f.d.kind is Kind.TEXT:
        return "awq" if value != "awq" else "gptq"
    if f.d.hi is not None and f.d.lo is not None:
        return f.d.hi if value != f.d.hi else f.d.lo
    raise AssertionError(f"no other value for {f.name}")


def _set(spec: TenantSpec, name: str, value: Any) -> TenantSpec:
    return spec.changed({name: value})


def test_the_table_holds_every_field_an_admin_sets() -> None:
    spec_fields = {f.name for f in SPEC_DECLARED}
    assert spec_fields | {"name", "quotas"} == set(TenantSpec.__dataclass_fields__)
    assert {f.name for f in TENANT_FIELDS} == spec_fields | set(QUOTA_FIELDS)


@pytest.mark.parametrize("f", TENANT_FIELDS, ids=lambda f: f.name)
def test_a_change_recreates_the_engine_exactly_when_it_is_declared_so(f: TenantField) -> None:
    changed = _set(SPEC, f.name, _other(f, SPEC.flat()[f.name]))
    assert (changed.engine_hash() != SPEC.engine_hash()) == f.d.engine


def test_the_engine_hash_is_the_one_older_releases_computed() -> None:
    """Upgrades must not restart every engine: the hash of a spec is what the last release wrote."""
    assert SPEC.engine_hash() == "72de603960372045"  # what every earlier release computed
    assert [f.name for f in ENGINE_FIELDS][:3] == ["gpu_memory", "model", "max_model_len"]


@pytest.mark.parametrize("f", [f for f in TENANT_FIELDS if f.d.hi is not None], ids=lambda f: f.name)
def test_each_bound_is_checked_with_the_fields_own_words(f: TenantField) -> None:
    assert f.d.lo is not None and f.d.hi is not None
    top = f.d.hi * 2 if f.d.kind is not Kind.INT else int(f.d.hi) + 1
    with pytest.raises(InvalidInput, match=f"{f.words} must be between"):
        check_bounds(_set(SPEC, f.name, top))
    if f.d.lo > 0:
        with pytest.raises(InvalidInput, match=f"{f.words} must be between"):
            check_bounds(_set(SPEC, f.name, f.d.lo / 2 if f.d.kind is Kind.DURATION else 0))


def test_the_api_models_are_the_declarations() -> None:
    create, update = schemas.TenantCreate.model_fields, schemas.TenantUpdate.model_fields
    public = schemas.TenantPublic.model_fields
    for f in TENANT_FIELDS:
        assert f.name in create and f.name in update, f.name
        assert f.d.help in (create[f.name].description or ""), f.name
        assert create[f.name].is_required() == f.d.required, f.name
        assert not update[f.name].is_required(), f.name
        assert f.quota or f.name in public, f.name
    assert "quotas" in public


def test_the_cli_flags_are_the_declarations() -> None:
    commands = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in ("add-tenant", "update-tenant"):
        options = {a.dest: a for a in commands[command]._actions}
        for f in TENANT_FIELDS:
            assert f.name in options, (command, f.name)
            assert f.flag in options[f.name].option_strings, (command, f.name)
            assert options[f.name].required == (command == "add-tenant" and f.d.required), (command, f.name)


def test_the_store_has_a_column_for_each_and_reads_back_what_it_wrote(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "m.db").close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        columns = {r[1] for r in db.execute("PRAGMA table_info(tenants)")}
    assert {f.name for f in TENANT_FIELDS} <= columns
    spec = SPEC
    for f in TENANT_FIELDS:
        spec = _set(spec, f.name, _other(f, spec.flat()[f.name]))
    assert TenantSpec.from_flat(spec.name, spec.flat()) == spec


def test_the_console_forms_show_each_value_and_read_it_back() -> None:
    form = {f.name: shown(f, SPEC) for f in TENANT_FIELDS}
    assert edit_changes(form, SPEC) == {}, "an untouched form changes nothing"
    typed = new_values({**form, "name": "acme"})
    assert SPEC.changed({k: v for k, v in typed.items() if k != "name"}) == SPEC
    assert edit_changes({**form, "idle_sleep_s": "10m", "rpm_limit": "7"}, SPEC) == {
        "idle_sleep_s": 600.0,
        "rpm_limit": 7,
    }
    with pytest.raises(InvalidInput, match="GPU memory: size must be positive"):
        edit_changes({**form, "gpu_memory": "-1G"}, SPEC)


@pytest.mark.parametrize(("text", "seconds"), [("15s", 15.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0)])
def test_durations_read_as_admins_write_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(str(seconds)) == seconds
