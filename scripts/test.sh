#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs and starts what it needs
# (Docker engine, base image, wheelhouses, images, demo model, .venv), then runs
# lint, the unit tests and the integration tests against the real Docker engine.
# Re-running reuses every cache. Extra arguments go to pytest.
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
t0=$(date +%s)
timed bootstrap bash scripts/bootstrap-host.sh
# the .venv (pip) is made while the images build (Docker): neither needs the other
timed dev-env bash scripts/dev-env.sh &
dev_env=$!
timed images bash scripts/build-images.sh all
timed demo-model bash scripts/make-demo-model.sh "$GTM_CACHE/models"
wait "$dev_env" || die "making the .venv failed (the reason is above)"
timed lint bash scripts/lint.sh
export GTM_TEST_MODELS="$GTM_CACHE/models"
rc=0
.venv/bin/pytest "$@" || rc=$?
[ $rc -eq 5 ] && { log "pytest collected no tests"; rc=1; }
log "whole suite took $(( $(date +%s) - t0 ))s (exit $rc)"
exit $rc
