"""Strict parsing and formatting of memory sizes as admins write them (10G, 10GiB, 512M)."""

from __future__ import annotations

import re

from manager.errors import InvalidInput

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1024**4,
    "TIB": 1024**4,
}
PATTERN = r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*([a-zA-Z]*)\s*$"
_PATTERN = re.compile(PATTERN)
ACCEPTED = "a number with a unit: 512M, 1.5G, 10G, 10GiB, 1T (binary units: 1G = 1024^3 bytes)"
MAX_SIZE = 1024**5
"""1 PiB: far beyond any device, well inside SQLite's 64-bit integers."""


def parse_size(text: str | int) -> int:
    """Bytes for ``text``. Units are binary (G = GiB), as GPU memory is counted.

    A bare number is bytes only when it is an ``int``; a string needs a unit so
    that "10" is never silently taken as ten bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return _bounded(text, str(text))
    if str(text).strip().startswith("-"):
        raise InvalidInput(f"size must be positive, got {text!r}")
    match = _PATTERN.match(str(text))
    if not match or not match.group(2):
        raise InvalidInput(f"invalid size {text!r}: expected {ACCEPTED}")
    number, unit = match.groups()
    factor = _UNITS.get(unit.upper())
    if factor is None:
        raise InvalidInput(f"invalid size unit {unit!r} in {text!r}: expected {ACCEPTED}")
    return _bounded(int(float(number) * factor), repr(text))


def _bounded(value: int, shown: str) -> int:
    if value <= 0:
        raise InvalidInput(f"size must be positive, got {shown}")
    if value > MAX_SIZE:
        raise InvalidInput(f"size {shown} is too large: at most {MAX_SIZE // 1024**4}T")
    return value


def format_size(value: int) -> str:
    """Human form with binary units, e.g. ``10.0 GiB``; exact bytes stay in JSON."""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(amount) < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def exact_size(value: int) -> str:
    """The shortest form ``parse_size`` reads back to exactly ``value``: 1536M, 10G, 65537B."""
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value}B"
