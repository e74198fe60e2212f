"""How a tenant field is declared, once, and read as admins write it.

A field of ``domain.TenantSpec`` (or of ``domain.Quotas``) carries a ``Declared`` in its
dataclass metadata: its kind, bounds, help text, console label, CLI flag and what a change of it
does. Everything that spells the fields out derives from those declarations:

- the admin API's create, update and public models (``api.schemas``);
- the CLI flags of add-tenant and update-tenant (``cli``);
- the console's forms and their parsing (``console.forms``, ``templates/_fields.html``);
- the store's columns (``control.store``);
- ``TenantSpec.engine_hash`` and the bounds checks (``domain``).

So a new engine option is one declaration in ``domain`` plus its behaviour (``control.plan``)
and the schema step that adds its column. vLLM's ``EngineArgs`` builds its flags the same way
from its dataclass fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from manager.errors import InvalidInput
from manager.sizes import format_size, parse_size

FIELD = "gtm"
"""The dataclass metadata key that holds a field's ``Declared``."""


class Kind(StrEnum):
    SIZE = "size"
    """Bytes; written 10G, 512M, 10GiB (binary units)."""
    INT = "int"
    DURATION = "duration"
    """Seconds; written 15s, 10m, 2h, 1d or plain seconds."""
    BOOL = "bool"
    TEXT = "text"


class Section(StrEnum):
    """Where the console's forms show a field."""

    MAIN = "main"
    QUOTA = "quota"
    ENGINE = "engine"
    """Behind "Images and engine options" on the add form."""


@dataclass(frozen=True)
class Declared:
    """One tenant field, as every interface spells it."""

    kind: Kind
    help: str
    """What it is, for the CLI's --help and the API schema's description."""
    label: str
    """The console's label."""
    lo: float | None = None
    hi: float | None = None
    """The bounds of a value that is set (``check``)."""
    unit: str = ""
    """How a bound is shown in an error: ``tokens``."""
    unset: str | None = None
    """What None means, for a field that may be unset ("no limit", "never"); None: it is always set."""
    zero_unsets: bool = False
    """0 on input means unset (``--idle-sleep 0``: never)."""
    engine: bool = False
    """A change recreates the engine (it is part of ``engine_hash``)."""
    hashed_unset: bool = True
    """An engine field is part of ``engine_hash`` also while it is at its default. A field added
    after the first release says False: left out while unset, adding it restarts no engine."""
    gateway: bool = False
    """Pushed to the tenant's gateway with its config; a change applies live."""
    required: bool = False
    """add-tenant needs it."""
    host_default: bool = False
    """Required in a spec, optional on input: the host's setting (or the model) fills it in."""
    flag: str = ""
    """The CLI flag when it is not the field's name with dashes (``--quant``)."""
    metavar: str | None = None
    section: Section = Section.ENGINE
    placeholder: str = ""
    """What the add form shows in an empty input."""
    title: str = ""
    """The console's tooltip."""
    choices: tuple[str, str] = ("on", "off")
    """A BOOL field's two options in the console, on then off."""
    listed: str = ""
    """How list-tenants' OPTIONS column names it ('': not there; see ``listing``)."""
    quota_unit: str = ""
    """A quota's unit in tables: ``/min``."""
    words: str = ""
    """The name in a sentence when it is not the field's name with spaces (``idle sleep``)."""
    normalize: Callable[[Any], Any] | None = None
    """How a given value is held (``encrypted:/data`` is ``encrypted``); raises InvalidInput."""


def declare(kind: Kind, help: str, label: str, **more: Any) -> dict[str, Declared]:
    """The metadata of a declared field: ``field(default=..., metadata=declare(...))``."""
    return {FIELD: Declared(kind, help, label, **more)}


@dataclass(frozen=True)
class TenantField:
    """A declared field with its name, as the flat list of a spec's fields holds it."""

    name: str
    d: Declared
    default: Any
    """The spec's default (``dataclasses.MISSING`` when the spec needs it)."""
    quota: bool = False
    """One of ``Quotas``'s: the spec keeps it in ``spec.quotas``."""

    @property
    def flag(self) -> str:
        return self.d.flag or "--" + self.name.replace("_", "-")

    @property
    def nullable(self) -> bool:
        return self.d.unset is not None

    @property
    def words(self) -> str:
        """The name in a sentence: ``max model len``."""
        return self.d.words or self.name.replace("_", " ")

    def normal(self, value: Any) -> Any:
        """An input value as the spec holds it: 0 of a ``zero_unsets`` field is None."""
        if self.d.zero_unsets and value == 0 and not isinstance(value, bool):
            return None
        if self.d.normalize is not None and value is not None:
            return self.d.normalize(value)
        return value

    def check(self, value: Any) -> None:
        """InvalidInput unless a set value lies within the bounds, saying which and what to do."""
        if value is None or self.d.lo is None or self.d.hi is None:
            return
        if not self.d.lo <= value <= self.d.hi:
            unset = f" (or {'0' if self.d.zero_unsets else 'unset'} for {self.d.unset})" if self.d.unset else ""
            raise InvalidInput(
                f"{self.words} must be between {self.shown(self.d.lo)} and {self.shown(self.d.hi)}{unset}, "
                f"got {self.shown(value)}"
            )

    def shown(self, value: Any) -> str:
        """A value as an error or a listing writes it."""
        if self.d.kind is Kind.SIZE:
            return format_size(int(value))
        if self.d.kind is Kind.DURATION:
            return f"{value / 86400:g} days" if value >= 86400 else f"{value:g} s"
        unit = f" {self.d.unit}" if self.d.unit else ""
        return f"{value}{unit}"


def declared(cls: type) -> Iterator[TenantField]:
    """The declared fields of a dataclass, in order."""
    for f in dataclasses.fields(cls):
        if FIELD in f.metadata:
            yield TenantField(f.name, f.metadata[FIELD], f.default)


# ---------------------------------------------------------------- reading what admins write
DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``15s``, ``10m``, ``2h``, ``1d`` or plain seconds; 0 is never."""
    text = text.strip()
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in DURATION_UNITS else (text, "s")
    try:
        value = float(number) * DURATION_UNITS[unit.lower()]
    except ValueError:
        raise InvalidInput(f"expected a duration such as 15s, 10m or 2h (0: never), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise InvalidInput(f"a duration is 0 (never) or positive, got {text!r}")
    return value


def parse_whole(text: str, zero: str | None = None) -> int:
    """A whole number; ``zero``: what 0 means (then it must not be negative)."""
    try:
        value = int(text.strip())
    except ValueError:
        hint = f" (0: {zero})" if zero else ""
        raise InvalidInput(f"expected a whole number{hint}, got {text!r}") from None
    if zero and value < 0:
        raise InvalidInput(f"must be 0 ({zero}) or a positive number, got {value}")
    return value


def parse_text(f: TenantField, text: str) -> Any:
    """A value of field ``f`` as an admin types it (a CLI argument, a console input)."""
    kind = f.d.kind
    if kind is Kind.SIZE:
        return parse_size(text.strip())
    if kind is Kind.DURATION:
        return parse_duration(text)
    if kind is Kind.INT:
        return parse_whole(text, f.d.unset if f.d.zero_unsets else None)
    if kind is Kind.BOOL:
        on, off = f.d.choices[0], f.d.choices[1]
        if text not in ("on", "off"):
            raise InvalidInput(f"{f.words} is on ({on}) or off ({off}), got {text!r}")
        return text == "on"
    return text.strip()
