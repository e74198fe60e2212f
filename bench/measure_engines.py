"""How long the manager takes to measure its engines' memory (cpu mode: each engine's cgroup
memory through Docker), which every list-tenants, console page, /metrics scrape and admission
does: the service's concurrent reads against the same reads one after another (what the
manager did before), measured in one run on this machine's Docker engine.

    .venv/bin/python -m bench.measure_engines               # 8 engines
    .venv/bin/python -m bench.measure_engines --engines 16

The engines are idle containers of the base image labelled as a bench instance's engines (a
memory read costs Docker the same for any running container); they are removed afterwards by
label, also on failure. Target: measuring N engines takes about as long as measuring one.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import docker

from bench.timing import timed
from manager import names
from manager.control.reconciler import Reconciler
from manager.control.service import TenantService
from manager.control.sqlite_store import SqliteStore
from manager.gpu.cpu import HostMemoryInventory
from manager.runtime.docker import DockerRuntime
from manager.settings import Settings

INSTANCE = "gtmbench-measure"
IMAGE = "debian:bookworm-slim"


def remove_all(client: docker.DockerClient) -> None:
    for c in client.containers.list(all=True, filters={"label": names.selector(INSTANCE)}):
        c.remove(force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    client = docker.from_env()
    remove_all(client)
    try:
        tenants = [f"bench{i}" for i in range(args.engines)]
        for t in tenants:
            client.containers.run(
                IMAGE,
                ["sleep", "infinity"],
                name=names.engine(INSTANCE, t),
                labels=names.labels(INSTANCE, names.Role.ENGINE, t),
                detach=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(gpu_mode="cpu", instance=INSTANCE, state_dir=Path(tmp), models_dir=Path(tmp))
            runtime, inventory, store = DockerRuntime(client), HostMemoryInventory(), SqliteStore(Path(tmp) / "m.db")
            service = TenantService(
                settings, store, runtime, inventory, Reconciler(settings, store, runtime, inventory)
            )
            measured = service.meter.measured_use()
            assert sorted(measured) == tenants and all(v for v in measured.values()), measured
            engines = [names.engine(INSTANCE, t) for t in tenants]
            one = timed(lambda: service.meter.measured_use(tenants[0]), args.rounds)
            together = timed(service.meter.measured_use, args.rounds)
            in_turn = timed(lambda: [runtime.memory_usage(e) for e in engines], args.rounds)
            store.close()
        print(f"engines: {args.engines} (idle containers), median of {args.rounds}")
        print(f"one engine:            {one * 1000:8.0f} ms")
        print(f"all, one after another: {in_turn * 1000:7.0f} ms (before)")
        print(f"all, at once:          {together * 1000:8.0f} ms  ratio {together / in_turn:.2f} vs one after another")
    finally:
        remove_all(client)
        client.close()


if __name__ == "__main__":
    main()
