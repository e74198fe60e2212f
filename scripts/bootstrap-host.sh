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

# The system dockerd's pid files (node dockerds of swarm-nodes.sh keep theirs elsewhere).
DOCKERD_PIDFILE=/var/run/docker.pid
CONTAINERD_PIDFILE=/var/run/docker/containerd/containerd.pid

# Prints the pid in pid file $1 when that process runs and is named $2. A zombie does not run,
# though dockerd takes one for a live process: a dead dockerd's containerd, say, not yet reaped.
running() {
  local pid stat
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  # /proc/PID/stat: "PID (NAME) STATE ..."
  [[ "$stat" == *") "[!Z]" "* ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

# What a dockerd killed a moment ago leaves can stop the next one: its pid file while it still
# exits ("pid file found"), or its containerd (alive, or a zombie), which the next dockerd reuses
# and, as that never answers, waits on for 15 s and gives up. Returns 1 when a dockerd answers
# meanwhile.
settle_leftovers() {
  local pid
  for _ in $(seq 60); do
    running "$DOCKERD_PIDFILE" dockerd >/dev/null || break
    docker info >/dev/null 2>&1 && return 1
    sleep 1
  done
  pid=$(running "$DOCKERD_PIDFILE" dockerd) \
    && die "dockerd (pid $pid) runs but has not answered for 60 s: stop it (kill $pid) and run this again"
  rm -f "$DOCKERD_PIDFILE"
  if pid=$(running "$CONTAINERD_PIDFILE" containerd); then
    log "stopping containerd (pid $pid), left by a dockerd that has exited"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 15); do running "$CONTAINERD_PIDFILE" containerd >/dev/null || break; sleep 1; done
    ! running "$CONTAINERD_PIDFILE" containerd >/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$CONTAINERD_PIDFILE"
}

start_dockerd() {
  [ "$(id -u)" = 0 ] || die "dockerd is installed but not running, and starting it needs root"
  local try i
  for try in 1 2 3; do
    settle_leftovers || return 0
    log "starting dockerd, try $try of 3 (log: /var/log/dockerd.log)"
    echo "--- gtm: starting dockerd, $(date -u +%FT%TZ)" >>/var/log/dockerd.log
    (setsid dockerd >>/var/log/dockerd.log 2>&1 </dev/null &)
    for i in $(seq 90); do
      sleep 1
      # the marker lets the test suite know it may restart this dockerd (never a systemd-managed one)
      docker info >/dev/null 2>&1 && { touch /run/gtm-started-dockerd; return 0; }
      # gave up: it writes its pid file within a second of starting
      [ "$i" -ge 5 ] && ! running "$DOCKERD_PIDFILE" dockerd >/dev/null && break
    done
    tail -5 /var/log/dockerd.log >&2
  done
  die "dockerd did not start in 3 tries (see /var/log/dockerd.log)"
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
