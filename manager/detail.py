"""An audit entry's detail as people read it, for the console and the CLI alike."""

from __future__ import annotations

import re

from manager.sizes import format_size

BYTES = re.compile(r"memory|size|body|bytes|total|headroom|reserved|free|used|overhead|minimum|requested|taken|reclaim")
"""Detail keys whose numbers are bytes (admission's numbers, reservations, limits in bytes)."""


def detail_text(detail: dict[str, object]) -> str:
    """An audit entry's detail as people read it: ``key: value`` pairs, sizes in units, no JSON escapes."""
    parts = []
    for key, value in detail.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and BYTES.search(key):
            shown = format_size(value)
        elif isinstance(value, dict):
            shown = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None) or "none"
        elif isinstance(value, list):
            shown = ", ".join(str(v) for v in value)
        else:
            shown = str(value)
        parts.append(f"{key.replace('_', ' ')}: {shown}")
    return "; ".join(parts)
