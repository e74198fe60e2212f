"""Noisy neighbours: a quiet member's time to first token while another floods, with the gateway's
fair queuing off and on; then the same across two tenants' engines, with and without CPU weights.

    .venv/bin/python -m bench.fairness --models DIR [--seqs 8] [--flood 32] [--requests 20]

One run, one machine: a manager (in-process, real Docker, real vLLM CPU engines of the demo
model). One tenant whose engine runs ``--seqs`` sequences at once, with two members: "quiet"
sends one short streamed request every 2 s, "flood" keeps ``--flood`` long streams open (four
times the engine's sequences by default). Quiet's time to first token (p50, p99): alone (the
baseline), beside the flood with ``--fair-queue`` off (first come, first served in the engine),
and beside it with fair queuing on; flood's tokens/s in both. Goals: quiet's p99 with fair
queuing at most 1.5x its p99 alone, and flood keeping at least 0.9 of its tokens/s.

The two-tenant half is ``bench.cpu_shares`` (``scripts/bench.sh --cpu-shares``), whose figures
the README reports beside these.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import openai

from bench.cpu_shares import flood
from bench.engine_starts import bench_manager, free_port
from bench.real_model import one_stream
from bench.sleep_bench import wait_status
from bench.sleep_trace import quantile

MODEL = "demo"
HELLO = [{"role": "user", "content": "hello there"}]
QUIET_EVERY_S = 2.0
P99_GOAL = 1.5
THROUGHPUT_GOAL = 0.9


def quiet_run(client: openai.OpenAI, requests: int) -> list[float]:
    """Quiet's times to first token: one short stream every ``QUIET_EVERY_S``."""
    out = []
    for _ in range(requests):
        started = time.monotonic()
        out.append(one_stream(client, MODEL, 8, HELLO)[0])
        time.sleep(max(QUIET_EVERY_S - (time.monotonic() - started), 0))
    return [x for x in out if x == x]  # a stream that wrote no token has no first token


def beside_flood(quiet: openai.OpenAI, noisy: openai.OpenAI, streams: int, requests: int) -> tuple[list[float], float]:
    """Quiet's times to first token while the flood runs, and the flood's tokens/s meanwhile."""
    stop, tokens = threading.Event(), list[int]()
    threads = flood(noisy, streams, stop, tokens)
    time.sleep(5)  # the flood fills the engine and the queue first
    counted_from, before = time.monotonic(), sum(tokens)
    out = quiet_run(quiet, requests)
    rate = (sum(tokens) - before) / (time.monotonic() - counted_from)
    stop.set()
    for t in threads:
        t.join(120)
    return out, rate


def ms(values: list[float], q: float) -> float:
    return quantile(values, q) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--seqs", type=int, default=8, help="the engine's --max-num-seqs")
    parser.add_argument("--flood", type=int, default=32, help="flood's streams open at once")
    parser.add_argument("--requests", type=int, default=20, help="quiet's requests in each phase")
    args = parser.parse_args()

    with bench_manager(args.models) as (_, api, _client):
        port = free_port()
        body = {
            "name": "lab", "gpu_memory": "1536M", "port": port, "model": MODEL, "max_model_len": 512,
            "max_num_seqs": args.seqs,
        }  # fmt: skip
        added = api.post("/api/v1/tenants", json=body)
        assert added.status_code == 201, added.text
        quiet_key = added.json()["key"]["api_key"]
        member = api.post("/api/v1/tenants/lab/members", json={"name": "flood"})
        assert member.status_code == 201, member.text
        flood_key = member.json()["key"]["api_key"]
        wait_status(api, "lab", "running", 600)
        base = f"http://127.0.0.1:{port}/v1"
        quiet = openai.OpenAI(base_url=base, api_key=quiet_key, max_retries=2, timeout=600)
        noisy = openai.OpenAI(base_url=base, api_key=flood_key, max_retries=2, timeout=600)
        for c in (quiet, noisy):  # the flood's key reaches the gateway with its next config push
            for _ in range(60):
                try:
                    one_stream(c, MODEL, 4, HELLO)
                    break
                except openai.AuthenticationError:
                    time.sleep(0.5)
        alone = quiet_run(quiet, args.requests)

        def fair(on: bool) -> None:
            r = api.patch("/api/v1/tenants/lab", json={"fair_queue": on})
            assert r.status_code == 200, r.text
            time.sleep(2)  # the gateway's config is pushed live (no engine restart)

        fair(False)
        off, flood_off = beside_flood(quiet, noisy, args.flood, args.requests)
        fair(True)
        on, flood_on = beside_flood(quiet, noisy, args.flood, args.requests)
        metrics = api.get("/metrics").text  # the admin token, as a Prometheus job sends it
        print(
            f"one tenant, engine of {args.seqs} sequences; quiet: one 8-token stream every {QUIET_EVERY_S:.0f} s, "
            f"{args.requests} each phase; flood: {args.flood} streams of 200 tokens"
        )
        print("quiet's time to first token (p50 / p99):")
        print(f"  alone (baseline):             {ms(alone, 0.5):7.0f} / {ms(alone, 0.99):7.0f} ms")
        print(f"  beside the flood, fair off:   {ms(off, 0.5):7.0f} / {ms(off, 0.99):7.0f} ms")
        print(f"  beside the flood, fair on:    {ms(on, 0.5):7.0f} / {ms(on, 0.99):7.0f} ms")
        p99_ratio = ms(on, 0.99) / ms(alone, 0.99)
        kept = flood_on / flood_off if flood_off else float("nan")
        print(
            f"ratio to alone, p99: fair off {ms(off, 0.99) / ms(alone, 0.99):.2f}, fair on {p99_ratio:.2f} "
            f"(goal <= {P99_GOAL}: {'met' if p99_ratio <= P99_GOAL else 'missed'})"
        )
        print(
            f"flood's tokens/s: fair off {flood_off:.1f}, fair on {flood_on:.1f}, kept {kept:.2f} "
            f"(goal >= {THROUGHPUT_GOAL}: {'met' if kept >= THROUGHPUT_GOAL else 'missed'})"
        )
        wanted = ("gtm_tenant_time_to_first_token", "gtm_tenant_queue_seconds")
        lines = [ln for ln in metrics.splitlines() if ln.startswith(wanted)]
        print("the manager's /metrics, last hour:", *lines, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
