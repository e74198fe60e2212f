"""The console's tenant forms, derived from the field declarations (``domain.TENANT_FIELDS``):
what each input shows and how what was typed becomes the values ``TenantService`` takes.
``templates/_fields.html`` renders the inputs from the same list."""

from __future__ import annotations

from typing import Any

from manager.domain import FIELDS_BY_NAME, QUOTA_DECLARED, TENANT_FIELDS, TenantSpec
from manager.errors import InvalidInput
from manager.fields import Kind, Section, TenantField, parse_text
from manager.sizes import exact_size


def _typed(f: TenantField, form: dict[str, str]) -> Any:
    """The value typed into ``f``'s input; None when it is empty (or absent)."""
    text = form.get(f.name, "").strip()
    if not text:
        return None
    try:
        return parse_text(f, text)
    except InvalidInput as exc:
        raise InvalidInput(f"{f.d.label}: {exc.message}") from exc


def new_values(form: dict[str, str]) -> dict[str, Any]:
    """The add form's values: every declared field typed (empty: the default), and ``name``."""
    values = {f.name: _typed(f, form) for f in TENANT_FIELDS}
    if values["gpu_memory"] is None or values["port"] is None:
        raise InvalidInput("name, GPU memory and port are required")
    return {"name": form.get("name", "").strip(), **values}


def quota_values(form: dict[str, str]) -> dict[str, Any]:
    """A member's limits as typed (empty: no limit of its own)."""
    return {f.name: _typed(f, form) for f in QUOTA_DECLARED}


def weight_of(form: dict[str, str]) -> float | None:
    """A member's weight as typed (empty: its default, or unchanged)."""
    text = form.get("weight", "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise InvalidInput(f"weight {text!r} is not a number: give 0.1 to 100 (1 is the default)") from exc


def edit_changes(form: dict[str, str], spec: TenantSpec) -> dict[str, Any]:
    """The options of ``update-tenant`` that the edit form changes: only fields whose value differs
    from the spec (the form shows every current value), so saving an untouched form changes nothing.
    An emptied input unsets a field that may be unset (a quota: no limit; sleep: never)."""
    current = spec.flat()
    changes: dict[str, Any] = {}
    for f in TENANT_FIELDS:
        if f.name not in form:
            continue
        value = f.normal(_typed(f, form))
        if value is None and not f.nullable:
            continue  # an emptied input of a field that is always set: left as it is
        if value != current[f.name]:
            changes[f.name] = 0 if value is None and f.d.zero_unsets else value
    if form.get("gpu", "").strip():
        changes["gpu"] = form["gpu"].strip()
    return changes


def recreates_engine(changes: dict[str, Any]) -> bool:
    return "gpu" in changes or any(FIELDS_BY_NAME[k].d.engine for k in changes if k in FIELDS_BY_NAME)


def shown(f: TenantField, spec: TenantSpec | None) -> str:
    """What ``f``'s input shows: the spec's value (the edit form), '' (the add form)."""
    if spec is None:
        return ""
    value = spec.flat()[f.name]
    if value is None:
        return ""
    if f.d.kind is Kind.SIZE:
        return exact_size(value)
    if f.d.kind is Kind.BOOL:
        return "on" if value else "off"
    if f.d.kind is Kind.DURATION:
        return f"{value:g}"
    return str(value)


def section(name: str) -> list[TenantField]:
    """The declared fields one part of a form shows, in order."""
    return [f for f in TENANT_FIELDS if f.d.section is Section(name)]
