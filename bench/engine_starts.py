"""Engine starts through the control plane: how often the first start succeeds, and what
the control plane adds to the time from ``add-tenant`` to the first answer.

    .venv/bin/python -m bench.engine_starts --starts 30 --baseline 3 [--cold]

One run, one machine: a manager (in-process, real Docker, real vLLM CPU engines) with a
background tenant serving requests the whole time (as on a shared host), then N tenants
added and removed one after another. The baseline is ``docker run`` of the same engine
image, model, arguments and limits, timed to its first answer on a published port.
Figures: first-start success rate (goal N of N), add-tenant -> first answer against the
baseline (goal: under 1 s added). A failed start's full engine log is kept in --logs.

``--cold`` (root) empties the host's page cache first, as after a host boot or an image
build: the state in which engines used to fail their first start (vLLM's CPU backend
counted the page cache it had just read as used memory). It also shows that ``docker run``
of the engine alone fails then, and that the manager's first start does not.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import uvicorn

from manager import names
from manager.control.plan import prepare_plan, tenant_plan
from manager.control.sizing import Sizing
from manager.domain import TenantSpec
from manager.runtime.docker import DockerRuntime, container_kwargs
from manager.settings import Settings
from manager.wiring import create_app

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TOKEN = "bench-admin-token-" + secrets.token_hex(12)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_answer(url: str, headers: dict[str, str], deadline: float, body: dict[str, Any] = CHAT) -> float:
    """Polls a chat completion (``body``) until it answers 200; returns when it did."""
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                if client.post(url, json=body, headers=headers).status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"no answer from {url}")


def watch(
    api: httpx.Client,
    client: docker.DockerClient,
    instance: str,
    name: str,
    logs: Path,
    done: threading.Event,
    failures: list[str],
) -> None:
    """Records the tenant's first failure (reason, and the engine's whole log) until ``done``."""
    while not done.is_set() and not failures:
        tenant = api.get(f"/api/v1/tenants/{name}").json()
        if tenant["status"] == "failed":
            failures.append(tenant["reason"])
            log = client.containers.get(names.engine(instance, name)).logs().decode(errors="replace")
            (logs / f"{instance}-{name}.log").write_text(log)
        done.wait(0.5)


def cleanup(client: docker.DockerClient, instance: str) -> None:
    sel = names.selector(instance)
    for c in client.containers.list(all=True, filters={"label": sel}):
        c.remove(force=True)
    for n in client.networks.list(filters={"label": sel}):
        n.remove()
    for v in client.volumes.list(filters={"label": sel}):
        v.remove(force=True)


def drop_page_cache() -> None:
    import os

    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def baseline(client: docker.DockerClient, settings: Settings, instance: str) -> float:
    """``docker run`` of the same engine plan, published on a port: seconds to the first answer
    (NaN when the engine exits instead)."""
    spec = TenantSpec(name="direct", port=free_port(), gpu_memory=1536 * 1024**2, model="demo", max_model_len=512)
    plan = tenant_plan(spec, settings, 0, Sizing(settings).fit(spec)).engine
    kwargs = container_kwargs(plan)
    kwargs.pop("networking_config", None)
    kwargs.update(
        network="bridge",
        ports={"8000/tcp": ("127.0.0.1", spec.port)},
        labels=names.labels(instance, names.Role.PROBE),
        name=f"{instance}-direct",
    )
    client.volumes.create(plan.mounts[0].source, labels=names.labels(instance, names.Role.VOLUME))
    # the volume given to the engine's user, as the manager does before every first start
    code, out = DockerRuntime(client).run_to_completion(prepare_plan(spec, settings), 60)
    assert code == 0, out
    t0 = time.monotonic()
    container = client.containers.run(**kwargs)
    try:
        url = f"http://127.0.0.1:{spec.port}/v1/chat/completions"
        while time.monotonic() < t0 + 300:
            container.reload()
            if container.status == "exited":
                return float("nan")
            try:
                return first_answer(url, {}, time.monotonic() + 2) - t0
            except TimeoutError:
                continue
        raise TimeoutError(f"no answer from {url}")
    finally:
        container.remove(force=True)
        client.volumes.get(plan.mounts[0].source).remove(force=True)


def bench_settings(instance: str, models: Path) -> Settings:
    """A benchmark's own manager: cpu mode on loopback, a throwaway state directory."""
    return Settings(
        gpu_mode="cpu",
        instance=instance,
        state_dir=Path("/tmp") / instance,  # noqa: S108 - a throwaway state dir for this run
        models_source=str(models),
        models_dir=models,
        api_host="127.0.0.1",
        api_port=free_port(),
        admin_token=TOKEN,
        tenant_bind_address="127.0.0.1",
        reconcile_interval_s=3.0,
        usage_interval_s=2.0,
    )


def stop_manager(server: uvicorn.Server, client: docker.DockerClient, instance: str) -> None:
    """Stops a benchmark's manager, then removes every container, network and volume of its instance."""
    server.should_exit = True
    time.sleep(1)
    cleanup(client, instance)


def serve_manager(settings: Settings) -> tuple[uvicorn.Server, httpx.Client]:
    """The manager's app on a thread of its own, and an admin client of its API."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.api_port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{settings.api_port}", timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    return server, api


@contextlib.contextmanager
def bench_manager(models: Path) -> Iterator[tuple[Settings, httpx.Client, docker.DockerClient]]:
    """A benchmark's own manager (``bench_settings``) serving on a thread: its settings, an admin
    client of its API and the Docker client; everything of its instance is removed at the end."""
    instance = "gtmbench" + secrets.token_hex(3)
    settings = bench_settings(instance, models)
    client = docker.from_env()
    server, api = serve_manager(settings)
    try:
        yield settings, api, client
    finally:
        stop_manager(server, client, instance)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--baseline", type=int, default=3)
    parser.add_argument("--models", type=Path, default=Path("/var/cache/gpu-tenant-manager/models"))
    parser.add_argument("--logs", type=Path, default=Path("artifacts/engine-starts"))
    parser.add_argument("--cold", action="store_true", help="empty the host's page cache first (root)")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)

    client = docker.from_env()
    instance = "gtmbench" + secrets.token_hex(3)
    cold_direct: float | None = None
    settings = bench_settings(instance, args.models)
    if args.cold:
        drop_page_cache()
        try:
            cold_direct = baseline(client, settings, instance)
        finally:
            cleanup(client, instance)
        print(
            "docker run of the engine alone on a cold page cache: "
            + ("exited without answering" if cold_direct != cold_direct else f"answered after {cold_direct:.1f} s"),
            flush=True,
        )
        drop_page_cache()
    server, api = serve_manager(settings)
    stop = threading.Event()
    results: list[dict[str, Any]] = []
    try:
        # a tenant that serves during every start, as on a shared host
        bg_port = free_port()
        bg = api.post("/api/v1/tenants", json={"name": "background", "gpu_memory": "1536M", "port": bg_port})
        bg.raise_for_status()
        bg_key = bg.json()["key"]["api_key"]
        bg_failures: list[str] = []
        bg_up = threading.Event()
        bg_watch = threading.Thread(
            target=watch, args=(api, client, instance, "background", args.logs, bg_up, bg_failures)
        )
        bg_watch.start()
        first_answer(
            f"http://127.0.0.1:{bg_port}/v1/chat/completions",
            {"Authorization": f"Bearer {bg_key}"},
            time.monotonic() + 300,
        )
        bg_up.set()
        bg_watch.join()
        results.append(
            {
                "name": "background",
                "seconds": float("nan"),
                "first_start_ok": not bg_failures,
                "reason": bg_failures[0] if bg_failures else None,
            }
        )
        print(
            "background tenant (the first engine of this manager): "
            + (f"first start FAILED: {bg_failures[0]}" if bg_failures else "first start ok"),
            flush=True,
        )

        def load() -> None:
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    with contextlib.suppress(httpx.HTTPError):
                        c.post(
                            f"http://127.0.0.1:{bg_port}/v1/chat/completions",
                            json=CHAT,
                            headers={"Authorization": f"Bearer {bg_key}"},
                        )
                    stop.wait(0.5)

        threading.Thread(target=load, daemon=True).start()

        baselines = [baseline(client, settings, instance) for _ in range(args.baseline)]
        for i in range(args.starts):
            name, port = f"s{i}", free_port()
            t0 = time.monotonic()
            r = api.post("/api/v1/tenants", json={"name": name, "gpu_memory": "1536M", "port": port})
            r.raise_for_status()
            key = r.json()["key"]["api_key"]
            failures: list[str] = []
            answering = threading.Event()
            watcher = threading.Thread(target=watch, args=(api, client, instance, name, args.logs, answering, failures))
            watcher.start()
            answered = first_answer(
                f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {key}"}, t0 + 600
            )
            answering.set()
            watcher.join()
            failed = failures[0] if failures else None
            results.append({"name": name, "seconds": answered - t0, "first_start_ok": failed is None, "reason": failed})
            print(
                f"{name}: first answer after {answered - t0:.1f} s"
                + (f"; first start FAILED: {failed}" if failed else ""),
                flush=True,
            )
            api.delete(f"/api/v1/tenants/{name}").raise_for_status()
            while api.get(f"/api/v1/tenants/{name}").status_code != 404:
                time.sleep(0.5)
    finally:
        stop.set()
        stop_manager(server, client, instance)

    ok = sum(r["first_start_ok"] for r in results)
    timed = [r["seconds"] for r in results if r["first_start_ok"] and r["name"] != "background"]
    managed = statistics.median(timed) if timed else float("nan")
    direct = statistics.median(baselines) if baselines else float("nan")
    print(f"\nfirst-start success: {ok} of {len(results)} (the first engine of the manager included; goal: all)")
    print(f"add-tenant -> first answer (median of first-time starts): {managed:.2f} s")
    print(f"docker run -> first answer (baseline, median of {len(baselines)}): {direct:.2f} s")
    print(f"control plane adds: {managed - direct:+.2f} s ({managed / direct:.2f}x the baseline; goal: < 1 s added)")
    for res in results:
        if not res["first_start_ok"]:
            print(f"  {res['name']}: {res['reason']} (log in {args.logs})")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
