"""Dependencies point one way: the gateway (and the contract both sides share) load no
control-plane, API, runtime or GPU module, so a gateway runs and upgrades on its own."""

from __future__ import annotations

import subprocess
import sys

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
