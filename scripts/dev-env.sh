#!/usr/bin/env bash
# Creates (or reuses) .venv with the project and its test/lint tools.
# Reinstalls only when pyproject.toml changed.
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
# the browser tests drive Debian's Chromium (Playwright's own browser download is not needed)
if ! command -v chromium >/dev/null; then
  [ "$(id -u)" = 0 ] || die "chromium is missing: apt-get install chromium (as root)"
  log "installing chromium for the console's browser tests"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || die "apt-get install chromium failed"
fi
stamp=.venv/.stamp-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then log ".venv up to date"; exit 0; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
log "installing the project and its test tools into .venv"
.venv/bin/pip install -q --upgrade "pip>=24" 2>&1 | { grep -v 'is ignored' || true; }
# dependency groups (PEP 735) need pip >= 25.1
.venv/bin/pip install -q -e . --group test --group lint 2>&1 | { grep -v 'is ignored' || true; }
rm -f .venv/.stamp-*; touch "$stamp"
