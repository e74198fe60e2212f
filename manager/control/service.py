"""Tenant operations: the one place where admin actions are validated, admitted,
stored, audited and handed to the reconciler. The API and (through it) the CLI
and console all call this."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from manager import keys, names
from manager.control import model_files
from manager.control.admission import AdmissionInput, Decision, place
from manager.control.costs import Share, split
from manager.control.members import MemberService, removing_refusal
from manager.control.modelfit import (
    ModelFootprint,
    max_positions,
    read_config,
    takes_images,
)
from manager.control.overcommit import counted_beside, resident
from manager.control.plan import docker_words, port_probe_plan, port_taken
from manager.control.quant import checkpoint_method, resolve
from manager.control.reconciler import Reconciler
from manager.control.records import AuditRow, KeyRow, ReservationEvent, TenantRow, UsageTotals
from manager.control.store import TenantStore
from manager.domain import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    FIELDS_BY_NAME,
    QUOTA_FIELDS,
    Quotas,
    TenantSpec,
    TenantStatus,
    check_bounds,
    unknown_fields,
)
from manager.errors import AdmissionRefused, Conflict, GtmError, InvalidInput
from manager.gpu import DeviceMemory, Inventory, device_label, find_device, placed_on
from manager.gpu.cpu import read_meminfo
from manager.runtime.protocol import Runtime
from manager.settings import Settings
from manager.sizes import format_size

T = TypeVar("T")
MEMINFO = Path("/proc/meminfo")
MEASURE_THREADS = 16
"""Engines measured at once; more tenants than this on one host take a second per 16."""


@dataclass(frozen=True)
class TenantUsage:
    name: str
    reserved: int
    measured: int | None
    unknown: bool = False
    """The engine runs but the driver does not tell its use (MIG, vGPU): ``measured`` is None."""


@dataclass(frozen=True)
class DeviceCapacity:
    """One device's ledger: its tenants' reservations, each with a process overhead beside it."""

    device: DeviceMemory
    headroom: int
    process_overhead: int
    tenants: list[TenantUsage] = field(default_factory=list)

    @property
    def reserved(self) -> int:
        return sum(t.reserved for t in self.tenants)

    @property
    def unreserved(self) -> int:
        """The largest reservation a new tenant can have here (its own overhead counted)."""
        taken = self.reserved + (len(self.tenants) + 1) * self.process_overhead
        return self.device.usable - self.headroom - taken


@dataclass(frozen=True)
class Capacity:
    mode: str
    devices: list[DeviceCapacity]
    headroom: int

    @property
    def device(self) -> DeviceMemory:
        """The host's first device (the only one in cpu mode)."""
        return self.devices[0].device

    @property
    def tenants(self) -> list[TenantUsage]:
        return [t for d in self.devices for t in d.tenants]

    @property
    def reserved(self) -> int:
        return sum(d.reserved for d in self.devices)

    @property
    def unreserved(self) -> int:
        """The largest reservation one new tenant can get on any device."""
        return max(d.unreserved for d in self.devices)


@dataclass(frozen=True)
class CatalogEntry:
    """A model in the models volume, with the smallest reservation admission accepts for it."""

    name: str
    architecture: str
    parameters: int
    dtype: str
    weight_bytes: int
    takes_images: bool
    quantization: str | None
    minimum_gpu_memory: int
    """Smallest --gpu-memory at the default --max-model-len (admission's own model-fit figure)."""
    minimum_gpu_memory_at: int | None
    """... at the --max-model-len asked for, if any."""
    problem: str = ""
    """Why the model cannot be served as it is ('' when it can)."""


@dataclass(frozen=True)
class Created:
    tenant: TenantRow
    key: keys.IssuedKey
    decision: Decision


ASLEEP_BY_OVERCOMMIT = (
    "admitted by overcommit: it starts on its first request, once idle tenants are put to sleep to make room"
)


def _admitted_asleep(decision: Decision) -> dict[str, Any]:
    """A tenant that fits only by overcommit is created asleep: its first request wakes it."""
    return {"status": TenantStatus.ASLEEP, "reason": ASLEEP_BY_OVERCOMMIT} if decision.by_overcommit else {}


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The declared fields an admin gave, as the spec holds them: None (not given) left out, 0 of
    a field where 0 means unset (``--idle-sleep 0``: never) made None; a quota given as None stays
    (it lifts the limit). InvalidInput for a field no declaration knows."""
    unknown_fields(values)
    return {k: FIELDS_BY_NAME[k].normal(v) for k, v in values.items() if v is not None or k in QUOTA_FIELDS}


def device_of(row: TenantRow, devices: list[DeviceMemory]) -> DeviceMemory | None:
    return placed_on(row.device, devices)


def _on(row: TenantRow, devices: list[DeviceMemory], device: DeviceMemory) -> bool:
    placed = device_of(row, devices)
    return placed is not None and placed.uuid == device.uuid


class TenantService:
    def __init__(
        self,
        settings: Settings,
        store: TenantStore,
        runtime: Runtime,
        inventory: Inventory,
        reconciler: Reconciler,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.platform = settings.platform
        self.clock = clock  # when reservations begin, change and end: what the cost split prices
        self.store = store
        self.runtime = runtime
        self.inventory = inventory
        self.reconciler = reconciler
        self._admission = threading.Lock()  # one admission decision (or member change) at a time
        self.members = MemberService(store, reconciler, self._admission)
        self.sizing = reconciler.sizing  # one rule, one cache: admission's and the engine's arguments

    # ---------------------------------------------------------------- reading (routes and pages: here, not the store)
    def tenants(self) -> list[TenantRow]:
        return self.store.tenants()

    def tenant(self, name: str) -> TenantRow:
        return self.store.tenant(name)

    def usage(self, name: str, since: float, until: float | None = None) -> UsageTotals:
        """The tenant's requests and tokens between ``since`` and ``until`` (UNIX seconds); only its
        own: a tenant removed earlier under the same name kept its records (for the cost split)."""
        row = self.store.find_tenant(name)
        return self.store.usage_totals(name, max(since, row.created_at) if row else since, until)

    def usage_counters(self) -> list[tuple[str, str, UsageTotals]]:
        """(tenant, member, totals) over all time, removed tenants and members included."""
        return self.store.usage_counters()

    def usage_daily(self, name: str, since: float) -> list[tuple[str, int, int]]:
        return self.store.usage_daily(name, since)

    def api_keys(self, name: str) -> list[KeyRow]:
        """Every key of the tenant's members, oldest first (NotFound for an unknown tenant)."""
        self.store.tenant(name)
        return self.store.keys(name)

    def audit_log(
        self, tenant: str | None = None, action: str | None = None, limit: int = 200, before: int | None = None
    ) -> list[AuditRow]:
        return self.store.audit_log(tenant, action, limit, before)

    def audit_actions(self) -> list[str]:
        """Every action the audit trail holds (the console's filter)."""
        return self.store.audit_actions()

    def record(self, actor: str, action: str, result: str, detail: dict[str, Any]) -> None:
        """An audit row for an event that changes no state (a console login)."""
        self.store.audit(actor, action, None, result, detail)

    def cost(self, month: str, total: float, asleep_rate: float | None = None) -> list[Share]:
        """The month's cost split between tenants, and inside each between its members; asleep
        memory-hours at ``asleep_rate`` of an awake one's (None: what a sleeper keeps, its engine's
        CUDA context where it sleeps in place)."""
        return split(month, total, self.store, self.clock(), asleep_rate, self.kept_asleep)

    # ---------------------------------------------------------------- measuring
    def measured_use(self, only: str | None = None) -> dict[str, int | None]:
        """Each tenant's measured use (or ``only`` that tenant's): NVML per-process memory mapped to
        its engine container (nvml), or its engine's cgroup memory (cpu). Engines are read at once,
        not one after another: Docker answers a memory read in about a second (20.10 waits for its
        next stats sample even for a one-shot read), so N engines read in turn took N seconds of
        every list-tenants, console page, /metrics scrape and admission."""
        inst = self.settings.instance
        engines = {
            c.tenant: c
            for c in self.runtime.containers(names.selector(inst, role=names.Role.ENGINE))
            if c.tenant and c.status == "running" and only in (None, c.tenant)
        }
        if not engines:
            return {}
        containers = [c.name for c in engines.values()]
        if self.platform.reservation_is_host_memory:  # its cgroup memory is its use
            return dict(zip(engines, self._each(self.runtime.memory_usage, containers), strict=True))
        procs = self.inventory.processes()
        pids = self._each(self.runtime.container_pids, containers)
        out: dict[str, int | None] = {}
        for tenant, ps in zip(engines, pids, strict=True):
            mine = [p.used for p in procs if p.pid in ps]
            # one process whose use the driver hides (MIG, vGPU) makes the engine's use unknown, not less
            out[tenant] = None if None in mine else sum(u for u in mine if u is not None)
        return out

    @staticmethod
    def _each(read: Callable[[str], T], containers: list[str]) -> list[T]:
        """``read`` of every container, concurrently; results in the containers' order."""
        if len(containers) == 1:
            return [read(containers[0])]
        with ThreadPoolExecutor(min(len(containers), MEASURE_THREADS), thread_name_prefix="measure") as pool:
            return list(pool.map(read, containers))

    def failure_log(self, name: str, lines: int = 60) -> str:
        """The engine's log tail from its last failure (kept after the container is replaced); ''
        once the engine has come up healthy again."""
        failure = self.store.engine_failure(name)
        return "\n".join(failure.log.splitlines()[-lines:]) if failure else ""

    @property
    def process_overhead(self) -> int:
        """What each engine holds beyond its reservation (``Platform.process_overhead``)."""
        return self.platform.process_overhead(self.settings.process_overhead)

    @property
    def kept_asleep(self) -> int:
        """What a sleeping tenant keeps of its device (``Platform.kept_asleep``)."""
        return self.platform.kept_asleep(self.settings.process_overhead)

    def capacity(self) -> Capacity:
        devices = self.inventory.devices()
        rows = self.store.tenants()
        measured = self.measured_use()
        ledgers = []
        for device in devices:
            usage = [
                TenantUsage(
                    r.spec.name,
                    r.spec.gpu_memory,
                    measured.get(r.spec.name),
                    r.spec.name in measured and measured[r.spec.name] is None,
                )
                for r in rows
                if _on(r, devices, device)
            ]
            ledgers.append(DeviceCapacity(device, self.settings.headroom, self.process_overhead, usage))
        return Capacity(self.platform.name, ledgers, self.settings.headroom)

    # ---------------------------------------------------------------- admission
    def model_minimum(
        self,
        model: str,
        max_model_len: int,
        quantized: bool,
        max_images: int = 0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_num_seqs: int | None = None,
    ) -> int:
        return self.sizing.minimum(model, max_model_len, quantized, max_images, max_image_pixels, max_num_seqs)

    def _minimum(self, footprint: ModelFootprint, max_model_len: int, images: int = 0) -> int:
        """Admission's model-fit figure: ``enginefit.minimum``, the rule the engine is started by."""
        return self.sizing.minimum_of(footprint, max_model_len, images)

    def concurrency(self, spec: TenantSpec) -> int | None:
        """The sequences the tenant's engine runs at once (None while its model cannot be read)."""
        try:
            return self.sizing.fit(spec).max_num_seqs
        except GtmError:
            return None

    def import_model(self, source: str, name: str | None, actor: str) -> CatalogEntry:
        """Checks a model directory and copies it into the models volume; audited."""
        try:
            imported = model_files.import_model(self.settings.models_dir, Path(source), name)
        except GtmError as exc:
            self.store.audit(actor, "import-model", None, "refused", {"source": source, "error": exc.message})
            raise
        self.store.audit(actor, "import-model", None, "ok", {"source": source, "model": imported})
        return self._catalog_entry(imported, None)

    def remove_model(self, name: str, actor: str) -> None:
        """Deletes a model from the models volume; refused while a tenant uses it (named). Audited."""
        with self._admission:  # no tenant is admitted on the model while it goes
            read_config(self.settings.models_dir, name)  # NotFound, listing the models there are
            users = sorted(r.spec.name for r in self.store.tenants() if r.spec.model == name)
            if users:
                self.store.audit(actor, "remove-model", None, "refused", {"model": name, "tenants": users})
                raise Conflict(
                    f"model {name!r} is used by tenant{'s' if len(users) > 1 else ''} {', '.join(users)}; "
                    "move them to another model (update-tenant --model) or remove them first"
                )
            model_files.remove_model(self.settings.models_dir, name)
            self.store.audit(actor, "remove-model", None, "ok", {"model": name})

    def catalog(self, max_model_len: int | None = None) -> list[CatalogEntry]:
        """Every model directory in the models volume; the minimums come from ``_minimum``, the
        function admission's model-fit check uses, so the two never disagree."""
        return [self._catalog_entry(name, max_model_len) for name in self.model_names()]

    def model_names(self) -> list[str]:
        """The model directories in the models volume, by name (nothing in them read)."""
        root = self.settings.models_dir
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _catalog_entry(self, name: str, max_model_len: int | None) -> CatalogEntry:
        try:
            footprint, config = self.sizing.footprint(name, quantized=False)  # as stored, when pre-quantized
        except GtmError as exc:
            return CatalogEntry(name, "", 0, "", 0, False, None, 0, None, exc.message)
        text = config.get("text_config", config)
        vision = takes_images(config)
        # the minimum of a tenant with the default image limits (add-tenant's defaults for this model)
        images = self.sizing.images(config, DEFAULT_MAX_IMAGES, DEFAULT_MAX_IMAGE_PIXELS)
        return CatalogEntry(
            name=name,
            architecture=str((config.get("architectures") or ["unknown"])[0]),
            parameters=footprint.parameters,
            dtype=str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "unknown"),
            weight_bytes=footprint.weight_bytes,
            takes_images=vision,
            quantization=method[0] if (method := checkpoint_method(config)) else None,
            minimum_gpu_memory=self._minimum(footprint, self.settings.default_max_model_len, images),
            minimum_gpu_memory_at=self._minimum(footprint, max_model_len, images) if max_model_len else None,
        )

    def assess(
        self,
        requested: int,
        model: str,
        max_model_len: int,
        quantization: str | None = None,
        tenant: str | None = None,
        gpu: str | None = None,
    ) -> Decision:
        """What-if: would this reservation fit? A resized ``tenant`` keeps its own image limits and
        engine options; a new one gets the model's defaults, as add-tenant would. Creates nothing."""
        own = self.store.find_tenant(tenant) if tenant else None
        if own is not None:
            spec = own.spec.with_changes(gpu_memory=requested, model=model, max_model_len=max_model_len)
        else:
            spec = TenantSpec(
                name="what-if",
                port=0,
                gpu_memory=requested,
                model=model,
                max_model_len=max_model_len,
                max_images=self._default_max_images(model),
            )
        spec = spec.with_changes(quantization=quantization)
        return self.placement(spec, tenant=tenant, gpu=gpu)[1]

    def placement(
        self, spec: TenantSpec, tenant: str | None = None, gpu: str | None = None
    ) -> tuple[DeviceMemory | None, Decision]:
        """Where a new (or resized, ``tenant``) reservation of ``spec`` goes and the decision that
        says so; creates nothing. The candidates: the device ``gpu`` names (index or UUID); else a
        resized tenant's own device (tenants move only when the admin says ``--gpu``); else every
        device, best fit first (``admission.place``). With overcommit, the tenants awake now decide
        first; a reservation that fits only while others sleep comes back ``by_overcommit``."""
        requested = spec.gpu_memory
        self.check_model_len(spec.model, spec.max_model_len)  # what-if says so too, before any number
        devices = self.inventory.devices()
        own = self.store.find_tenant(tenant) if tenant else None
        if gpu is not None:
            candidates = [find_device(devices, gpu)]
        elif own is not None:
            current = device_of(own, devices)
            candidates = [current] if current else devices
        else:
            candidates = devices
        rows = [r for r in self.store.tenants() if r.spec.name != tenant]
        measured = self.measured_use()
        least = self.model_minimum(
            spec.model,
            spec.max_model_len,
            bool(spec.quantization),
            spec.max_images,
            spec.max_image_pixels,
            spec.max_num_seqs,
        )
        overhead = self.process_overhead
        always_on = spec.always_on

        def ledger(
            device: DeviceMemory, counted: list[TenantRow], beside: tuple[int, int] | None = None, measure: bool = True
        ) -> AdmissionInput:
            """``counted``: the tenants whose reservations hold the device now; ``beside``: what is
            counted instead (bytes, engines); ``measure``: whether what the device measures decides."""
            reserved, engines = beside or (sum(r.spec.gpu_memory for r in counted), len(counted))
            return AdmissionInput(
                requested=requested,
                total=device.total,
                headroom=self.settings.headroom,
                reserved_by_others=reserved,
                measured_free=device.free,
                measured_used=device.used,
                not_yet_taken_by_others=sum(self._not_taken(r, measured, overhead) for r in counted),
                reclaimable=(measured.get(own.spec.name) or 0) if own and _on(own, devices, device) else 0,
                process_overhead=overhead,
                model_minimum=least,
                system_reserved=device.reserved,
                others=engines,
                device=device_label(device) if len(devices) > 1 or gpu is not None else "",
                measure=measure,
            )

        here = {d.uuid: [r for r in rows if _on(r, devices, d)] for d in candidates}
        if not self.settings.overcommit:
            index, decision = place([ledger(d, here[d.uuid]) for d in candidates])
            return (candidates[index] if index is not None else None), decision
        # overcommit: the tenants awake now (and what sleepers keep), else (it starts asleep) every
        # one that may sleep asleep
        keeps = self.platform.sleeps_in_place
        awake = []
        for d in candidates:
            up = [r for r in here[d.uuid] if r.status != TenantStatus.ASLEEP]
            asleep = len(here[d.uuid]) - len(up)
            awake.append(ledger(d, up, (sum(r.spec.gpu_memory for r in up), len(up) + (asleep if keeps else 0))))
        index, decision = place(awake)
        if index is not None:
            return candidates[index], replace(decision, messages=("fits awake now", *decision.messages))
        beside = [
            ledger(d, [], counted_beside([resident(r) for r in here[d.uuid]], always_on, keeps), measure=False)
            for d in candidates
        ]
        index, guaranteed = place(beside)
        if index is None:
            return None, replace(
                guaranteed,
                messages=("even with every tenant that may sleep asleep (overcommit):", *guaranteed.messages),
            )
        return candidates[index], replace(
            guaranteed,
            by_overcommit=True,
            messages=(
                "fits only by overcommit: it starts asleep, and its first request wakes it once the least "
                f"recently used idle tenants are put to sleep (awake now: {decision.messages[-1]})",
                *guaranteed.messages,
            ),
        )

    @staticmethod
    def _not_taken(row: TenantRow, measured: dict[str, int | None], overhead: int) -> int:
        """What a tenant's engine may still take of the device: its reservation and context, less what
        it measurably holds. An engine whose use the driver hides (MIG, vGPU) and that is running has
        taken all of it (vLLM allocates its whole KV cache at start); one not running has taken nothing."""
        name = row.spec.name
        if name in measured and measured[name] is None:
            return 0
        return max(0, row.spec.gpu_memory + overhead - (measured.get(name) or 0))

    def _refuse(self, actor: str, action: str, tenant: str, decision: Decision) -> AdmissionRefused:
        self.store.audit(
            actor, action, tenant, "refused", {"failed_checks": list(decision.failed_checks), **decision.numbers}
        )
        return AdmissionRefused(
            f"tenant {tenant!r} does not fit: " + " ".join(decision.messages),
            details={"failed_checks": list(decision.failed_checks), "numbers": decision.numbers},
        )

    # ---------------------------------------------------------------- validation
    def check_model_len(self, model: str, max_model_len: int) -> None:
        """No context longer than the model's own (vLLM refuses such an engine at start)."""
        limit = max_positions(read_config(self.settings.models_dir, model))
        if limit is not None and max_model_len > limit:
            raise InvalidInput(
                f"--max-model-len {max_model_len} is beyond model {model}'s own limit of {limit} positions "
                f"(max_position_embeddings in its config.json); use --max-model-len {limit} or less"
            )

    def _check_host(self, spec: TenantSpec) -> None:
        """Sizes the host itself bounds: shared memory lives in host RAM."""
        total = read_meminfo(MEMINFO).get("MemTotal")
        if total and spec.shm_size > total:
            raise InvalidInput(
                f"--shm-size {format_size(spec.shm_size)} is more than the host's memory ({format_size(total)}); "
                "use less (the default is 1G)"
            )

    def _check_port(self, port: int, tenant: str | None = None) -> None:
        if port == self.settings.api_port:
            raise InvalidInput(f"port {port} is the manager's own API port; pick another")
        for row in self.store.tenants():
            if row.spec.port == port and row.spec.name != tenant:
                raise Conflict(f"port {port} is already used by tenant {row.spec.name!r}; pick another")
        owner = self.runtime.published_ports().get(port)
        if owner and owner != names.gateway(self.settings.instance, tenant or ""):
            raise Conflict(f"port {port} is already published by container {owner!r}; pick another")
        if owner is None:  # held by a program Docker does not know? Docker is asked to publish it
            error = self.runtime.publish_error(port_probe_plan(self.settings, port))
            if error is not None and port_taken(error):
                raise Conflict(
                    f"port {port} is in use by another program on the host (Docker: {docker_words(error)}); "
                    "pick another port, or stop that program"
                )

    # ---------------------------------------------------------------- actions
    def create(self, spec: TenantSpec, actor: str, gpu: str | None = None) -> Created:
        """``gpu``: the device to place the tenant on (index or UUID); None picks the best fit."""
        names.validate_tenant_name(spec.name)
        check_bounds(spec)
        self._check_host(spec)
        self.check_model_len(spec.model, spec.max_model_len)
        with self._admission:
            if self.store.find_tenant(spec.name):
                raise Conflict(f"tenant {spec.name!r} already exists; use update-tenant to change it")
            self._check_port(spec.port)
            device, decision = self.placement(spec, gpu=gpu)
            if device is None:
                raise self._refuse(actor, "add-tenant", spec.name, decision)
            issued = keys.issue()
            now = self.clock()
            with self.store.transaction() as db:
                self.store.insert_tenant(
                    db,
                    spec,
                    gateway_token=secrets.token_urlsafe(32),
                    device=device.uuid,
                    **_admitted_asleep(decision),
                )
                self.store.insert_reservation(db, spec.name, ReservationEvent.ADD, spec.gpu_memory, now)
                if decision.by_overcommit:
                    self.store.insert_reservation(db, spec.name, ReservationEvent.SLEEP, spec.gpu_memory, now)
                # the first member, named like the tenant, holds the key add-tenant prints
                self.store.insert_member(db, spec.name, spec.name, Quotas(), now)
                self.store.insert_key(
                    db, KeyRow(issued.id, spec.name, keys.PREFIX, issued.hash, now, None, None, member=spec.name)
                )
                self.store.audit(
                    actor,
                    "add-tenant",
                    spec.name,
                    "ok",
                    {
                        "gpu_memory": spec.gpu_memory,
                        "port": spec.port,
                        "model": spec.model,
                        "member": spec.name,
                        "key_id": issued.id,
                        "device": device.uuid,
                        "by_overcommit": decision.by_overcommit,
                        **decision.numbers,
                    },
                    tx=db,
                )
        self.reconciler.enqueue(spec.name)
        return Created(self.store.tenant(spec.name), issued, decision)

    def update(self, name: str, actor: str, gpu: str | None = None, **values: Any) -> TenantRow:
        """Changes declared fields (``domain.TENANT_FIELDS``, quotas among them): None leaves one
        as it is, except a quota, which it lifts; 0 unsets a field where 0 means unset. ``gpu``
        moves the tenant to that device (index or UUID); without it, a tenant stays on its own."""
        with self._admission:
            row = self.store.tenant(name)
            if row.status == TenantStatus.REMOVING:
                raise Conflict(removing_refusal(name))
            changes = given(values)
            if "model" in changes and "max_images" not in changes:
                changes["max_images"] = self._default_max_images(str(changes["model"]))
            if "quantization" in changes or "model" in changes:
                model_after = str(changes.get("model", row.spec.model))
                changes["quantization"] = self._quantization(
                    model_after, changes.get("quantization", row.spec.quantization)
                )
            new = row.spec.changed(changes)
            check_bounds(new)
            self._check_host(new)
            if (new.model, new.max_model_len) != (row.spec.model, row.spec.max_model_len):
                self.check_model_len(new.model, new.max_model_len)
            devices = self.inventory.devices()
            placed_on = device_of(row, devices)
            here = placed_on.uuid if placed_on else None
            moved = None
            if gpu is not None and find_device(devices, gpu).uuid != here:
                moved = find_device(devices, gpu).uuid
            if new == row.spec and moved is None:
                raise InvalidInput("nothing to change: pass at least one option that differs from the current spec")
            if new.port != row.spec.port:
                self._check_port(new.port, tenant=name)
            recreate = new.engine_hash() != row.spec.engine_hash() or moved is not None
            asleep = False
            # overcommit: a tenant that becomes always on is counted in full beside every other's wake
            pinned = self.settings.overcommit and new.always_on and not row.spec.always_on
            if recreate or pinned:
                device, decision = self.placement(new, tenant=name, gpu=moved)
                if device is None:
                    raise self._refuse(actor, "update-tenant", name, decision)
                asleep = recreate and decision.by_overcommit
                if device.uuid != here:  # asked for, or its own device is gone from the host
                    moved = device.uuid
            audited = {k: v for k, v in new.flat().items() if k in changes and v != row.spec.flat()[k]}
            if moved is not None:
                audited["device"] = moved
            with self.store.transaction() as db:
                self.store.update_spec(db, new, device=moved)
                if new.gpu_memory != row.spec.gpu_memory:
                    self.store.insert_reservation(db, name, ReservationEvent.RESIZE, new.gpu_memory, self.clock())
                if recreate and asleep:
                    # overcommit: it fits only while others sleep, so it sleeps (its next request wakes it)
                    self.store.set_status(db, name, TenantStatus.ASLEEP, ASLEEP_BY_OVERCOMMIT)
                    if row.status != TenantStatus.ASLEEP:
                        self.store.insert_reservation(db, name, ReservationEvent.SLEEP, new.gpu_memory, self.clock())
                elif recreate:
                    # the desired engine changed: the tenant is pending until the new one serves
                    # (so `update-tenant --wait` never mistakes the old engine for the new one)
                    self.store.set_status(db, name, TenantStatus.PENDING, "engine to be recreated with the new spec")
                elif new.port != row.spec.port and row.status == TenantStatus.FAILED:
                    # a move off a taken port: the old port's failure is not this spec's
                    self.store.set_status(db, name, TenantStatus.PENDING, f"gateway to be recreated on port {new.port}")
                self.store.audit(actor, "update-tenant", name, "ok", audited, tx=db)
        self.reconciler.enqueue(name)
        return self.store.tenant(name)

    def remove(self, name: str, actor: str) -> None:
        """Marks the tenant removing (the reconciler takes its containers, network and volumes
        down): under the lock every change of a tenant takes, so none lands after it."""
        with self._admission:
            already = self.store.tenant(name).status == TenantStatus.REMOVING
            with self.store.transaction() as db:
                self.store.set_status(db, name, TenantStatus.REMOVING)
                if not already:  # its reservation ends once, at the first removal asked
                    self.store.insert_reservation(db, name, ReservationEvent.REMOVE, 0, self.clock())
                self.store.audit(actor, "remove-tenant", name, "ok", tx=db)
        self.reconciler.enqueue(name)

    def rotate_key(self, name: str, actor: str, grace_s: float, member: str | None = None) -> keys.IssuedKey:
        """A new key for a member, by default the tenant's first member (see ``MemberService``)."""
        return self.members.rotate_key(name, actor, grace_s, member)

    def revoke_key(self, name: str, key_id: str, actor: str) -> None:
        self.members.revoke_key(name, key_id, actor)

    def _default_max_images(self, model: str) -> int:
        """A tenant of a model that takes images takes ``DEFAULT_MAX_IMAGES`` a request; of a text model, none."""
        return DEFAULT_MAX_IMAGES if takes_images(read_config(self.settings.models_dir, model)) else 0

    def _quantization(self, model: str, requested: object) -> str | None:
        """``--quant`` checked against the engine and the model; int4 mapped by the rule in control.quant."""
        text = requested if isinstance(requested, str) else None
        return resolve(text, model, read_config(self.settings.models_dir, model), self.platform)

    def new_spec(self, name: str, **values: Any) -> TenantSpec:
        """A new tenant's spec from the declared fields given (None or missing: the default). The
        host fills in the model and its context length; the model, how many images a request may
        carry (a model that takes images: ``DEFAULT_MAX_IMAGES``; a text model: none)."""
        chosen = given(values)
        model = str(chosen.get("model") or self.settings.default_model)
        chosen["model"] = model
        chosen.setdefault("max_model_len", self.settings.default_max_model_len)
        chosen.setdefault("max_images", self._default_max_images(model))
        chosen["quantization"] = self._quantization(model, chosen.get("quantization"))
        missing = [FIELDS_BY_NAME[k].flag for k in ("port", "gpu_memory") if k not in chosen]
        if missing:
            raise InvalidInput(f"a new tenant needs {' and '.join(missing)}")
        base = TenantSpec(
            name=names.validate_tenant_name(name),
            port=chosen.pop("port"),
            gpu_memory=chosen.pop("gpu_memory"),
            model=model,
            max_model_len=chosen.pop("max_model_len"),
        )
        spec = base.changed(chosen)
        check_bounds(spec)
        return spec
