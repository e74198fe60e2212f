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
# Docker >= 23 for the swarm tests' nodes (tests/integration/test_swarm.py, as root; GTM_SWARM_TESTS=0
# leaves them out), meanwhile
swarm_docker=
if [ "$(id -u)" = 0 ] && [ "${GTM_SWARM_TESTS:-1}" != 0 ]; then
  timed swarm-docker bash scripts/swarm-nodes.sh fetch &
  swarm_docker=$!
fi
timed images bash scripts/build-images.sh all
timed demo-model bash scripts/make-demo-model.sh "$GTM_CACHE/models"
wait "$dev_env" || die "making the .venv failed (the reason is above)"
[ -z "$swarm_docker" ] || wait "$swarm_docker" || die "fetching Docker for the swarm tests failed (see above)"
timed lint bash scripts/lint.sh
export GTM_TEST_MODELS="$GTM_CACHE/models"
rc=0
.venv/bin/pytest "$@" || rc=$?
[ $rc -eq 5 ] && { log "pytest collected no tests"; rc=1; }
log "whole suite took $(( $(date +%s) - t0 ))s (exit $rc)"
exit $rc
