#!/usr/bin/env bash
# Runs the manager on a Docker Swarm (GTM_RUNTIME=swarm): on a swarm manager node, after
# `docker swarm init` there and `docker swarm join` on the other hosts. It deploys
# compose/swarm-stack.yml pinned to this node (its state volume lives here), waits until the manager
# answers, and prints how to reach it. The images must already be on every node, and the models at
# GTM_MODELS_PATH on every node. Safe to re-run. DOCKER_HOST may name the node's engine.
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
STACK=${GTM_SWARM_STACK:-gtm}
[ "$(docker info -f '{{.Swarm.ControlAvailable}}')" = true ] \
  || die "this Docker engine is not a swarm manager: run 'docker swarm init' here (and 'docker swarm join' on the other hosts)"
export GTM_MANAGER_NODE=${GTM_MANAGER_NODE:-$(docker info -f '{{.Swarm.NodeID}}')}
export GTM_MODELS_PATH=${GTM_MODELS_PATH:-/srv/gtm/models}
[ -d "$GTM_MODELS_PATH" ] || die "GTM_MODELS_PATH=$GTM_MODELS_PATH is not a directory: put the models there on every node"
log "deploying the manager (stack $STACK) on node $GTM_MANAGER_NODE"
detach=()  # newer CLIs ask whether to wait for the tasks; the loop below waits for health
docker stack deploy --help 2>/dev/null | grep -q -- --detach && detach=(--detach=true)
docker stack deploy "${detach[@]}" -c compose/swarm-stack.yml "$STACK" >/dev/null
service="${STACK}_manager"
for _ in $(seq 120); do
  id=$(docker ps -q -f "label=com.docker.swarm.service.name=$service" -f health=healthy | head -n1)
  [ -n "$id" ] && break; sleep 1
done
[ -n "${id:-}" ] || { docker service ps --no-trunc "$service" >&2; die "the manager did not become healthy"; }
# the node agents start with the manager: wait until every ready node's agent reports
ready=$(docker node ls --format '{{.Status}}' | grep -c '^Ready$')
count='import json, sys; print(len({d["device"]["node"] for d in json.load(sys.stdin).get("devices", [])}))'
for _ in $(seq 60); do
  reporting=$(docker exec "$id" capacity --json 2>/dev/null | docker exec -i "$id" python3 -c "$count" 2>/dev/null || echo 0)
  [ "$reporting" -ge "$ready" ] && break; sleep 1
done
docker exec "$id" capacity || die "the nodes' agents do not report (docker service ps ${GTM_INSTANCE:-gtm}-node-agent)"
[ "$reporting" -ge "$ready" ] || log "only $reporting of the $ready ready nodes report so far (docker service ps ${GTM_INSTANCE:-gtm}-node-agent)"
cat <<TXT

the manager runs in container $id on this node; its commands, as on one host:
  docker exec \$(docker ps -q -f label=com.docker.swarm.service.name=$service) add-tenant --name companya --gpu-memory 10G --port 30001
console: http://<this node>:${GTM_CONSOLE_PORT:-8080}/  (user admin; password: docker exec $id cat /var/lib/gtm/admin-token)
TXT
