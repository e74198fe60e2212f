"""Docs that cannot drift: every setting is documented; the CLI reference is --help."""

import importlib.util
from pathlib import Path

from manager.gateway.settings import GatewaySettings
from manager.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    missing = [name for name in Settings.model_fields if f"`GTM_{name.upper()}`" not in text]
    missing += [
        f"GATEWAY_{name}" for name in GatewaySettings.model_fields if f"`GTM_GATEWAY_{name.upper()}`" not in text
    ]
    assert not missing, f"document these in docs/settings.md: {missing}"


def test_cli_reference_is_generated_from_help() -> None:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen-cli-docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "cli.md").read_text() == module.render(), "run scripts/gen-cli-docs.py"
