"""Two tenants on one host, one flooding its engine: what CPU shares (``--cpu-weight``) do for the
other's time to first token.

    .venv/bin/python -m bench.cpu_shares --models DIR [--flood 8] [--requests 20]

One run, one machine: a manager (in-process, real Docker, real vLLM CPU engines of the demo
model) with two tenants of the same reservation. "quiet" sends one short streamed request at a
time, "flood" keeps ``--flood`` long streams open. Quiet's time to first token (p50, p99):
alone (the baseline), beside the flood with equal shares (both reservations alike), and beside
the flood once the admin gives flood ``--cpu-weight 2``; and flood's tokens/s in both.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import openai

from bench.engine_starts import bench_manager, free_port
from bench.real_model import one_stream
from bench.sleep_bench import wait_status
from bench.sleep_trace import quantile

MODEL = "demo"
HELLO = [{"role": "user", "content": "hello there"}]


def ttft(client: openai.OpenAI, max_tokens: int) -> tuple[float, int]:
    """Seconds to the first token of one streamed answer, and the tokens it wrote."""
    first, tokens, _ = one_stream(client, MODEL, max_tokens, HELLO)
    return first, tokens


def quiet_run(client: openai.OpenAI, requests: int) -> list[float]:
    out = []
    for _ in range(requests):
        out.append(ttft(client, 8)[0])
        time.sleep(0.3)
    return [x for x in out if x == x]  # a stream that wrote no token has no first token


def flood(client: openai.OpenAI, streams: int, stop: threading.Event, tokens: list[int]) -> list[threading.Thread]:
    def loop() -> None:
        while not stop.is_set():
            try:
                tokens.append(ttft(client, 200)[1])
            except openai.OpenAIError:
                time.sleep(0.2)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    return threads


def p(values: list[float], q: float) -> float:
    """A quantile in milliseconds."""
    return quantile(values, q) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--flood", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each flood phase lasts at least")
    args = parser.parse_args()

    with bench_manager(args.models) as (_, api, _client):
        keys, clients = {}, {}
        for name in ("quiet", "flood"):
            port = free_port()
            body = {"name": name, "gpu_memory": "1536M", "port": port, "model": MODEL, "max_model_len": 512}
            added = api.post("/api/v1/tenants", json=body)
            assert added.status_code == 201, added.text
            keys[name] = added.json()["key"]["api_key"]
            clients[name] = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[name], max_retries=2, timeout=600
            )
        for name in ("quiet", "flood"):
            wait_status(api, name, "running", 600)
        ttft(clients["quiet"], 4)
        ttft(clients["flood"], 4)
        alone = quiet_run(clients["quiet"], args.requests)

        def beside_flood() -> tuple[list[float], float]:
            stop, tokens = threading.Event(), list[int]()
            started = time.monotonic()
            threads = flood(clients["flood"], args.flood, stop, tokens)
            time.sleep(3)  # the flood fills its engine first
            quiet = quiet_run(clients["quiet"], args.requests)
            while time.monotonic() - started < args.seconds:
                time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(60)
            return quiet, sum(tokens) / (time.monotonic() - started)

        equal, flood_equal = beside_flood()
        assert api.patch("/api/v1/tenants/flood", json={"cpu_weight": 2}).status_code == 200
        time.sleep(2)
        wait_status(api, "flood", "running", 600)
        ttft(clients["flood"], 4)
        weighted, flood_weighted = beside_flood()
        print(f"quiet's time to first token, {args.requests} requests each (p50 / p99):")
        print(f"  alone (baseline):                     {p(alone, 0.5):7.0f} / {p(alone, 0.99):7.0f} ms")
        print(f"  beside {args.flood} flood streams, equal shares: {p(equal, 0.5):7.0f} / {p(equal, 0.99):7.0f} ms")
        print(f"  beside the flood, flood --cpu-weight 2:  {p(weighted, 0.5):7.0f} / {p(weighted, 0.99):7.0f} ms")
        print(
            f"ratio to alone, p99: equal {p(equal, 0.99) / p(alone, 0.99):.2f}, "
            f"weighted {p(weighted, 0.99) / p(alone, 0.99):.2f}"
        )
        print(
            f"flood's tokens/s: equal {flood_equal:.1f}, weighted {flood_weighted:.1f} "
            f"(ratio {flood_weighted / flood_equal:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
