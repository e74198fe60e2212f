#!/usr/bin/env bash
# Writes the demo models into TARGET/demo (text) and TARGET/demo-vl (images and text), where
# TARGET is a Docker volume name (the compose stack's models volume) or an absolute host path
# (tests). Runs the generator inside the engine image; a model already there (its last file,
# gtm-origin.json, written) is kept.
# Usage: scripts/make-demo-model.sh TARGET
source "$(dirname "$0")/lib.sh"
target=${1:?usage: make-demo-model.sh VOLUME_OR_ABSOLUTE_PATH}
docker image inspect "$GTM_ENGINE_IMAGE" >/dev/null 2>&1 || die "$GTM_ENGINE_IMAGE missing: run scripts/build-images.sh engine"
[[ $target == /* ]] && mkdir -p "$target"
in_engine() { docker run --rm --network none "$@"; }
for pair in demo:text demo-vl:vision; do
  name=${pair%%:*} kind=${pair#*:}
  if in_engine -v "$target":/models:ro --entrypoint test "$GTM_ENGINE_IMAGE" -f "/models/$name/gtm-origin.json"; then
    log "demo model $name present in $target"; continue
  fi
  log "generating the demo model $name into $target"
  # written under a temporary name and renamed: a model is all there or absent
  in_engine --user 0:0 -v "$target":/models -v "$GTM_ROOT/scripts/make-demo-model.py":/gen.py:ro -e HOME=/tmp \
    --entrypoint sh "$GTM_ENGINE_IMAGE" -c \
    "rm -rf /models/.gen-$name && python3 /gen.py /models/.gen-$name $kind && rm -rf /models/$name && mv /models/.gen-$name /models/$name" \
    >/dev/null 2>&1 || die "generating the demo model $name failed"
done
in_engine --user 0:0 -v "$target":/models --entrypoint chmod "$GTM_ENGINE_IMAGE" -R a+rX /models
log "demo models ready in $target"
