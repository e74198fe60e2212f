#!/usr/bin/env bash
# Prepares this host for encrypted tenant volumes (add-tenant --volume encrypted:/data), once:
# - the volumes directory a shared mount, so that a volume the manager mounts inside its
#   container reaches the host, and Docker can bind it into the tenant's engine (on a host whose
#   / is a private mount, Docker refuses rshared propagation until it is one);
# - the host's key-encryption key, made once (base64 of 32 random bytes, root only), kept off the
#   state volume: the manager gets it as a Docker secret. Keep a copy of it apart from this disk:
#   without it no encrypted volume opens again.
# Exits non-zero, saying why, where the kernel cannot (no ext4 encryption, no loop devices).
# Safe to re-run; after a reboot, re-run it (or scripts/up.sh) where / is a private mount.
source "$(dirname "$0")/lib.sh"
dir=${GTM_VOLUMES_DIR:-/var/lib/gpu-tenant-manager/volumes}
key=${GTM_VOLUME_KEY_FILE_HOST:-/etc/gpu-tenant-manager/volume-keys}
[ -e /sys/fs/ext4/features/encryption ] || { log "this kernel's ext4 cannot encrypt (CONFIG_FS_ENCRYPTION)"; exit 1; }
[ -e /dev/loop-control ] || { log "this kernel has no loop devices (/dev/loop-control)"; exit 1; }
[ "$(id -u)" = 0 ] || { log "preparing $dir and $key needs root"; exit 1; }
mkdir -p "$dir"
mountpoint -q "$dir" || mount --bind "$dir" "$dir"
mount --make-shared "$dir"
if [ ! -s "$key" ]; then
  mkdir -p "$(dirname "$key")"
  (umask 077; head -c 32 /dev/urandom | base64 >"$key")
  log "made the host's volume key-encryption key: $key (keep a copy apart from this disk)"
fi
chmod 600 "$key"
