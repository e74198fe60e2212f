"""GPU mode on a simulated host (tests/simgpu.py): the real inventory, admission, placement,
plans and reconciler, with vLLM's own start-up check standing in for the engines.

The property: whatever set of tenants admission lets in, one by one, every engine passes vLLM's
start-up check, first as each is added and again after a restart from nothing in the
reconciler's order (one engine at a time); on one A100 80GB, on two, and on a MIG layout. With
sleep and overcommit, whatever order tenants ask in, every start and wake passes vLLM's checks, the
host's RAM holds what the engines pin, and the tenant that asked is served."""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from manager import names
from manager.contract import GatewayActivity
from manager.control.reconciler import Reconciler
from manager.control.service import TenantService
from manager.control.sleeper import Turn
from manager.control.sqlite_store import SqliteStore
from manager.domain import TenantSpec, TenantStatus
from manager.errors import AdmissionRefused, GpuUnavailable, InvalidInput, RuntimeUnavailable
from manager.gpu.nvml import NvmlInventory
from manager.runtime.memory import MemoryRuntime
from manager.settings import Settings

from ..simgpu import (
    CONTEXT,
    GIB,
    MIB,
    EngineModel,
    SimDevice,
    SimGpu,
    SimNvml,
    VllmRefused,
    a100,
    vllm_sleep,
    vllm_start,
    vllm_start_log,
    vllm_start_mps,
    vllm_stop,
    vllm_wake,
)
from .fakes import FakeGateway

INSTANCE = "gtmg"
ENGINE = EngineModel(weights=3 * GIB)
"""A 1.5B-class model in bf16: it fits a 1g.10gb MIG instance with room for a KV cache."""


def sparse_model(directory: Path, weights: int) -> None:
    """A model whose safetensors header declares ``weights`` bytes of bf16 (the file is sparse: only
    headers are read to size a model)."""
    directory.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [weights // 2], "data_offsets": [0, weights]}}).encode()
    with (directory / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        fh.truncate(8 + len(header) + weights)
    config = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_size": 2048}
    (directory / "config.json").write_text(json.dumps(config))


class SimHost:
    """A manager over simulated GPUs: the engines it starts are started in the simulation."""

    def __init__(self, tmp_path: Path, gpus: list[SimGpu], **settings: Any) -> None:
        self.nvml = SimNvml(gpus)
        models = tmp_path / "models"
        sparse_model(models / "demo", ENGINE.weights)
        meminfo = tmp_path / "meminfo"  # the host's RAM: a GPU server's 512 GiB unless a test says less
        self.host_ram: int = settings.pop("host_ram", 512 * GIB)
        meminfo.write_text(f"MemTotal: {self.host_ram // 1024} kB\n")
        self.settings = Settings(
            gpu_mode="nvml", instance=INSTANCE, state_dir=tmp_path, models_dir=models, meminfo=meminfo, **settings
        )
        self.store = SqliteStore(tmp_path / "m.db")
        self.runtime = MemoryRuntime()
        self.inventory = NvmlInventory.open(self.nvml)
        self.gateways = FakeGateway()
        self.gateways.on_sleep = self._sleep_mode
        self.reconciler = Reconciler(self.settings, self.store, self.runtime, self.inventory, connect=self.gateways)
        self.service = TenantService(self.settings, self.store, self.runtime, self.inventory, self.reconciler)
        self.pids: dict[str, tuple[str, int]] = {}  # tenant -> (device uuid, pid)
        self.budgets: dict[str, int] = {}  # tenant -> its engine's budget (utilization x CUDA's total)
        self.before_wake: Any = lambda: None  # what happens on the device as a wake begins
        self.containers: dict[str, str] = {}  # tenant -> the ID of the engine container its pid runs in
        self.slept_once: set[str] = set()  # tenants whose engine slept in place: its weights stay pinned

    def _sleep_mode(self, token: str, asleep: bool) -> None:
        """The engine the gateway with this token reaches sleeps (level 1) or wakes, in the simulation."""
        (name,) = [r.spec.name for r in self.store.tenants() if r.gateway_token == token]
        uuid, pid = self.pids[name]
        if asleep:
            vllm_sleep(self.nvml.device(uuid), pid, ENGINE)
            self.slept_once.add(name)
            return
        self.before_wake()
        try:
            vllm_wake(self.nvml.device(uuid), pid, ENGINE, self.budgets[name])
        except VllmRefused as exc:  # the engine's 500, which the gateway's admin port answers as a 502
            raise RuntimeUnavailable(f"gateway admin POST /admin/engine/wake failed: 502 ({exc})") from exc

    def add(self, name: str, port: int, gpu_memory: int, gpu: str | None = None) -> None:
        spec = TenantSpec(name=name, port=port, gpu_memory=gpu_memory, model="demo", max_model_len=4096)
        self.service.create(spec, "test", gpu=gpu)

    def start(self, name: str) -> int:
        """The reconciler's turn for the tenant, then its engine starts on the simulated GPU it was
        given (vLLM's start-up check), and turns healthy. Returns its KV cache bytes."""
        self.stop(name)  # its old engine is replaced in this turn
        self.reconciler.reconcile(name)
        if self.daemons_up():  # MPS: the engine starts in the turn after its device's daemon answers
            self.reconciler.reconcile(name)
        kv = self.boot(name)
        self.runtime.set_health(names.gateway(INSTANCE, name), "healthy")
        self.reconciler.reconcile(name)
        assert self.store.tenant(name).status == TenantStatus.RUNNING
        return kv

    def daemons(self) -> dict[str, str]:
        """MPS control daemons: device UUID -> container name."""
        found = self.runtime.containers(names.selector(INSTANCE, role=names.Role.MPS.value))
        return {c.labels[names.DEVICE]: c.name for c in found}

    def daemons_up(self) -> bool:
        """Every MPS control daemon that is not yet healthy turns healthy; True if any did."""
        waking = [c for c in self.runtime.containers(names.selector(INSTANCE, role="mps")) if c.health != "healthy"]
        for c in waking:
            self.runtime.set_health(c.name, "healthy")
        return bool(waking)

    def boot(self, name: str) -> int:
        """The engine container the manager started for the tenant starts vLLM on its simulated GPU
        (its start-up check) and turns healthy. Returns its KV cache bytes."""
        engine = names.engine(INSTANCE, name)
        plan, state = self.runtime.plan(engine), self.runtime.container(engine)
        assert plan is not None and state is not None and plan.gpu_device_ids, self.store.tenant(name)
        util = float(plan.command[plan.command.index("--gpu-memory-utilization") + 1])
        device = self.nvml.device(plan.gpu_device_ids[0])
        pid = self.nvml.new_pid()
        sequences = int(plan.command[plan.command.index("--max-num-seqs") + 1])
        if "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in plan.env:
            limit = int(plan.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"].removeprefix("0=").removesuffix("M")) * MIB
            kv_bytes = int(plan.command[plan.command.index("--kv-cache-memory-bytes") + 1])
            kv = vllm_start_mps(device, util, kv_bytes, limit, ENGINE, pid, sequences)
        else:
            kv = vllm_start(device, util, ENGINE, pid, sequences)
        self.gateways.sleeping[self.store.tenant(name).gateway_token] = False  # a new process is awake
        self.pids[name], self.containers[name] = (device.uuid, pid), state.id
        self.budgets[name] = device.processes[pid] - ENGINE.context
        self.runtime.set_pids(engine, {pid})
        self.runtime.set_logs(engine, vllm_start_log(kv))
        self.runtime.set_health(engine, "healthy")
        return kv

    def stop(self, name: str) -> None:
        """The tenant's engine process ends (its container was removed or replaced)."""
        if name in self.pids:
            uuid, pid = self.pids.pop(name)
            vllm_stop(self.nvml.device(uuid), pid)
        self.slept_once.discard(name)

    def follow(self, name: str) -> None:
        """The simulation follows what the manager did to the tenant's engine container: one it
        removed ends its process; one it started (or replaced) starts vLLM."""
        state = self.runtime.container(names.engine(INSTANCE, name))
        if state is None or self.containers.get(name) != state.id:
            self.stop(name)
        if state is not None and name not in self.pids:
            self.boot(name)
        if self.runtime.container(names.gateway(INSTANCE, name)) is not None:
            self.runtime.set_health(names.gateway(INSTANCE, name), "healthy")

    def host_ram_used(self) -> int:
        """Every engine process's host RAM (the figure the manager admits each with) and the pinned
        copy of the weights of each engine that has slept."""
        return len(self.pids) * self.settings.engine_host_memory + len(self.slept_once) * ENGINE.weights

    def power_cycle(self) -> None:
        """The host reboots: every engine's memory is gone, the containers are restarted from nothing."""
        for name in list(self.pids):
            self.stop(name)
            self.runtime.remove_container(names.engine(INSTANCE, name))

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[SimHost]:
    h = SimHost(tmp_path, [a100(0)])
    yield h
    h.close()


LAYOUTS = {
    "one A100 80GB": lambda: [a100(0)],
    "two A100 80GB": lambda: [a100(0), a100(1)],
    "MIG 1g.10gb x 7 beside a whole A100": lambda: [a100(0, mig=[9856] * 7), a100(1)],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_admitted_engine_passes_vllms_startup_check_also_after_a_restart(tmp_path: Path, layout: str) -> None:
    for trial in range(12):
        rng = random.Random(f"{layout}-{trial}")
        h = SimHost(tmp_path / f"t{trial}", LAYOUTS[layout]())
        try:
            admitted: list[str] = []
            for i in range(rng.randint(3, 14)):
                name = f"t{i:02d}"
                size = rng.choice([7 * GIB, 8 * GIB, 9 * GIB, 12 * GIB, 20 * GIB, 26 * GIB, 38 * GIB, 70 * GIB])
                size += rng.randrange(0, 2048) * MIB
                try:
                    h.add(name, 31000 + i, size)
                except AdmissionRefused:
                    continue
                admitted.append(name)
                try:
                    assert h.start(name) > 0
                except VllmRefused as exc:
                    pytest.fail(f"{layout}, trial {trial}: {name} ({size / GIB:.2f} GiB) admitted, then {exc}")
            assert admitted, "at least one tenant fits"
            h.power_cycle()
            for name in sorted(admitted):  # the reconciler's order: by name, one engine at a time
                try:
                    h.start(name)
                except VllmRefused as exc:
                    pytest.fail(f"{layout}, trial {trial}: after a restart {name} {exc}")
        finally:
            h.close()


class SleepyTrial:
    """One random trial of the property with sleepers (its test says what it holds)."""

    def __init__(self, h: SimHost, rng: random.Random, seen: dict[str, int]) -> None:
        self.h, self.rng, self.seen = h, rng, seen
        self.clock = [time.time()]
        h.reconciler.clock = h.reconciler.sleeper.clock = lambda: self.clock[0]
        self.outsider = h.nvml.new_pid()
        self.admitted: list[str] = []
        for i in range(rng.randint(4, 12)):
            size = rng.choice([7 * GIB, 9 * GIB, 12 * GIB, 20 * GIB, 30 * GIB]) + rng.randrange(0, 1024) * MIB
            spec = TenantSpec(
                name=f"t{i:02d}", port=31000 + i, gpu_memory=size, model="demo", max_model_len=4096, idle_sleep_s=60.0
            )
            try:
                seen["admitted asleep"] += h.service.create(spec, "test").decision.by_overcommit
            except AdmissionRefused:
                continue
            self.admitted.append(spec.name)
        assert self.admitted, "at least one tenant fits"
        self.token = {r.spec.name: r.gateway_token for r in h.store.tenants()}
        for name in self.admitted:
            self.activity(name, waiting=0)

    def activity(self, name: str, waiting: int) -> None:
        self.h.gateways.activities[self.token[name]] = GatewayActivity(
            last_request_at=self.clock[0], in_flight=0, waiting=waiting, hold=bool(waiting)
        )

    def grab(self, device: SimDevice) -> None:
        """A process outside the manager takes all but 1 GiB of the device as a wake begins."""
        device.processes[self.outsider] = max(device.cuda_free - GIB, 0)

    def serving(self, name: str) -> bool:
        return (
            self.h.store.tenant(name).status == TenantStatus.RUNNING and not self.h.gateways.sleeping[self.token[name]]
        )

    def settle(self, asking: str) -> None:
        """The sleeper's and the reconciler's turns (evictions, then the wake or a cold start), the
        simulation following each, until ``asking`` is served; the invariants hold at every turn."""
        h = self.h
        for _ in range(8):
            h.reconciler.sleeper.tick()
            for name in self.admitted:
                h.reconciler.reconcile(name)
                for device in h.nvml.devices():  # it held memory only while a wake was tried
                    device.processes.pop(self.outsider, None)
                self.seen["slept"] += name in h.slept_once
                h.follow(name)
                assert all(d.used <= d.cuda_total for d in h.nvml.devices())
                assert h.host_ram_used() <= h.host_ram - h.settings.host_headroom, "host RAM over-committed"
            if self.serving(asking):
                return

    def run(self, steps: int) -> None:
        h = self.h
        for _ in range(2 * len(self.admitted)):  # those admitted awake start, one engine per device at a time
            self.settle(self.admitted[0])
            if all(h.store.tenant(n).status != TenantStatus.STARTING for n in self.admitted):
                break
        for step in range(steps):
            name = self.rng.choice(self.admitted)
            self.clock[0] += self.rng.uniform(5.0, 120.0)
            self.activity(name, waiting=1)
            if self.rng.random() < 0.2 and name in h.pids:
                h.before_wake = partial(self.grab, h.nvml.device(h.pids[name][0]))
                self.seen["failed wakes"] += h.gateways.sleeping[self.token[name]]
            try:
                self.settle(name)
            finally:
                h.before_wake = lambda: None
            row = h.store.tenant(name)
            assert self.serving(name), f"step {step}: {name} {row.status} ({row.reason})"
            self.activity(name, waiting=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_with_sleepers_every_start_and_wake_passes_and_the_hosts_ram_holds(tmp_path: Path, layout: str) -> None:
    """The property with sleep and overcommit: tenants that sleep when idle, admitted beyond what
    the devices hold awake, take requests in a random order on a small host (64-128 GiB of RAM).
    Sleepers keep their contexts and graph pools on the device, and their weights pinned in host
    RAM; one wake in five loses memory to a process outside the manager half way and fails. At
    every step vLLM's own checks pass (every start, every wake that is tried with the memory
    there), the host's RAM holds every engine and every pinned copy, and the tenant that asked is
    served: woken, or, after a failed wake, started cold."""
    seen = {"admitted asleep": 0, "slept": 0, "failed wakes": 0}
    for trial in range(4):
        rng = random.Random(f"sleepers-{layout}-{trial}")
        host_ram = rng.choice([64, 96, 128]) * GIB
        h = SimHost(tmp_path / f"t{trial}", LAYOUTS[layout](), overcommit=True, host_ram=host_ram)
        try:
            SleepyTrial(h, rng, seen).run(steps=16)
        except (VllmRefused, AssertionError) as exc:
            pytest.fail(f"{layout}, trial {trial}: {exc}")
        finally:
            h.close()
    assert all(seen.values()), f"every case came up: {seen}"


def test_three_tenants_that_fill_the_ledger_all_start(host: SimHost) -> None:
    """The case older releases got wrong: three equal tenants filling the ledger exactly were admitted
    (NVML's total, no contexts), and after a reboot the third failed vLLM's check forever."""
    device = host.inventory.devices()[0]
    old_rule = (device.total - host.settings.headroom) // 3
    with pytest.raises(AdmissionRefused, match="ledger"):
        for i in range(3):
            host.add(f"eq{i}", 31000 + i, old_rule)
    largest = host.service.meter.capacity().devices[0].unreserved
    host.add("eq2", 31002, largest)  # the third takes exactly what is left
    for name in ("eq0", "eq1", "eq2"):
        host.start(name)
    host.power_cycle()
    for name in ("eq0", "eq1", "eq2"):
        host.start(name)
    with pytest.raises(AdmissionRefused):
        host.add("eq3", 31003, 1 * GIB + 512 * MIB)


def test_tenants_go_to_the_tightest_gpu_and_can_be_pinned_or_moved(tmp_path: Path) -> None:
    h = SimHost(tmp_path, [a100(0), a100(1)])
    try:
        first, second = (d.uuid for d in h.inventory.devices())
        h.add("big", 31000, 40 * GIB)
        h.add("mid", 31001, 30 * GIB)  # fits both: goes where it leaves the least
        assert h.store.tenant("big").device == first and h.store.tenant("mid").device == first
        h.add("next", 31002, 30 * GIB)  # no longer fits GPU 0
        assert h.store.tenant("next").device == second
        h.add("pinned", 31003, 8 * GIB, gpu="1")
        assert h.store.tenant("pinned").device == second
        with pytest.raises(AdmissionRefused, match=r"GPU 0 \(GPU-a100-0000\): ledger"):
            h.add("nope", 31004, 8 * GIB, gpu=first)
        with pytest.raises(InvalidInput, match="no device '7' on this host"):
            h.add("nope", 31004, 8 * GIB, gpu="7")
        for name in ("big", "mid", "next", "pinned"):
            h.start(name)
        assert h.nvml.device(second).processes.keys() == {h.pids["next"][1], h.pids["pinned"][1]}

        h.service.update("next", "test", gpu_memory=20 * GIB)  # a resize stays on its own GPU
        assert h.store.tenant("next").device == second
        h.start("next")
        # moving a tenant replaces its engine on the other GPU
        h.service.update("mid", "test", gpu="1")
        assert h.store.tenant("mid").device == second
        h.start("mid")
        assert h.pids["mid"][0] == second
        cap = h.service.meter.capacity()
        assert [len(d.tenants) for d in cap.devices] == [1, 3]
        assert cap.devices[1].reserved == 58 * GIB
    finally:
        h.close()


def test_a_move_waits_for_another_engine_that_is_profiling(tmp_path: Path) -> None:
    """vLLM asserts that free memory did not grow while it profiled: removing or replacing an engine
    meanwhile must wait until the engine holding the start gate is up."""
    h = SimHost(tmp_path, [a100(0), a100(1)])
    try:
        h.add("alpha", 31000, 20 * GIB)
        h.start("alpha")
        h.add("beta", 31001, 20 * GIB)
        h.reconciler.reconcile("beta")  # beta's engine is created: it holds the start gate while it profiles
        h.service.update("alpha", "test", gpu="1")
        h.reconciler.reconcile("alpha")
        a_engine = h.runtime.container(names.engine(INSTANCE, "alpha"))
        assert a_engine is not None and a_engine.status == "running"  # the old engine is still there
        assert "waiting for beta's engine" in h.store.tenant("alpha").reason
        h.service.remove("alpha", "test")
        h.reconciler.reconcile("alpha")
        assert h.store.find_tenant("alpha") is not None  # the removal waits too
        h.runtime.set_health(names.engine(INSTANCE, "beta"), "healthy")
        h.runtime.set_health(names.gateway(INSTANCE, "beta"), "healthy")
        h.reconciler.reconcile("beta")  # beta is up: the gate is free
        h.reconciler.reconcile("alpha")
        assert h.store.find_tenant("alpha") is None
    finally:
        h.close()


def test_mig_instances_are_devices_with_their_own_memory_and_unknown_per_process_use(tmp_path: Path) -> None:
    h = SimHost(tmp_path, [a100(0, mig=[9856, 9856, 19968])])
    try:
        devices = h.inventory.devices()
        assert [(d.kind, d.uuid, d.total // MIB) for d in devices] == [
            ("mig", "MIG-a100-0000-0", 9856),
            ("mig", "MIG-a100-0000-1", 9856),
            ("mig", "MIG-a100-0000-2", 19968),
        ]
        h.add("small", 31000, 8 * GIB)
        assert h.store.tenant("small").device == "MIG-a100-0000-0"  # the tightest instance that holds it
        h.start("small")
        engine = h.runtime.plan(names.engine(INSTANCE, "small"))
        assert engine is not None and engine.gpu_device_ids == ["MIG-a100-0000-0"]
        assert h.service.meter.measured_use() == {"small": None}  # MIG hides per-process memory: unknown, not 0
        (usage,) = h.service.meter.capacity().devices[0].tenants
        assert usage.unknown and usage.measured is None
        h.add("large", 31001, 16 * GIB)
        assert h.store.tenant("large").device == "MIG-a100-0000-2"
        with pytest.raises(AdmissionRefused, match="MIG 1"):
            h.add("huge", 31002, 20 * GIB)
    finally:
        h.close()


def test_each_models_engine_overhead_is_learned_from_its_first_start(host: SimHost) -> None:
    """vLLM logs the KV cache its profile left; the manager takes what the engine needed beyond
    weights, sequences and that KV cache for the model's own overhead, in place of the configured
    4 GiB: the model-fit minimum and list-models use it, and a tenant admitted at the smaller
    minimum starts with its whole context's KV cache."""
    configured = host.service.models.minimum("demo", 4096, False)
    (entry,) = host.service.models.entries()
    assert entry.engine_overhead == 4 * GIB and not entry.overhead_learned
    host.add("first", 31000, 20 * GIB)
    host.start("first")
    split = host.reconciler.sizing.fit(host.store.tenant("first").spec)
    learned = host.store.engine_overhead("demo", False)
    # what vLLM's profile holds beyond weights and sampler, and what the utilization's rounding takes
    truth = ENGINE.activation_peak + ENGINE.non_torch + host.inventory.devices()[0].usable // 10_000
    assert split.per_sequence == ENGINE.per_sequence, "the simulated sampler is the one the manager counts"
    assert learned is not None and truth <= learned < truth + 11 * MIB, "never low; high by the log's rounding"
    least = host.service.models.minimum("demo", 4096, False)
    assert least == configured - (4 * GIB - learned)
    (entry,) = host.service.models.entries()
    assert entry.engine_overhead == learned and entry.overhead_learned and entry.minimum_gpu_memory < configured
    host.add("smallest", 31001, least)
    kv = host.start("smallest")
    assert kv >= host.reconciler.sizing.fit(host.store.tenant("smallest").spec).kv_floor, "one whole context fits"
    # a later start that logs more does not fail a tenant admitted before it: the engine runs fewer sequences
    host.store.record_engine_overhead("demo", False, learned + 64 * MIB, time.time())
    assert host.reconciler.sizing.fit(host.store.tenant("smallest").spec).max_num_seqs == 1
    host.reconciler.reconcile("smallest")
    assert host.store.tenant("smallest").status == TenantStatus.RUNNING


def test_a_lost_gpu_is_a_503_that_says_what_to_do(host: SimHost) -> None:
    host.nvml.lost = True
    with pytest.raises(GpuUnavailable, match=r"GPU is lost.*nvidia-smi") as caught:
        host.service.meter.capacity()
    assert caught.value.http_status == 503
    with pytest.raises(GpuUnavailable):
        host.inventory.processes()


def test_a_tenant_whose_gpu_is_gone_fails_with_the_way_out(tmp_path: Path) -> None:
    h = SimHost(tmp_path, [a100(0), a100(1)])
    try:
        h.add("alpha", 31000, 20 * GIB, gpu="1")
        h.start("alpha")
        h.nvml.gpus.pop()  # the GPU is gone after a reboot
        h.reconciler.reconcile("alpha")
        row = h.store.tenant("alpha")
        assert row.status == TenantStatus.FAILED and "update-tenant --gpu" in row.reason
        h.service.update("alpha", "test", gpu="0")
        assert h.store.tenant("alpha").device == "GPU-a100-0000"
    finally:
        h.close()


def test_a_lost_gpu_answers_503_on_the_api_metrics_and_console(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from manager.wiring import create_app

    nvml = SimNvml([a100(0), a100(1)])
    sparse_model(tmp_path / "models" / "demo", ENGINE.weights)
    settings = Settings(
        gpu_mode="nvml",
        instance=INSTANCE,
        state_dir=tmp_path / "state",
        models_dir=tmp_path / "models",
        admin_token="t" * 32,
        reconcile_interval_s=3600,
    )
    app = create_app(settings, runtime=MemoryRuntime(), inventory=NvmlInventory.open(nvml))
    with TestClient(app) as client:
        auth = {"Authorization": "Bearer " + "t" * 32}
        cap = client.get("/api/v1/capacity", headers=auth).json()
        assert [d["device"]["uuid"] for d in cap["devices"]] == ["GPU-a100-0000", "GPU-a100-0001"]
        first = cap["devices"][0]
        assert first["device"]["reserved"] == 870 * MIB and first["process_overhead"] == 512 * MIB
        made = client.post(
            "/api/v1/tenants", headers=auth, json={"name": "lab", "gpu_memory": "20G", "port": 31000, "gpu": "1"}
        )
        assert made.status_code == 201, made.text
        assert made.json()["tenant"]["device"] == "GPU-a100-0001"
        assert made.json()["admission"]["device"] == "GPU 1 (GPU-a100-0001)"
        metrics = client.get("/metrics", headers=auth).text
        assert 'gtm_device_memory_bytes{device="1",kind="driver_reserved",uuid="GPU-a100-0001"}' in metrics
        nvml.lost = True
        for path in ("/api/v1/tenants", "/api/v1/capacity", "/metrics"):
            r = client.get(path, headers=auth)
            assert r.status_code == 503, (path, r.text)
            assert "GPU is lost" in r.json()["error"]["message"] and "nvidia-smi" in r.json()["error"]["message"]
        client.post("/login", data={"username": "admin", "password": "t" * 32})
        page = client.get("/")
        assert page.status_code == 503 and "nvidia-smi" in page.text


def test_the_readmes_a100_figures(host: SimHost) -> None:
    for i in range(3):
        host.add(f"lab{i}", 31000 + i, 24 * GIB)
    left = host.service.meter.capacity().devices[0].unreserved
    assert round(left / GIB, 2) == 4.15  # "a fourth can then reserve up to 4.1 GiB"


def test_sleeping_engines_keep_their_context_which_overcommit_counts_and_every_wake_fits(tmp_path: Path) -> None:
    """Level-1 sleep on one A100 80GB with overcommit: room for three tenants of 24 GiB awake, five
    admitted. A sleeping engine keeps its process and CUDA context (measured, and counted for it);
    a wake that fits beside the awake ones puts nobody to sleep; one that does not puts the least
    recently used idle one to sleep in place first, and wakes only once that one's memory is free.
    vLLM's own checks (its start, and CUDA's allocation at a wake) pass at every step."""
    h = SimHost(tmp_path, [a100(0)], overcommit=True)
    gw, clock = h.gateways, [time.time()]
    h.reconciler.clock = h.reconciler.sleeper.clock = lambda: clock[0]
    try:
        for i in range(5):
            with_sleep = TenantSpec(
                name=f"s{i}", port=31000 + i, gpu_memory=24 * GIB, model="demo", max_model_len=4096, idle_sleep_s=60.0
            )
            created = h.service.create(with_sleep, "test")
            assert created.decision.by_overcommit == (i >= 3), (i, created.decision.messages)
        for name in ("s0", "s1", "s2"):
            h.start(name)
        for name in ("s3", "s4"):  # asleep: their gateways only, holding
            h.reconciler.reconcile(name)
            h.runtime.set_health(names.gateway(INSTANCE, name), "healthy")
            h.reconciler.reconcile(name)
        device = h.nvml.device("GPU-a100-0000")
        token = {r.spec.name: r.gateway_token for r in h.store.tenants()}

        def serving(name: str, last: float, waiting: int = 0) -> None:
            gw.activities[token[name]] = GatewayActivity(last_request_at=last, in_flight=0, waiting=waiting, hold=False)

        for i, name in enumerate(("s0", "s1", "s2")):
            serving(name, clock[0] + i)  # s0 used longest ago
        clock[0] += 61.0
        serving("s1", clock[0])
        serving("s2", clock[0])
        assert h.reconciler.sleeper.tick() == [Turn("s0", "sleep")]
        free_before = device.cuda_free
        h.reconciler.reconcile("s0")
        assert gw.sleeping[token["s0"]] and h.runtime.container(names.engine(INSTANCE, "s0")) is not None
        freed = h.budgets["s0"] - ENGINE.graph_pool
        assert device.cuda_free - free_before == freed, "its weights and KV cache left the device, its graphs stayed"
        kept_asleep = h.service.meter.measured_use("s0")["s0"]
        assert kept_asleep == ENGINE.kept_asleep > CONTEXT, "a sleeper keeps its context and its graph pools"
        assert h.store.tenant("s0").sleep.kept_asleep == kept_asleep, "measured after it slept, and recorded"
        # s3, admitted asleep, takes its first request: it fits beside s1, s2 and s0's context
        serving("s3", clock[0], waiting=1)
        assert h.reconciler.sleeper.tick() == [Turn("s3", "wake")]
        h.start("s3")
        # s0's request: 24.5 GiB needed, 4.6 free beside three awake and one context; s1 is the LRU idle one
        serving("s3", clock[0] + 1)
        serving("s0", clock[0] + 2, waiting=1)
        plan = h.reconciler.sleeper.plan(h.store.tenant("s0"))
        # s4 never slept in place: until it does, it is counted with the default (context + 1.5 GiB)
        assert plan.evict == ("s1",) and plan.numbers["kept_by_sleepers"] == CONTEXT + 1536 * MIB, plan
        assert h.reconciler.sleeper.tick() == [Turn("s1", "evict"), Turn("s0", "wake")]
        h.reconciler.reconcile("s0")  # s1 still holds its memory: s0 waits
        assert h.store.tenant("s0").status == TenantStatus.WAKING and gw.sleeping[token["s0"]]
        assert "waiting for the engine of s1" in h.store.tenant("s0").reason
        h.reconciler.reconcile("s1")  # its gateway holds, nothing in flight: it sleeps in place
        assert gw.sleeping[token["s1"]]
        h.reconciler.reconcile("s0")  # vLLM maps its weights and KV cache again (CUDA's check)
        assert not gw.sleeping[token["s0"]] and h.store.tenant("s0").status == TenantStatus.RUNNING
        assert device.used <= device.cuda_total
        kept = h.service.meter.measured_use()
        assert (kept["s1"], kept.get("s4")) == (ENGINE.kept_asleep, None), "one never started keeps nothing"
    finally:
        h.close()


def asleep_in_place(h: SimHost, clock: list[float], name: str, gpu_memory: int) -> str:
    """A tenant with --idle-sleep 60s started, then idle past it: its engine sleeps in place.
    ``clock`` becomes the reconciler's and the sleeper's. Returns its gateway's token."""
    h.reconciler.clock = h.reconciler.sleeper.clock = lambda: clock[0]
    spec = TenantSpec(name=name, port=31000, gpu_memory=gpu_memory, model="demo", max_model_len=4096)
    h.service.create(replace(spec, idle_sleep_s=60.0), "test")
    h.start(name)
    token = h.store.tenant(name).gateway_token
    h.gateways.activities[token] = GatewayActivity(last_request_at=clock[0], in_flight=0, waiting=0, hold=False)
    clock[0] += 61.0
    assert h.reconciler.sleeper.tick() == [Turn(name, "sleep")]
    h.reconciler.reconcile(name)
    return token


def test_a_wake_short_of_memory_waits_and_one_that_fails_half_way_starts_cold(tmp_path: Path) -> None:
    """A wake maps back what its engine unmapped, with no rollback. With less free on the device
    than that (a process outside the manager holds it), the tenant waits, saying so; when memory
    goes between that check and the wake, vLLM maps half of it and fails, and the half-mapped
    engine still reports sleeping: it is removed and started cold, through the start gate."""
    h = SimHost(tmp_path, [a100(0)])
    gw, clock = h.gateways, [time.time()]
    try:
        token = asleep_in_place(h, clock, "t1", 40 * GIB)
        assert gw.sleeping[token] and h.store.tenant("t1").sleep.kept_asleep == ENGINE.kept_asleep
        device, outsider = h.nvml.device("GPU-a100-0000"), h.nvml.new_pid()

        device.processes[outsider] = device.cuda_free - 10 * GIB  # 10 GiB left; the wake maps back 38.8
        gw.activities[token] = GatewayActivity(last_request_at=clock[0], in_flight=0, waiting=1, hold=True)
        assert h.reconciler.sleeper.tick() == [Turn("t1", "wake")]
        h.reconciler.reconcile("t1")
        waiting = h.store.tenant("t1")
        assert waiting.status == TenantStatus.WAKING and "waiting for memory on its device" in waiting.reason
        assert gw.sleeping[token], "no wake was tried"

        del device.processes[outsider]  # the memory is back; it goes again as the wake begins
        h.before_wake = lambda: device.processes.__setitem__(outsider, device.cuda_free - 30 * GIB)
        h.reconciler.reconcile("t1")
        failed = h.store.tenant("t1")
        assert failed.status == TenantStatus.WAKING and "failed to wake; starting it cold" in failed.reason
        assert h.runtime.container(names.engine(INSTANCE, "t1")) is None, "the half-mapped engine is removed"
        del device.processes[outsider]
        h.start("t1")  # a cold start: vLLM's own start-up check passes
        assert h.store.tenant("t1").status == TenantStatus.RUNNING and device.used <= device.cuda_total
    finally:
        h.close()


def test_engines_on_different_gpus_start_at_once_and_each_gpu_one_at_a_time(tmp_path: Path) -> None:
    """vLLM measures the free memory of its own device: the start gate is one per device, so an
    8-GPU host starts eight engines at once after a reboot, and a second engine on one GPU still
    waits for the first to finish profiling there."""
    h = SimHost(tmp_path, [a100(0), a100(1)])
    try:
        h.add("alpha", 31000, 30 * GIB, gpu="0")
        h.add("beta", 31001, 30 * GIB, gpu="1")
        h.add("gamma", 31002, 30 * GIB, gpu="0")
        for name in ("alpha", "beta", "gamma"):
            h.reconciler.reconcile(name)
        assert h.runtime.container(names.engine(INSTANCE, "alpha")) is not None
        assert h.runtime.container(names.engine(INSTANCE, "beta")) is not None, "GPU 1 does not wait for GPU 0"
        assert h.runtime.container(names.engine(INSTANCE, "gamma")) is None
        assert h.store.tenant("gamma").reason == "waiting for alpha's engine to finish starting"
        while h.reconciler.queue.get(timeout=0):  # the turns the adds queued
            pass
        h.runtime.set_health(names.engine(INSTANCE, "alpha"), "healthy")
        h.reconciler.reconcile("alpha")  # alpha serves: GPU 0's gate is free
        assert h.reconciler.queue.pending().get("gamma", 1e18) <= time.monotonic(), "gamma's turn is at once"
        h.reconciler.reconcile("gamma")
        assert h.runtime.container(names.engine(INSTANCE, "gamma")) is not None
    finally:
        h.close()


def test_a_wake_holds_its_gpus_start_gate_until_its_engine_has_written_a_token(tmp_path: Path) -> None:
    """Sleep empties the woken engine's activation cache; were another engine to profile while it
    grows back, that one's KV cache would come out short. The device's start gate is held from the
    wake until the gateway's warm-up token has been written."""
    h = SimHost(tmp_path, [a100(0)])
    gw, clock = h.gateways, [time.time()]
    try:
        token = asleep_in_place(h, clock, "alpha", 30 * GIB)
        h.add("beta", 31001, 30 * GIB)
        seen: list[str] = []

        def beta_tries_to_start() -> None:
            h.reconciler.reconcile("beta")
            seen.append(h.store.tenant("beta").reason)

        h.before_wake = beta_tries_to_start
        gw.activities[token] = GatewayActivity(last_request_at=clock[0], in_flight=0, waiting=1, hold=True)
        assert h.reconciler.sleeper.tick() == [Turn("alpha", "wake")]
        h.reconciler.reconcile("alpha")
        assert seen == ["waiting for alpha's engine to finish starting"], "beta waited while alpha woke"
        assert h.store.tenant("alpha").status == TenantStatus.RUNNING
        h.reconciler.reconcile("beta")  # alpha is awake: the gate is free
        assert h.runtime.container(names.engine(INSTANCE, "beta")) is not None
    finally:
        h.close()


def test_the_hosts_ram_holds_every_engine_process_and_the_weights_sleepers_pin(tmp_path: Path) -> None:
    """Each engine's process holds host RAM, and one that sleeps in place keeps its weights' size
    pinned there (for good: PyTorch's host allocator caches the blocks after a wake). On a host
    with 22 GiB of RAM, 4 GiB headroom and 4 GiB per engine, three engines leave 6 GiB: a fourth
    that sleeps needs 7 (its process and its 3 GiB of weights) and is refused with the numbers, one
    that never sleeps fits, and then a fifth does not."""
    h = SimHost(tmp_path, [a100(0)], host_ram=22 * GIB)
    try:
        for i in range(3):
            h.add(f"awake{i}", 31000 + i, 8 * GIB)
        sleeps = TenantSpec(name="sleeps", port=31010, gpu_memory=8 * GIB, model="demo", max_model_len=4096)
        with pytest.raises(AdmissionRefused, match=r"host_memory: 7\.0 GiB of host RAM needed .* only 6\.0 GiB"):
            h.service.create(replace(sleeps, idle_sleep_s=60.0), "test")
        h.add("fourth", 31011, 8 * GIB)  # it does not sleep: its process alone fits
        assert len(h.store.tenants()) == 4
        refused = h.service.placer.assess(8 * GIB, "demo", 4096)
        assert not refused.admitted and refused.failed_checks == ("host_memory",)
        assert refused.numbers["host_left"] == 22 * GIB - 4 * GIB - 4 * 4 * GIB
    finally:
        h.close()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_under_mps_every_admitted_engine_starts_inside_its_cap_beside_its_devices_daemon(
    tmp_path: Path, layout: str
) -> None:
    """GTM_GPU_SHARING=mps: whatever admission lets in, every engine starts inside its pinned memory
    limit (vLLM's own check, then its fixed KV cache against the cap), also after a restart from
    nothing; each device with tenants has one control daemon, every engine joins its own device's,
    and a device's daemon goes once its last tenant has."""
    for trial in range(4):
        rng = random.Random(f"mps-{layout}-{trial}")
        h = SimHost(tmp_path / f"t{trial}", LAYOUTS[layout](), gpu_sharing="mps")
        try:
            admitted: list[str] = []
            for i in range(rng.randint(3, 12)):
                size = rng.choice([7 * GIB, 9 * GIB, 12 * GIB, 20 * GIB, 38 * GIB]) + rng.randrange(0, 2048) * MIB
                try:
                    h.add(f"t{i:02d}", 31000 + i, size)
                except AdmissionRefused:
                    continue
                admitted.append(f"t{i:02d}")
                try:
                    assert h.start(f"t{i:02d}") > 0
                except VllmRefused as exc:
                    pytest.fail(f"{layout}, trial {trial}: t{i:02d} ({size / GIB:.2f} GiB) admitted, then {exc}")
            placed = {h.pids[n][0] for n in admitted}
            assert set(h.daemons()) == placed, "one daemon per device with tenants"
            for name in admitted:
                plan = h.runtime.plan(names.engine(INSTANCE, name))
                assert plan is not None and plan.ipc_mode == f"container:{h.daemons()[h.pids[name][0]]}"
            h.power_cycle()
            for name in sorted(admitted):
                try:
                    h.start(name)
                except VllmRefused as exc:
                    pytest.fail(f"{layout}, trial {trial}: after a restart {name} {exc}")
            gone = h.pids[admitted[0]][0]
            for name in [n for n in admitted if h.pids[n][0] == gone]:
                h.service.remove(name, "test")
                h.reconciler.reconcile(name)
            h.reconciler.resync()
            assert set(h.daemons()) == placed - {gone}
        finally:
            h.close()


def test_an_engine_waits_for_its_mps_daemon_and_a_dead_daemon_is_replaced(tmp_path: Path) -> None:
    h = SimHost(tmp_path, [a100(0)], gpu_sharing="mps")
    try:
        h.add("alpha", 31000, 20 * GIB)
        h.reconciler.reconcile("alpha")
        engine = names.engine(INSTANCE, "alpha")
        (daemon,) = h.daemons().values()
        assert h.runtime.container(engine) is None
        assert "MPS control daemon" in h.store.tenant("alpha").reason
        h.reconciler.reconcile("alpha")
        assert h.runtime.container(engine) is None, "not before the daemon answers"
        assert "waiting for the MPS control daemon" in h.store.tenant("alpha").reason
        h.start("alpha")
        h.runtime.stop_container(daemon)  # the daemon died: its engine's CUDA calls fail with it
        h.runtime.stop_container(engine)
        h.stop("alpha")
        h.reconciler.clock = lambda: time.time() + 3600  # past the engine's backoff
        h.reconciler.reconcile("alpha")
        state = h.runtime.container(daemon)
        assert state is not None and state.status == "running", "started again"
        h.daemons_up()
        h.reconciler.reconcile("alpha")
        h.boot("alpha")  # the engine started again, beside the new daemon
        h.reconciler.settings = h.settings.model_copy(update={"gpu_sharing": "none"})
        h.reconciler.resync()
        assert h.daemons() == {}, "MPS turned off: its daemons go; the engines are replaced without it"
    finally:
        h.close()
