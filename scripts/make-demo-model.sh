#!/usr/bin/env bash
# Writes the demo model into TARGET/demo, where TARGET is a Docker volume name
# (the compose stack's models volume) or an absolute host path (tests).
# Runs the generator inside the engine image; does nothing if the model is there.
# Usage: scripts/make-demo-model.sh TARGET
source "$(dirname "$0")/lib.sh"
target=${1:?usage: make-demo-model.sh VOLUME_OR_ABSOLUTE_PATH}
docker image inspect "$GTM_ENGINE_IMAGE" >/dev/null 2>&1 || die "$GTM_ENGINE_IMAGE missing: run scripts/build-images.sh engine"
[[ $target == /* ]] && mkdir -p "$target"
if docker run --rm --network none -v "$target":/models:ro --entrypoint test "$GTM_ENGINE_IMAGE" \
     -f /models/demo/model.safetensors; then
  log "demo model present in $target"; exit 0
fi
log "generating the demo model into $target"
docker run --rm --network none --user 0:0 -v "$target":/models \
  -v "$GTM_ROOT/scripts/make-demo-model.py":/gen.py:ro -e HOME=/tmp \
  --entrypoint python3 "$GTM_ENGINE_IMAGE" /gen.py /models/demo >/dev/null 2>&1 \
  || die "generating the demo model failed"
docker run --rm --network none --user 0:0 -v "$target":/models --entrypoint chmod "$GTM_ENGINE_IMAGE" -R a+rX /models
log "demo model ready in $target"
