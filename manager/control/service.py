"""Tenant operations: the one place where admin actions are validated, admitted,
stored, audited and handed to the reconciler. The API and (through it) the CLI
and console all call this. Its jobs beside the changes: ``meter`` (what the devices hold,
``control.capacity``), ``models`` (the models volume, ``control.catalog``) and ``placer`` (where a
reservation goes, ``control.placement``)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from manager import keys, names
from manager.control.admission import Decision
from manager.control.capacity import Meter, device_of
from manager.control.catalog import ModelCatalog
from manager.control.costs import Share, split
from manager.control.latency import WINDOW_S as LATENCY_WINDOW_S
from manager.control.latency import Latency, summarise
from manager.control.members import MemberService, removing_refusal
from manager.control.placement import Placer
from manager.control.plan import docker_words, port_probe_plan, port_taken
from manager.control.reconciler import Reconciler
from manager.control.records import AuditRow, KeyRow, Reach, ReservationEvent, TenantRow, UsageTotals
from manager.control.store import TenantStore
from manager.domain import (
    FIELDS_BY_NAME,
    QUOTA_FIELDS,
    Quotas,
    TenantSpec,
    TenantStatus,
    check_bounds,
    unknown_fields,
)
from manager.errors import AdmissionRefused, Conflict, GtmError, InvalidInput
from manager.gpu import Inventory, device_label, select_devices
from manager.gpu.cpu import read_meminfo
from manager.runtime.protocol import Runtime
from manager.settings import Settings
from manager.sizes import format_size

T = TypeVar("T")
MEMINFO = Path("/proc/meminfo")
MEASURE_THREADS = 16
"""Engines measured at once; more tenants than this on one host take a second per 16."""


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


MANAGER_ACTOR = "manager"
"""Who the audit trail names for what the manager does on its own (as the store's sleep records)."""


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
        self.meter = Meter(settings, store, runtime, inventory)
        self.models = ModelCatalog(settings, store, reconciler.sizing, runtime, self._admission)
        self.placer = Placer(settings, store, inventory, self.meter, self.models)
        self._refused_again: dict[str, str] = {}
        if settings.runtime == "swarm":
            reconciler.place_again = self.place_again

    # ---------------------------------------------------------------- reading (routes and pages: here, not the store)
    def tenants(self) -> list[TenantRow]:
        return self.store.tenants()

    def tenant(self, name: str) -> TenantRow:
        return self.store.tenant(name)

    def reach(self, rows: list[TenantRow]) -> dict[str, Reach]:
        """Where each tenant's clients reach it, from one reading of the devices: its URL
        (``http://ADDRESS:PORT/v1``) and, on a swarm, its node. On a swarm the URL is at its node's
        address; on one host at the address its port is bound to, and none when that is every
        interface (the host's name is the admin's to give). None either while the devices cannot be
        read."""
        if self.settings.runtime != "swarm":
            bound = self.settings.tenant_bind_address
            here = "" if bound in ("0.0.0.0", "::", "") else bound
            return {r.spec.name: Reach(url=f"http://{here}:{r.spec.port}/v1") for r in rows} if here else {}
        try:
            devices = self.inventory.devices()
        except GtmError:
            return {}
        out = {}
        for row in rows:
            d = device_of(row, devices)
            if d is not None and d.node:
                url = f"http://{d.node_address}:{row.spec.port}/v1" if d.node_address else ""
                out[row.spec.name] = Reach(url=url, node=d.node_label)
        return out

    def usage(self, name: str, since: float, until: float | None = None) -> UsageTotals:
        """The tenant's requests and tokens between ``since`` and ``until`` (UNIX seconds); only its
        own: a tenant removed earlier under the same name kept its records (for the cost split)."""
        row = self.store.find_tenant(name)
        return self.store.usage_totals(name, max(since, row.created_at) if row else since, until)

    def usage_counters(self) -> list[tuple[str, str, UsageTotals]]:
        """(tenant, member, totals) over all time, removed tenants and members included."""
        return self.store.usage_counters()

    def latency(self, name: str, now: float | None = None) -> list[Latency]:
        """Time to first token and time queued over the last hour, for the tenant ('' first) and
        each member (``latency.summarise``)."""
        since = (now if now is not None else time.time()) - LATENCY_WINDOW_S
        return summarise(self.store.latencies(name, since))

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
        return split(month, total, self.store, self.clock(), asleep_rate, self.meter.kept_asleep)

    # ---------------------------------------------------------------- measuring
    def failure_log(self, name: str, lines: int = 60) -> str:
        """The engine's log tail from its last failure (kept after the container is replaced); ''
        once the engine has come up healthy again."""
        failure = self.store.engine_failure(name)
        return "\n".join(failure.log.splitlines()[-lines:]) if failure else ""

    # ---------------------------------------------------------------- admission
    def _refuse(self, actor: str, action: str, tenant: str, decision: Decision) -> AdmissionRefused:
        self.store.audit(
            actor, action, tenant, "refused", {"failed_checks": list(decision.failed_checks), **decision.numbers}
        )
        return self._refusal(tenant, decision)

    @staticmethod
    def _refusal(tenant: str, decision: Decision) -> AdmissionRefused:
        return AdmissionRefused(
            f"tenant {tenant!r} does not fit: " + " ".join(decision.messages),
            details={"failed_checks": list(decision.failed_checks), "numbers": decision.numbers},
        )

    # ---------------------------------------------------------------- validation
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
        self.models.check_model_len(spec.model, spec.max_model_len)
        self.reconciler.vault.check(spec)
        with self._admission:
            if self.store.find_tenant(spec.name):
                raise Conflict(f"tenant {spec.name!r} already exists; use update-tenant to change it")
            self._check_port(spec.port)
            device, decision = self.placer.place(spec, gpu=gpu)
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
                changes["max_images"] = self.models.default_max_images(str(changes["model"]))
            if "quantization" in changes or "model" in changes:
                model_after = str(changes.get("model", row.spec.model))
                changes["quantization"] = self.models.quantization(
                    model_after, changes.get("quantization", row.spec.quantization)
                )
            new = row.spec.changed(changes)
            if {"model", "tool_call_parser", "reasoning_parser"} & set(changes):
                new = self.models.with_parsers(new)
            check_bounds(new)
            self._check_host(new)
            self.reconciler.vault.check(new, row.spec)
            if (new.model, new.max_model_len) != (row.spec.model, row.spec.max_model_len):
                self.models.check_model_len(new.model, new.max_model_len)
            devices = self.inventory.devices()
            placed_on = device_of(row, devices)
            here = placed_on.uuid if placed_on else None
            moved = None
            if gpu is not None and here not in {d.uuid for d in select_devices(devices, gpu)}:
                moved = gpu  # placed below: its device, or the tightest fit among its node's
            if new == row.spec and moved is None:
                raise InvalidInput("nothing to change: pass at least one option that differs from the current spec")
            if new.port != row.spec.port:
                self._check_port(new.port, tenant=name)
            recreate = new.engine_hash() != row.spec.engine_hash() or moved is not None
            asleep = False
            # overcommit: a tenant that becomes always on is counted in full beside every other's wake
            pinned = self.settings.overcommit and new.always_on and not row.spec.always_on
            if recreate or pinned:
                device, decision = self.placer.place(new, tenant=name, gpu=moved)
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

    def place_again(self, name: str, gateway_node: str = "") -> str:
        """A swarm node was lost: the tenant is admitted again on every node that reports, under the
        lock every admission takes, and goes where it fits (audited, with the numbers). Returns the
        device it goes to; when none has room, raises ``AdmissionRefused``, audited once for each
        different refusal (the reconciler tries again). ``gateway_node``: the node its gateway was
        on, whose spool is read once that node is back (``control.drains``)."""
        with self._admission:
            row = self.store.tenant(name)
            device, decision = self.placer.place(row.spec, tenant=name)
            if device is None:
                refused = self._refusal(name, decision)
                if self._refused_again.get(name) != refused.message:
                    self._refused_again[name] = refused.message
                    self._refuse(MANAGER_ACTOR, "place-again", name, decision)
                raise refused
            self._refused_again.pop(name, None)
            where = device_label(device) or device.uuid
            with self.store.transaction() as db:
                self.store.update_spec(db, row.spec, device=device.uuid)
                if gateway_node and gateway_node != device.node:
                    self.store.add_spool_drain(db, name, gateway_node, self.clock())
                self.store.set_status(db, name, TenantStatus.PENDING, f"placed again on {where}: its node was lost")
                audited = {"from": row.device, "device": device.uuid, **decision.numbers}
                self.store.audit(MANAGER_ACTOR, "place-again", name, "ok", audited, tx=db)
        self.reconciler.enqueue(name)
        return where

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

    def volume_status(self) -> dict[str, Any]:
        return self.reconciler.vault.status()

    def rotate_volume_keys(self, actor: str) -> tuple[str, list[str]]:
        """Every encrypted volume's data key rewrapped under the key file's first key."""
        with self._admission:  # no volume is made meanwhile under the old key
            try:
                done = self.reconciler.vault.rotate()
            except GtmError as exc:
                self.store.audit(actor, "rotate-volume-key", None, "refused", {"reason": exc.message})
                raise
            kek = self.reconciler.vault.keyring.current_id()
            self.store.audit(actor, "rotate-volume-key", None, "ok", {"kek_id": kek, "rewrapped": done})
        return kek, done

    def rotate_key(self, name: str, actor: str, grace_s: float, member: str | None = None) -> keys.IssuedKey:
        """A new key for a member, by default the tenant's first member (see ``MemberService``)."""
        return self.members.rotate_key(name, actor, grace_s, member)

    def revoke_key(self, name: str, key_id: str, actor: str) -> None:
        self.members.revoke_key(name, key_id, actor)

    def new_spec(self, name: str, **values: Any) -> TenantSpec:
        """A new tenant's spec from the declared fields given (None or missing: the default). The
        host fills in the model and its context length; the model, how many images a request may
        carry (a model that takes images: ``DEFAULT_MAX_IMAGES``; a text model: none)."""
        chosen = given(values)
        model = str(chosen.get("model") or self.settings.default_model)
        chosen["model"] = model
        chosen.setdefault("max_model_len", self.settings.default_max_model_len)
        chosen.setdefault("max_images", self.models.default_max_images(model))
        chosen["quantization"] = self.models.quantization(model, chosen.get("quantization"))
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
        spec = self.models.with_parsers(base.changed(chosen))
        check_bounds(spec)
        return spec
