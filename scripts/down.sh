#!/usr/bin/env bash
# Stops the stack that scripts/up.sh started. Tenants' containers, networks and volumes
# (found by label), then the manager. With --purge also the state and models volumes
# (every tenant, key and usage record is lost).
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
instance=${GTM_INSTANCE:-gtm}
sel=(--filter "label=org.gtm.managed=true" --filter "label=org.gtm.instance=$instance")
docker stop -t 5 "${GTM_MANAGER_NAME:-manager}" >/dev/null 2>&1 || true   # no reconcile while we remove
ids=$(docker ps -aq "${sel[@]}"); [ -z "$ids" ] || docker rm -f $ids >/dev/null
ids=$(docker network ls -q "${sel[@]}"); [ -z "$ids" ] || docker network rm $ids >/dev/null
# encrypted volumes: unmounted, which takes their keys out of the kernel (up.sh's manager opens
# them again); with --purge, erased: image gone, and the wrapped keys go with the state volume
vdir=${GTM_VOLUMES_DIR:-/var/lib/gpu-tenant-manager/volumes}/$instance
if [ -d "$vdir" ]; then
  for m in "$vdir"/*/; do ! mountpoint -q "$m" || umount "$m" || log "could not unmount $m (in use?)"; done
  if [ "${1:-}" = "--purge" ]; then
    for img in "$vdir"/*.img; do
      [ -e "$img" ] || continue
      for dev in $(losetup -j "$img" -O NAME -n 2>/dev/null); do losetup -d "$dev" || true; done
      rm -f "$img"
    done
    find "$vdir" -mindepth 1 -maxdepth 1 -type d -empty -delete; rmdir "$vdir" 2>/dev/null || true
  fi
fi
if [ "${1:-}" = "--purge" ]; then
  ids=$(docker volume ls -q "${sel[@]}"); [ -z "$ids" ] || docker volume rm $ids >/dev/null
  compose -p "$GTM_COMPOSE_PROJECT" -f compose/docker-compose.yml down -v >/dev/null 2>&1
  docker volume rm "${GTM_MODELS_VOLUME:-gtm-models}" >/dev/null 2>&1 || true
else
  compose -p "$GTM_COMPOSE_PROJECT" -f compose/docker-compose.yml down >/dev/null 2>&1
fi
log "stack stopped${1:+ and purged}"
