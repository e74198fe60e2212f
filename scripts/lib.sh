# Shared helpers for the project's shell scripts. Source it; do not run it.
# Every cache lives under GTM_CACHE so a fresh clone reuses wheels and models.
set -euo pipefail
GTM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GTM_CACHE=${GTM_CACHE:-/var/cache/gpu-tenant-manager}
GTM_BASE_IMAGE=${GTM_BASE_IMAGE:-debian:bookworm-slim}
GTM_ENGINE_IMAGE=${GTM_ENGINE_IMAGE:-gtm-engine-cpu:0.32.0}
GTM_MANAGER_IMAGE=${GTM_MANAGER_IMAGE:-gtm-manager:dev}
GTM_COMPOSE_PROJECT=${GTM_COMPOSE_PROJECT:-gtm}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# Runs a step and logs how long it took, so the README's figures can be re-measured.
timed() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$@"
  log "$name took $(( $(date +%s) - t0 ))s"
}

compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "$@"
  elif command -v docker-compose >/dev/null 2>&1; then docker-compose "$@"
  else die "no docker compose found; run scripts/bootstrap-host.sh"; fi
}
