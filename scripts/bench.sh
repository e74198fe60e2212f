#!/usr/bin/env bash
# Benchmarks, each printing figures against a baseline measured in the same run.
#   scripts/bench.sh               gateway vs direct with a fast upstream (the proxy's own cost),
#                                  with a plain key and with a member's key (nested quotas)
#   scripts/bench.sh --real-engine also gateway vs direct in front of a real vLLM CPU engine
#   scripts/bench.sh --image [MB]  gateway vs direct for a chat request carrying one PNG of MB
#                                  megabytes (default 15): body, door check and cache salt
#   scripts/bench.sh --usage [N]   the manager's usage reads (/metrics, list-members, daily bars,
#                                  cost split) from the daily rollup vs every record, N records
#                                  (default 1,000,000), and what the rollup costs the collection
#   scripts/bench.sh --measure [N] measuring N engines' memory (default 8; what list-tenants, the
#                                  console, /metrics and admission do) at once vs one after another
#   scripts/bench.sh --wire        the gateway at wire speed: wrk drives direct, nginx, a minimal
#                                  Python pass-through and the gateway, each proxy alone on one
#                                  core: requests/s, CPU per request, added latency, per-chunk
#                                  streaming cost, and every answer metered once (installs wrk
#                                  and nginx-light from Debian when they are missing)
#   scripts/bench.sh --soak [MINUTES]
#                                  one tenant, 5 members x 4 workers of mixed load for MINUTES
#                                  (default 10) with a manager restart, a gateway SIGKILL, an
#                                  engine SIGKILL and a dockerd restart: every request reconciled
#                                  with the usage records, and each fault's outage
#   scripts/bench.sh --cpu-shares [N]
#                                  two tenants of one reservation, one flooding its engine with N
#                                  streams (default 8): the other's time to first token alone,
#                                  beside the flood with equal CPU shares, and with the flood's
#                                  --cpu-weight 2; the flood's tokens/s in both
#   scripts/bench.sh --real-model [N]
#                                  the quick start's real model (SmolLM2-135M GGUF): conversion
#                                  time, add-tenant -> first answer, first token and tokens/s of
#                                  one stream and of N at once (default 8), ratio to the one
#   scripts/bench.sh --engine-starts [N]
#                                  N engine starts through the manager (default 10): first-start
#                                  success rate and add-tenant -> first answer vs docker run; as
#                                  root it empties the page cache first (the hard case)
#   scripts/bench.sh --sleep [ROUNDS]
#                                  a sleeping tenant woken by a request vs a new tenant's
#                                  add-tenant -> first answer, ROUNDS times (default 3); then 10
#                                  tenants on room for 3 awake (overcommit) replay 5 minutes of
#                                  Poisson arrivals: served fraction, time to first token p50/p99
#   scripts/bench.sh --fairness [SEQS] [FLOOD]
#                                  one tenant's engine of SEQS sequences (default 8), two members:
#                                  quiet (one short stream every 2 s) beside flood (FLOOD long
#                                  streams, default 32): quiet's time to first token alone, with
#                                  --fair-queue off and on, and flood's tokens/s in both
#   scripts/bench.sh --gateway-vs-direct [CONCURRENCY]
#                                  vLLM's own load generator (vllm.benchmarks.serve) on the
#                                  tenant's network, alternating the tenant's gateway and the
#                                  engine directly: requests/s and time per output token of chat
#                                  streams, CONCURRENCY at once (default 8)
#   scripts/bench.sh --encrypted-volumes [MIB] [STARTS]
#                                  an encrypted volume's create and open times, MIB (default
#                                  512) written and read in the host's disk, a plain ext4 loop
#                                  image and an encrypted volume, and STARTS (default 2) engine
#                                  starts of a plain and an encrypted tenant (root, ext4 encryption)
source "$(dirname "$0")/lib.sh"
cd "$GTM_ROOT"
bash scripts/dev-env.sh >/dev/null
if [ "${1:-}" = "--encrypted-volumes" ]; then
  bash scripts/build-images.sh all >/dev/null
  bash scripts/make-demo-model.sh "$GTM_CACHE/models" >/dev/null
  exec .venv/bin/python -m bench.encrypted_volumes --file-mib "${2:-512}" --engine-starts "${3:-2}" \
    --models "$GTM_CACHE/models"
fi
if [ "${1:-}" = "--cpu-shares" ]; then
  bash scripts/build-images.sh all >/dev/null
  bash scripts/make-demo-model.sh "$GTM_CACHE/models" >/dev/null
  exec .venv/bin/python -m bench.cpu_shares --models "$GTM_CACHE/models" --flood "${2:-8}"
fi
if [ "${1:-}" = "--gateway-vs-direct" ]; then
  bash scripts/build-images.sh all >/dev/null
  bash scripts/make-demo-model.sh "$GTM_CACHE/models" >/dev/null
  exec .venv/bin/python -m bench.gateway_vs_direct --models "$GTM_CACHE/models" --concurrency "${2:-8}"
fi
if [ "${1:-}" = "--fairness" ]; then
  bash scripts/build-images.sh all >/dev/null
  bash scripts/make-demo-model.sh "$GTM_CACHE/models" >/dev/null
  exec .venv/bin/python -m bench.fairness --models "$GTM_CACHE/models" --seqs "${2:-8}" --flood "${3:-32}"
fi
if [ "${1:-}" = "--real-model" ]; then
  bash scripts/build-images.sh all >/dev/null
  exec .venv/bin/python -m bench.real_model --gguf "$(bash scripts/fetch-smollm2.sh)" --streams "${2:-8}"
fi
if [ "${1:-}" = "--engine-starts" ]; then
  bash scripts/build-images.sh all >/dev/null
  bash scripts/make-demo-model.sh "$GTM_CACHE/models" >/dev/null
  cold=(); [ "$(id -u)" = 0 ] && cold=(--cold)
  exec .venv/bin/python -m bench.engine_starts --starts "${2:-10}" --baseline 3 --models "$GTM_CACHE/models" "${cold[@]}"
fi
if [ "${1:-}" = "--sleep" ]; then
  bash scripts/build-images.sh all >/dev/null
  bash scripts/make-demo-model.sh "$GTM_CACHE/models" >/dev/null
  .venv/bin/python -m bench.sleep_bench --rounds "${2:-3}" --models "$GTM_CACHE/models"
  exec .venv/bin/python -m bench.sleep_trace --duration 300 --rate 1 --seed 1 --models "$GTM_CACHE/models"
fi
if [ "${1:-}" = "--wire" ]; then
  if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
    log "installing wrk and nginx-light (Debian packages) for the wire benchmark"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q wrk nginx-light >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q wrk nginx-light >/dev/null; }
  fi
  .venv/bin/pip install -q --group bench 2>&1 | { grep -v 'is ignored' || true; }
  exec .venv/bin/python -m bench.wire_bench
fi
if [ "${1:-}" = "--soak" ]; then
  bash scripts/up.sh >/dev/null
  exec .venv/bin/python -m bench.soak --minutes "${2:-10}"
fi
if [ "${1:-}" = "--measure" ]; then
  bash scripts/build-images.sh base >/dev/null
  exec .venv/bin/python -m bench.measure_engines --engines "${2:-8}"
fi
if [ "${1:-}" = "--image" ]; then
  exec .venv/bin/python -m bench.gateway_bench --image "${2:-15}"
fi
if [ "${1:-}" = "--usage" ]; then
  exec .venv/bin/python -m bench.usage_queries --records "${2:-1000000}"
fi
log "gateway vs direct, fast upstream"
.venv/bin/python -m bench.gateway_bench
log "gateway vs direct, fast upstream, a member's key (nested member and tenant quotas)"
.venv/bin/python -m bench.gateway_bench --members
if [ "${1:-}" = "--real-engine" ]; then
  bash scripts/build-images.sh engine >/dev/null
  bash scripts/make-demo-model.sh "$GTM_CACHE/models" >/dev/null
  name=gtmbench-engine-$$
  port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
  docker run -d --name "$name" --label org.gtm.managed=true --label org.gtm.instance=gtmbench \
    -p "127.0.0.1:$port:8000" -v "$GTM_CACHE/models":/models:ro --memory 1536m "$GTM_ENGINE_IMAGE" \
    --model /models/demo --served-model-name demo --host 0.0.0.0 --port 8000 --dtype bfloat16 --enforce-eager \
    --max-model-len 512 --kv-cache-memory-bytes 268435456 --distributed-executor-backend uni >/dev/null
  for _ in $(seq 120); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ] && break; sleep 2
  done
  log "gateway vs direct, real vLLM CPU engine"
  .venv/bin/python -m bench.gateway_bench --upstream "http://127.0.0.1:$port" --requests 200 --seconds 10 --concurrency 4
fi
