#!/usr/bin/env bash
# Brings the whole stack up on a fresh machine: Docker engine, images, demo model,
# the manager (compose), and a demo tenant. Safe to re-run: it reuses everything.
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
export GTM_MODELS_VOLUME=${GTM_MODELS_VOLUME:-gtm-models}
MANAGER=${GTM_MANAGER_NAME:-manager}
timed bootstrap bash scripts/bootstrap-host.sh
timed images bash scripts/build-images.sh all
timed demo-model bash scripts/make-demo-model.sh "$GTM_MODELS_VOLUME"
log "starting the manager"
compose -p "$GTM_COMPOSE_PROJECT" -f compose/docker-compose.yml up -d >/dev/null
for _ in $(seq 60); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$MANAGER" 2>/dev/null)" = healthy ] && break; sleep 1
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$MANAGER")" = healthy ] || { docker logs --tail 30 "$MANAGER"; die "manager not healthy"; }
# read the whole listing first: `grep -q` in a pipe exits at the first match, and under
# pipefail the writer's SIGPIPE would make an existing tenant look absent
tenants=$(docker exec "$MANAGER" list-tenants --json) || die "list-tenants failed"
if grep -q '"name": "demo"' <<<"$tenants"; then
  log "demo tenant exists (rotate-key --name demo issues a new key)"
else
  docker exec "$MANAGER" add-tenant --name demo --gpu-memory 1536M --port "${GTM_DEMO_PORT:-30001}"
fi
docker exec "$MANAGER" list-tenants
cat <<TXT

console:         http://127.0.0.1:${GTM_CONSOLE_PORT:-8080}/  (user admin; password = the admin token below)
admin token:     docker exec $MANAGER cat /var/lib/gtm/admin-token   (REST API: /docs)
admin commands:  docker exec $MANAGER add-tenant --name companya --gpu-memory 1536M --port 30002
demo tenant:     http://127.0.0.1:${GTM_DEMO_PORT:-30001}/v1 with the API key printed above (OpenAI SDK, LangChain, curl)
TXT
