"""Dependencies point one way. The gateway (and the contract both sides share) load no
control-plane, API, runtime or GPU module, so a gateway runs and upgrades on its own; and every
import of the product points down the house (cli -> wiring -> api | console -> control ->
runtime | gpu | volumes -> shared modules), with no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("module", ["manager.gateway.server", "manager.contract", "manager.keys"])
def test_the_gateway_side_loads_no_control_plane_module(module: str) -> None:
    forbidden = ("control", "api", "runtime", "gpu", "console")
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in sys.modules if m.startswith('manager.') and m.split('.')[1] in {forbidden!r})\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"{module} loads {out}"


# ---------------------------------------------------------------- the whole house
RANKS = {
    "cli": 6, "wiring": 5, "api": 4, "console": 4, "control": 3, "agent": 3, "runtime": 2, "gpu": 2, "volumes": 2,
    "shared": 1,
}  # fmt: skip
"""cli -> wiring (the composition root) -> api | console -> control -> runtime | gpu -> shared
modules; the node agent (``manager node-agent``) beside control, on runtime and gpu. A module
imports only rooms below its own (or its own room); rooms of one rank are siblings and import
neither each other. The gateway stands apart: it imports shared modules only,
and only the CLI (``manager gateway``) imports it."""
ROOT = Path(__file__).resolve().parents[2] / "manager"


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in (*RANKS, "gateway"):
        return parts[1]
    return "shared"


def imports() -> dict[str, set[str]]:
    """Every module of the product and the product modules it imports, at its top or inside a
    function (a lazy import runs back up as surely as any other)."""
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        found[module] = {t for t in targets if t.startswith("manager")}
    known = set(found)
    return {m: {t for t in ts if t in known and t != m} for m, ts in found.items()}


def test_every_import_points_down_the_house() -> None:
    wrong = []
    for module, targets in imports().items():
        here = room_of(module)
        for target in targets:
            there = room_of(target)
            if there == here:
                continue
            if here == "gateway" or there == "gateway":
                ok = there == "shared" if here == "gateway" else here == "cli"
            else:
                ok = RANKS[there] < RANKS[here]
            if not ok:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "imports that run back up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_itself_back() -> None:
    graph = imports()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_sqlite_stays_in_the_stores() -> None:
    """The stores own their transactions: no other module opens, or is handed, a connection (the
    manager's store hands out ``Tx``); the gateway's state only names the spool's errors."""
    users = set()
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.Import) and any(a.name == "sqlite3" for a in n.names) for n in ast.walk(tree)):
            users.add(str(path.relative_to(ROOT.parent)))
    assert users == {
        "manager/control/sqlite_store.py",
        "manager/gateway/store.py",
        "manager/gateway/state.py",
        "manager/migrations.py",
    }
