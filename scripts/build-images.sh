#!/usr/bin/env bash
# Builds what the product runs on, reusing everything that is already there:
#   base image  debian:bookworm-slim: pulled where a registry answers, else made
#               with debootstrap + docker import (how Debian's own images are made)
#   wheelhouses pip download on the host (image builds never need PyPI or its TLS)
#   images      the CPU engine (real vLLM) and the manager/gateway image
# Usage: scripts/build-images.sh [base|wheels|engine|manager|all]   (default: all)
# On hosts where torch's CPU wheel is not on pip's find-links, set e.g.
#   GTM_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
source "$(dirname "$0")/lib.sh"
WHEELS=$GTM_CACHE/wheels
PIP_ARGS=${GTM_PIP_ARGS:-}

content_hash() { cat "$@" | sha256sum | cut -c1-16; }
image_hash() { docker image inspect -f '{{ index .Config.Labels "org.gtm.content-hash" }}' "$1" 2>/dev/null || true; }

# The Debian mirror the host's own apt uses for bookworm's main component, read the way apt-get
# reads its sources (one-line sources.list and deb822 .sources alike); GTM_DEBIAN_MIRROR overrides it.
debian_mirror() {
  if [ -n "${GTM_DEBIAN_MIRROR:-}" ]; then echo "$GTM_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(apt-get indextargets --no-release-info --format '$(RELEASE) $(COMPONENT) $(IDENTIFIER) $(REPO_URI)' \
    2>/dev/null | awk '$1 == "bookworm" && $2 == "main" && $3 == "Packages" { print $4; exit }')
  [ -n "$uri" ] || die "no Debian bookworm mirror in the host's apt sources: set GTM_DEBIAN_MIRROR to one"
  echo "$uri"
}

build_base() {
  if docker image inspect "$GTM_BASE_IMAGE" >/dev/null 2>&1; then log "base image $GTM_BASE_IMAGE present"; return; fi
  if timeout 60 docker pull "$GTM_BASE_IMAGE" >/dev/null 2>&1; then log "pulled $GTM_BASE_IMAGE"; return; fi
  log "no registry: making $GTM_BASE_IMAGE with debootstrap"
  command -v debootstrap >/dev/null || die "debootstrap missing: run scripts/bootstrap-host.sh"
  local mirror; mirror=$(debian_mirror)
  local root; root=$(mktemp -d /var/tmp/gtm-rootfs.XXXXXX)
  log "debootstrap from $mirror"
  debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null \
    || { rm -rf "$root"; die "debootstrap from $mirror failed: is it reachable? (GTM_DEBIAN_MIRROR names another)"; }
  tar -C "$root" -c . | docker import - "$GTM_BASE_IMAGE" >/dev/null
  rm -rf "$root"
}

# $1 name, $2 lock file: downloads exactly the locked wheels once per lock content.
fetch_wheels() {
  local dir=$WHEELS/$1 stamp; stamp=$(content_hash "$2")
  if [ -f "$dir/.done-$stamp" ]; then log "wheelhouse $1 cached"; return; fi
  mkdir -p "$dir"
  log "downloading wheelhouse $1"
  # shellcheck disable=SC2086
  pip download -q --no-deps --only-binary=:all: $PIP_ARGS -r "$2" -d "$dir" 2>&1 | { grep -v 'is ignored' || true; }
  touch "$dir/.done-$stamp"
}

# $1 image, $2 Dockerfile dir, $3 wheel dir, $4 hash, [$5 extra dir to copy into the context]
docker_build() {
  local ctx; ctx=$(mktemp -d "$GTM_CACHE/ctx.XXXXXX")
  cp "$2"/Dockerfile "$2"/requirements.lock "$ctx"/
  [ -z "${5:-}" ] || cp -r "$5" "$ctx"/
  cp -al "$3" "$ctx/wheels" 2>/dev/null || cp -r "$3" "$ctx/wheels"
  log "building $1"
  docker build --network host --build-arg BASE="$GTM_BASE_IMAGE" --label "org.gtm.content-hash=$4" \
    -t "$1" "$ctx" > "$GTM_CACHE/build-$(basename "$2").log" 2>&1 \
    || { rm -rf "$ctx"; tail -30 "$GTM_CACHE/build-$(basename "$2").log" >&2; die "building $1 failed (log above)"; }
  rm -rf "$ctx"
}

build_engine() {
  local dir=$GTM_ROOT/images/engine-cpu h
  h=$(content_hash "$dir/Dockerfile" "$dir/requirements.lock")
  if [ "$(image_hash "$GTM_ENGINE_IMAGE")" = "$h" ]; then log "$GTM_ENGINE_IMAGE up to date"; return; fi
  fetch_wheels engine "$dir/requirements.lock"
  docker_build "$GTM_ENGINE_IMAGE" "$dir" "$WHEELS/engine" "$h"
}

build_manager() {
  local dir=$GTM_ROOT/images/manager h
  h=$(cd "$GTM_ROOT" && content_hash images/manager/Dockerfile images/manager/requirements.lock pyproject.toml \
        $(find manager templates -type f | grep -v __pycache__ | sort))
  if [ "$(image_hash "$GTM_MANAGER_IMAGE")" = "$h" ]; then log "$GTM_MANAGER_IMAGE up to date"; return; fi
  fetch_wheels manager "$dir/requirements.lock"
  local wdir=$WHEELS/manager-$h
  rm -rf "$WHEELS"/manager-*; mkdir -p "$wdir"
  cp -al "$WHEELS/manager"/*.whl "$wdir"/
  pip wheel -q --no-deps "$GTM_ROOT" -w "$wdir" 2>&1 | { grep -v 'is ignored' || true; }
  docker_build "$GTM_MANAGER_IMAGE" "$dir" "$wdir" "$h" "$GTM_ROOT/templates"
}

mkdir -p "$GTM_CACHE"
case "${1:-all}" in
  base) timed base build_base ;;
  wheels) fetch_wheels engine "$GTM_ROOT/images/engine-cpu/requirements.lock"
          fetch_wheels manager "$GTM_ROOT/images/manager/requirements.lock" ;;
  engine) timed base build_base; timed engine-image build_engine ;;
  manager) timed base build_base; timed manager-image build_manager ;;
  all) timed base build_base; timed engine-image build_engine; timed manager-image build_manager ;;
  *) die "usage: $0 [base|wheels|engine|manager|all]" ;;
esac
