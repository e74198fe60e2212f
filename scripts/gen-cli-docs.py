"""Writes docs/cli.md from the CLI's own --help (tests/unit/test_docs.py fails when it is stale)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from manager.cli import build_parser  # noqa: E402


def render() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal; docs must not depend on it
    parser = build_parser()
    parts = [
        "# CLI reference\n",
        "Generated from `--help` by `scripts/gen-cli-docs.py`; do not edit by hand.\n",
        "Inside the manager container each command is on the PATH (`docker exec manager add-tenant ...`)",
        "and also `manager <command>`. Exit codes: 0 ok, 2 invalid input, 3 not found, 4 conflict,",
        "5 admission refused (or what-if: does not fit), 6 unauthorized, 7 Docker unavailable.\n",
        "```text\n" + parser.format_help().replace("manager-cli", "manager") + "```\n",
    ]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        parts.append(f"## {name}\n\n```text\n{p.format_help()}```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(render())
    print("wrote docs/cli.md")
