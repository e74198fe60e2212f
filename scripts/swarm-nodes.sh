#!/usr/bin/env bash
# A Docker Swarm of N nodes on this one machine, for the multi-host tests: each node is a dockerd of
# its own (data root, exec root, socket, containerd, cgroup parent) in a network namespace of its
# own, linked to the others by a bridge in one more namespace. Nodes talk over 127.10.0.<i>,
# loopback-range addresses routed only inside these namespaces; the system dockerd is not touched.
#
#   scripts/swarm-nodes.sh fetch        Docker >= 23 (Debian trixie's docker.io and containerd),
#                                       extracted, not installed, under $GTM_CACHE/swarm-docker
#   scripts/swarm-nodes.sh up [N] [IMAGE...]
#                                       start nodes 1..N (default 2), each with IMAGEs of the system
#                                       dockerd already in its store (seed); n1 inits, the rest join
#   scripts/swarm-nodes.sh load IMAGE   save IMAGE from the system dockerd once, load it on every node
#   scripts/swarm-nodes.sh cut I        node I's link to the others cut (a partition); what runs there runs on
#   scripts/swarm-nodes.sh kill I       a lost host: node I's link cut and its dockerd SIGKILLed; its
#                                       containers keep running, out of reach
#   scripts/swarm-nodes.sh start I      node I's link back, its dockerd started; its swarm state makes it rejoin
#   scripts/swarm-nodes.sh host I       the DOCKER_HOST of node I
#   scripts/swarm-nodes.sh socket       where each node's socket is inside its own mount namespace
#   scripts/swarm-nodes.sh down         stop every node (by PID), their containers and namespaces
#
# Why not the system dockerd: bookworm's 20.10 rejects a service with a generic resource and an
# overlay network (moby#44378, fixed in 23.0.2). The kernel here has no IPVS: services use dnsrr and
# host-mode ports. Needs root (namespaces, cgroups).
source "$(dirname "$0")/lib.sh"
SWARM_BASE=${GTM_SWARM_BASE:-/run/gtm-swarm}
SWARM_DOCKER=${GTM_SWARM_DOCKER:-$GTM_CACHE/swarm-docker}
BRIDGE_NS=gtmsw-br
NODE_RUN=/run/gtm-swarm-node
# each node's dockerd log, kept outside $SWARM_BASE so that it outlives `down` (a node that died)
SWARM_LOGS=${GTM_SWARM_LOGS:-/var/log/gtm-swarm}

# the nodes' data roots: inside the system dockerd's root, on the same mount as its image layers,
# which the nodes' stores hard-link (see seed); the system dockerd reads only its own entries there
swarm_data() { echo "${GTM_SWARM_DATA:-$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)/gtm-swarm-nodes}"; }
node_ns() { echo "gtmsw-n$1"; }
node_addr() { echo "127.10.0.$1"; }
node_sock() { echo "unix://$SWARM_BASE/n$1/docker.sock"; }
on_node() { local i=$1; shift; PATH="$SWARM_DOCKER/usr/bin:$PATH" docker -H "$(node_sock "$i")" "$@"; }

fetch() {
  [ -x "$SWARM_DOCKER/usr/sbin/dockerd" ] && return 0
  local apt=$GTM_CACHE/swarm-apt
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs" "$SWARM_DOCKER.part"
  local mirror
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror:-http://deb.debian.org/debian} trixie main" \
    >"$apt/trixie.list"
  printf 'Dir::Etc::sourcelist "%s";\nDir::Etc::sourceparts "-";\nDir::State::Lists "%s";\nDir::State::status "%s";\nDir::Cache "%s";\n' \
    "$apt/trixie.list" "$apt/lists" "$apt/status" "$apt/cache" >"$apt/apt.conf"
  touch "$apt/status"
  log "fetching Docker from Debian trixie (docker.io, containerd) into $SWARM_DOCKER"
  APT_CONFIG=$apt/apt.conf apt-get -qq update
  (cd "$apt/debs" && APT_CONFIG=$apt/apt.conf apt-get -qq download docker.io containerd)
  for deb in "$apt"/debs/*.deb; do dpkg-deb -x "$deb" "$SWARM_DOCKER.part"; done
  rm -rf "$SWARM_DOCKER" && mv "$SWARM_DOCKER.part" "$SWARM_DOCKER"
  "$SWARM_DOCKER/usr/sbin/dockerd" --version >&2
}

start_node() {
  local i=$1 dir=$SWARM_BASE/n$1 data; data=$(swarm_data)/n$1
  mkdir -p "$data" "$dir/exec" "$SWARM_LOGS"
  echo "--- gtm: node n$i starting, $(date -u +%FT%TZ)" >>"$SWARM_LOGS/n$i-dockerd.log"
  echo '{}' >"$dir/daemon.json"
  # a private mount namespace: the node's container mounts stay out of the host's table; in it a
  # tmpfs of its own at $NODE_RUN, where the node's socket has the same path on every node (what a
  # global service, the node agents, mounts: GTM_DOCKER_SOCKET)
  mkdir -p "$NODE_RUN"
  setsid nsenter --net="/run/netns/$(node_ns "$i")" -- unshare --mount --propagation slave -- \
    sh -c 'mount -t tmpfs -o size=1m,mode=0755 tmpfs "$0" && exec "$@"' "$NODE_RUN" \
    env PATH="$SWARM_DOCKER/usr/bin:$SWARM_DOCKER/usr/sbin:$PATH" dockerd --config-file "$dir/daemon.json" \
      --data-root "$data" --exec-root "$dir/exec" --pidfile "$dir/docker.pid" -H "$(node_sock "$i")" \
      -H "unix://$NODE_RUN/docker.sock" \
      --containerd-namespace "gtmsw-n$i" --containerd-plugins-namespace "gtmsw-n$i-plugins" \
      --cgroup-parent "/gtmsw-n$i" --iptables=false --ip-masq=false --bridge=none \
      --swarm-default-advertise-addr "$(node_addr "$i")" --label "gtm.swarm-node=n$i" \
      ${GTM_SWARM_GENERIC:+$(for g in $GTM_SWARM_GENERIC; do echo --node-generic-resource "${g//@/$i}"; done)} \
      >>"$SWARM_LOGS/n$i-dockerd.log" 2>&1 </dev/null &
  echo $! >"$dir/launcher.pid"
  for _ in $(seq 1 120); do
    on_node "$i" info >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  tail -20 "$SWARM_LOGS/n$i-dockerd.log" >&2
  die "swarm node n$i did not start (see $SWARM_LOGS/n$i-dockerd.log)"
}

# Puts IMAGEs of the system dockerd into a node's data root before its dockerd starts: the image's
# config and layer records copied, its layers' files hard-linked (overlay2 never writes to an image
# layer), which takes seconds where `load` unpacks gigabytes. Needs overlay2 and both data roots on
# one mount (a hard link never crosses one); otherwise the caller loads instead (returns 1).
seed() {
  local data=$1; shift
  local src; src=$(docker info -f '{{.DockerRootDir}}' 2>/dev/null)
  [ "$(docker info -f '{{.Driver}}' 2>/dev/null)" = overlay2 ] || return 1
  mkdir -p "$data/overlay2/l" "$data/image/overlay2/imagedb/content/sha256" "$data/image/overlay2/layerdb/sha256"
  ln "$src/image/overlay2/repositories.json" "$data/.link-probe" 2>/dev/null || return 1
  rm -f "$data/.link-probe"
  local image id chain diff cache link
  for image in "$@"; do
    id=$(docker image inspect -f '{{.Id}}' "$image") || return 1
    id=${id#sha256:}
    cp -a "$src/image/overlay2/imagedb/content/sha256/$id" "$data/image/overlay2/imagedb/content/sha256/" || return 1
    chain=
    for diff in $(docker image inspect -f '{{range .RootFS.Layers}}{{.}} {{end}}' "$image"); do
      # a layer's chain ID: its diff ID alone at the bottom, else sha256("<parent chain> <diff>")
      if [ -z "$chain" ]; then chain=$diff; else chain=sha256:$(printf '%s %s' "$chain" "$diff" | sha256sum | cut -d' ' -f1); fi
      [ -d "$data/image/overlay2/layerdb/sha256/${chain#sha256:}" ] && continue
      cache=$(cat "$src/image/overlay2/layerdb/sha256/${chain#sha256:}/cache-id") || return 1
      link=$(cat "$src/overlay2/$cache/link") || return 1
      cp -al "$src/overlay2/$cache" "$data/overlay2/$cache" || return 1
      cp -a "$src/overlay2/l/$link" "$data/overlay2/l/$link" || return 1
      cp -a "$src/image/overlay2/layerdb/sha256/${chain#sha256:}" "$data/image/overlay2/layerdb/sha256/" || return 1
    done
  done
}

up() {
  local n=${1:-2}; shift || true
  local images=("$@") seeded=1
  fetch
  mkdir -p "$SWARM_LOGS"
  ip netns add $BRIDGE_NS
  ip -n $BRIDGE_NS link set lo up
  ip -n $BRIDGE_NS link add br0 type bridge
  ip -n $BRIDGE_NS link set br0 up
  for i in $(seq 1 "$n"); do
    local ns; ns=$(node_ns "$i")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add eth0 type veth peer name "p$i" netns $BRIDGE_NS
    ip -n $BRIDGE_NS link set "p$i" master br0 up
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.default.route_localnet=1
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.eth0.route_localnet=1
    # 127.10.0.0/24 leaves by eth0 rather than lo's "local 127.0.0.0/8", in this namespace only
    ip -n "$ns" route add unicast 127.10.0.0/24 dev eth0 table local src "$(node_addr "$i")"
    : >"$SWARM_LOGS/n$i-dockerd.log"
    [ ${#images[@]} -eq 0 ] || seed "$(swarm_data)/n$i" "${images[@]}" || { seeded=0; rm -rf "$(swarm_data)/n$i"; }
    start_node "$i"
    [ ${#images[@]} -eq 0 ] || [ $seeded = 0 ] || for image in "${images[@]}"; do
      on_node "$i" tag "$(docker image inspect -f '{{.Id}}' "$image")" "$image"
    done
  done
  [ $seeded = 1 ] || for image in "${images[@]}"; do log "seeding failed: loading $image instead"; load "$image"; done
  on_node 1 swarm init --advertise-addr "$(node_addr 1):2377" --listen-addr "$(node_addr 1):2377" \
    --data-path-port 4790 >/dev/null
  local token; token=$(on_node 1 swarm join-token -q worker)
  for i in $(seq 2 "$n"); do
    on_node "$i" swarm join --token "$token" --advertise-addr "$(node_addr "$i"):2377" \
      --listen-addr "$(node_addr "$i"):2377" "$(node_addr 1):2377" >/dev/null
  done
  on_node 1 node ls >&2
}

load() {
  local image=$1 tar
  # saved once per image ID (the system dockerd is only read)
  tar=$GTM_CACHE/swarm-images/$(docker image inspect -f '{{.Id}}' "$image" | tr -d ':').tar
  mkdir -p "$GTM_CACHE/swarm-images"
  find "$GTM_CACHE/swarm-images" -name '*.tar' -mtime +7 -delete  # images of builds long gone
  [ -s "$tar" ] || { docker save -o "$tar.part" "$image" && mv "$tar.part" "$tar"; }
  local pids=()
  for dir in "$SWARM_BASE"/n*/; do
    local i; i=$(basename "$dir"); i=${i#n}
    on_node "$i" load -q -i "$tar" >/dev/null &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || die "loading $image on a swarm node failed"; done
}

# the node's end of the bridge down: nothing reaches the node, nor its containers, which still run
cut_node() { ip -n $BRIDGE_NS link set "p$1" down; }

kill_node() {
  cut_node "$1"
  kill -KILL "$(cat "$SWARM_BASE/n$1/docker.pid")"
}

down() {
  local pids=()
  for dir in "$SWARM_BASE"/n*/; do
    [ -f "$dir/launcher.pid" ] || continue
    local i; i=$(basename "$dir"); i=${i#n}
    if on_node "$i" info >/dev/null 2>&1; then  # containers first: their shims outlive dockerd
      local ids; ids=$(on_node "$i" ps -aq 2>/dev/null || true)
      [ -z "$ids" ] || on_node "$i" rm -f $ids >/dev/null 2>&1 || true
    fi
    pids+=("$(cat "$dir/launcher.pid")")
    rm -f "$dir/launcher.pid"
  done
  # the nodes' state is thrown away: no clean shutdown is owed to it
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  # their containerds and shims (found by the nodes' exec roots), then containers of a killed
  # node (found by its cgroup parent)
  for p in $(pgrep -f "containerd.*$SWARM_BASE/" || true); do kill -KILL "$p" 2>/dev/null || true; done
  for p in $(cat /sys/fs/cgroup/gtmsw-n*/*/cgroup.procs /sys/fs/cgroup/*/gtmsw-n*/*/cgroup.procs 2>/dev/null); do
    kill -KILL "$p" 2>/dev/null || true
  done
  for ns in $BRIDGE_NS $(ip netns list | awk '{print $1}' | grep -E '^gtmsw-n[0-9]+$' || true); do
    ip netns list | grep -qw "$ns" && ip netns del "$ns"
  done
  sleep 1
  for c in /sys/fs/cgroup/gtmsw-n* /sys/fs/cgroup/*/gtmsw-n*; do
    [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  # mounts of the nodes' data roots made outside their own mount namespaces, if any
  local data; data=$(swarm_data)
  findmnt -rn -o TARGET | grep -E "^($SWARM_BASE|$data)/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$SWARM_BASE" "$data"
}

case "${1:-}" in
  fetch) fetch ;;
  up) shift; up "$@" ;;
  load) load "$2" ;;
  cut) cut_node "$2" ;;
  kill) kill_node "$2" ;;
  start) ip -n $BRIDGE_NS link set "p$2" up && start_node "$2" ;;
  host) node_sock "$2" ;;
  socket) echo "$NODE_RUN/docker.sock" ;;
  down) down ;;
  *) echo "usage: $0 fetch | up [N] [IMAGE...] | load IMAGE | cut I | kill I | start I | host I | socket | down" >&2; exit 2 ;;
esac
