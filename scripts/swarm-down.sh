#!/usr/bin/env bash
# Stops what scripts/swarm-up.sh started, on the same swarm manager node: the manager first (it
# would replace what goes), then every service it made (tenants' engines and gateways, the node
# agents), then the stack and its control network. Volumes stay: the manager's state on this node,
# each tenant's on its node (remove them there with `docker volume rm` to lose them). Safe to
# re-run. DOCKER_HOST may name the node's engine.
source "$(dirname "$0")/lib.sh"
STACK=${GTM_SWARM_STACK:-gtm}
ours=(-f "label=org.gtm.managed=true" -f "label=org.gtm.instance=${GTM_INSTANCE:-gtm}")  # what the manager made
gone() {  # waits until no service matches and no task of them runs here
  for _ in $(seq 60); do
    [ -z "$(docker service ls -q "$@")" ] && [ -z "$(docker ps -q "$@")" ] && return 0
    sleep 1
  done
  die "services still there: $(docker service ls "$@" --format '{{.Name}}' | tr '\n' ' ')"
}
docker service rm "${STACK}_manager" >/dev/null 2>&1 || true
gone -f "label=com.docker.stack.namespace=$STACK"
ids=$(docker service ls -q "${ours[@]}")
[ -z "$ids" ] || docker service rm $ids >/dev/null
gone "${ours[@]}"
# networks go once no task on any node uses them (other nodes detach theirs a moment later)
for _ in $(seq 30); do
  nets=$(docker network ls -q "${ours[@]}")
  [ -z "$nets" ] || docker network rm $nets >/dev/null 2>&1 || true
  docker stack rm "$STACK" >/dev/null 2>&1 || true
  [ -z "$(docker network ls -q "${ours[@]}")" ] \
    && [ -z "$(docker network ls -q -f "label=com.docker.stack.namespace=$STACK")" ] && break
  sleep 1
done
left=$(docker network ls -f "label=com.docker.stack.namespace=$STACK" --format '{{.Name}}'
  docker network ls "${ours[@]}" --format '{{.Name}}')
left=$(echo $left)
[ -z "$left" ] || die "networks still in use: $left (run this again once their tasks have stopped)"
log "the manager's stack $STACK and its services are stopped (volumes kept)"
