#!/usr/bin/env bash
# Creates (or reuses) .venv with the project and its test/lint tools.
# Reinstalls only when pyproject.toml changed.
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
stamp=.venv/.stamp-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then log ".venv up to date"; exit 0; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
log "installing the project and its test tools into .venv"
.venv/bin/pip install -q --upgrade "pip>=24" 2>&1 | { grep -v 'is ignored' || true; }
# dependency groups (PEP 735) need pip >= 25.1
.venv/bin/pip install -q -e . --group test --group lint 2>&1 | { grep -v 'is ignored' || true; }
rm -f .venv/.stamp-*; touch "$stamp"
