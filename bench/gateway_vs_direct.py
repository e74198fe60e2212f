"""The gateway's own cost on real streams, measured with vLLM's own load generator.

    .venv/bin/python -m bench.gateway_vs_direct --models DIR [--concurrency 8] [--prompts 200] [--rounds 2]

One run, one machine: a manager (in-process, real Docker, a real vLLM CPU engine of the demo
model) with one tenant. vLLM's ``vllm.benchmarks.serve`` runs in a one-off container of the
engine image on the tenant's own network, and alternates between the tenant's gateway (its
public port, with the tenant's key) and the engine directly (``engine:8000``): chat streams of
random prompts, ``--concurrency`` at once, 32 tokens in and out, ``ignore_eos``. Printed per
round: requests/s, median time per output token and to first token, and the CPU time the gateway's
and the engine's containers took per request (their cgroups'); then the gateway's requests/s as
a fraction of direct's (goal: at least 0.9 at 8 streams). A third path, "direct+usage", asks the
engine directly for the running usage the gateway asks for in every chunk
(``continuous_usage_stats``): the engine's share of the gateway's cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import docker

from bench.engine_starts import bench_manager, free_port
from bench.sleep_bench import wait_status
from manager import names
from manager.control.plan import ENGINE_PORT

MODEL = "demo"
MARKER = "GTM-BENCH "
LOAD = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
keep = ("request_throughput", "median_tpot_ms", "median_ttft_ms", "completed", "output_throughput")
print("GTM-BENCH " + json.dumps({k: result.get(k) for k in keep}))
"""
GOAL = 0.9


RUNNING_USAGE = json.dumps({"stream_options": {"include_usage": True, "continuous_usage_stats": True}})
"""What the gateway adds to every stream it forwards: the engine's running count in each chunk."""


def cpu_ns(container: Any) -> int:
    """The container's CPU time so far (its cgroup's), in nanoseconds."""
    return int(container.stats(stream=False)["cpu_stats"]["cpu_usage"]["total_usage"])


def load(client: docker.DockerClient, image: str, network: str, models: str, base_url: str, key: str,
         prompts: int, concurrency: int, extra: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """One run of vLLM's load generator against ``base_url``, from inside the tenant's network."""
    command = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
        "--model", MODEL, "--tokenizer", f"/models/{MODEL}", "--dataset-name", "random",
        "--random-input-len", "32", "--random-output-len", "32", "--ignore-eos",
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), *(extra or []),
    ]  # fmt: skip
    out = client.containers.run(
        image,
        entrypoint=["python3", "-c", LOAD],
        command=command,
        environment={"OPENAI_API_KEY": key, "TORCHDYNAMO_DISABLE": "1", "HOME": "/tmp"},  # noqa: S108
        network=network,
        volumes={models: {"bind": "/models", "mode": "ro"}},
        tmpfs={"/tmp": "rw,size=256m"},  # noqa: S108
        remove=True,
        stdout=True,
        stderr=True,
    ).decode()
    lines = [ln for ln in out.splitlines() if ln.startswith(MARKER)]
    if not lines:
        raise RuntimeError(f"vLLM's load generator printed no result: {out[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1].removeprefix(MARKER))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with bench_manager(args.models) as (settings, api, client):
        body = {"name": "lab", "gpu_memory": "1536M", "port": free_port(), "model": MODEL, "max_model_len": 512}
        added = api.post("/api/v1/tenants", json=body)
        assert added.status_code == 201, added.text
        key = added.json()["key"]["api_key"]
        wait_status(api, "lab", "running", 600)
        network = names.network(settings.instance, "lab")
        gateway = client.containers.get(names.gateway(settings.instance, "lab"))
        gateway_ip = gateway.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        paths = {"gateway": f"http://{gateway_ip}:8000", "direct": f"http://{names.ENGINE_ALIAS}:{ENGINE_PORT}"}
        image = settings.engine_image
        models = str(args.models)
        load(client, image, network, models, paths["direct"], key, 16, args.concurrency)  # a first, slower run
        engine = client.containers.get(names.engine(settings.instance, "lab"))
        variants = {
            "gateway": (paths["gateway"], []),
            "direct": (paths["direct"], []),
            # direct, asking for the running usage the gateway asks of the engine in every chunk
            "direct+usage": (paths["direct"], ["--extra-body", RUNNING_USAGE]),
        }
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in variants}
        for _ in range(args.rounds):
            for path, (url, extra) in variants.items():
                before = cpu_ns(gateway), cpu_ns(engine)
                result = load(client, image, network, models, url, key, args.prompts, args.concurrency, extra)
                after = cpu_ns(gateway), cpu_ns(engine)
                done = max(int(result["completed"] or 0), 1)
                result["gateway_cpu_ms"] = (after[0] - before[0]) / 1e6 / done
                result["engine_cpu_ms"] = (after[1] - before[1]) / 1e6 / done
                runs[path].append(result)
        print(
            f"vLLM's load generator, {args.prompts} chat streams of 32 tokens in and out, "
            f"{args.concurrency} at once, alternating (one engine of the demo model, 2 cores shared):"
        )
        header = ("path", "requests/s", "median TPOT ms", "median TTFT ms", "gw CPU ms/req", "engine CPU ms/req")
        print(f"{header[0]:<13} {header[1]:>10} {header[2]:>15} {header[3]:>15} {header[4]:>14} {header[5]:>18}")
        for path, results in runs.items():
            for r in results:
                print(
                    f"{path:<13} {r['request_throughput']:>10.1f} {r['median_tpot_ms']:>15.2f} "
                    f"{r['median_ttft_ms']:>15.1f} {r['gateway_cpu_ms']:>14.2f} {r['engine_cpu_ms']:>18.1f}"
                )

        def median(path: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[path])

        direct = median("direct", "request_throughput")
        ratio = median("gateway", "request_throughput") / direct
        verdict = "met" if ratio >= GOAL else "missed"
        print(f"gateway / direct requests/s (medians): {ratio:.3f} (goal >= {GOAL}: {verdict})")
        print(f"direct with running usage / direct: {median('direct+usage', 'request_throughput') / direct:.3f}")
        gw_cpu, engine_cpu = median("gateway", "gateway_cpu_ms"), median("gateway", "engine_cpu_ms")
        print(
            f"through the gateway, per request: gateway {gw_cpu:.2f} ms of CPU, engine {engine_cpu:.1f} ms; "
            f"the gateway's share of the CPU both took: {gw_cpu / (gw_cpu + engine_cpu):.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
