#!/usr/bin/env bash
# Makes sure a Docker engine answers on this host.
# - Docker already answering: touches nothing.
# - Engine installed but not running (no systemd here): starts dockerd and waits.
# - Nothing installed: on Debian/Ubuntu as root, installs docker.io (+ compose, debootstrap).
source "$(dirname "$0")/lib.sh"

need_pkgs() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; } || missing+=(docker-compose)
  printf '%s\n' "${missing[@]}"
}

install_pkgs() {
  [ "$(id -u)" = 0 ] || die "installing $* needs root: run this script as root, or install them yourself"
  command -v apt-get >/dev/null || die "no apt-get: this script installs Docker on Debian/Ubuntu only; install a Docker engine by hand"
  log "installing: $*"
  apt-get update -q >/dev/null || die "apt-get update failed: is the Debian mirror reachable?"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}

start_dockerd() {
  [ "$(id -u)" = 0 ] || die "dockerd is installed but not running, and starting it needs root"
  log "starting dockerd (log: /var/log/dockerd.log)"
  (setsid dockerd >/var/log/dockerd.log 2>&1 &)
  for _ in $(seq 60); do
    # the marker lets the test suite know it may restart this dockerd (never a systemd-managed one)
    docker info >/dev/null 2>&1 && { touch /run/gtm-started-dockerd; return 0; }
    sleep 1
  done
  tail -20 /var/log/dockerd.log >&2
  die "dockerd did not answer within 60 s (see /var/log/dockerd.log)"
}

main() {
  mapfile -t pkgs < <(need_pkgs | sed '/^$/d')
  if docker info >/dev/null 2>&1 && [ ${#pkgs[@]} -eq 0 ]; then
    log "docker engine answers; nothing to do"; return 0
  fi
  [ ${#pkgs[@]} -eq 0 ] || install_pkgs "${pkgs[@]}"
  docker info >/dev/null 2>&1 || start_dockerd
  log "docker engine ready: server $(docker version -f '{{.Server.Version}}' 2>/dev/null)"
}
timed bootstrap main
