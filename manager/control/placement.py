"""Where a reservation goes, and the admission decision that says so, with every number: the
ledgers of the candidate devices built from the store and what the devices measure, handed to
``admission.place``; with ``GTM_OVERCOMMIT``, the tenants awake now decide first."""

from __future__ import annotations

from dataclasses import replace

from manager.control.admission import AdmissionInput, Decision, HostMemoryInput, decide_host_memory, place
from manager.control.capacity import Meter, device_of, on_device
from manager.control.catalog import ModelCatalog
from manager.control.overcommit import counted_beside, resident
from manager.control.records import TenantRow
from manager.control.store import TenantStore
from manager.domain import TenantSpec, TenantStatus
from manager.errors import GtmError
from manager.gpu import DeviceMemory, Inventory, device_label, select_devices
from manager.gpu.cpu import read_meminfo
from manager.settings import Settings


class Placer:
    def __init__(
        self, settings: Settings, store: TenantStore, inventory: Inventory, meter: Meter, models: ModelCatalog
    ) -> None:
        self.settings = settings
        self.store = store
        self.inventory = inventory
        self.meter = meter
        self.models = models

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
                max_images=self.models.default_max_images(model),
            )
        spec = spec.with_changes(quantization=quantization)
        return self.place(spec, tenant=tenant, gpu=gpu)[1]

    def place(
        self, spec: TenantSpec, tenant: str | None = None, gpu: str | None = None
    ) -> tuple[DeviceMemory | None, Decision]:
        """Where a new (or resized, ``tenant``) reservation of ``spec`` goes and the decision that
        says so; creates nothing. The candidates: the device ``gpu`` names (index or UUID); else a
        resized tenant's own device (tenants move only when the admin says ``--gpu``); else every
        device, best fit first (``admission.place``). With overcommit, the tenants awake now decide
        first; a reservation that fits only while others sleep comes back ``by_overcommit``. On a
        GPU host the host's RAM decides too (``admission.decide_host_memory``)."""
        device, decision = self._on_device(spec, tenant, gpu)
        if self.settings.platform.reservation_is_host_memory or device is None:
            return device, decision
        fits, message, numbers = decide_host_memory(self._host_memory(spec, tenant))
        merged = replace(decision, numbers={**decision.numbers, **numbers})
        if fits:
            return device, replace(merged, messages=(*decision.messages, message))
        return None, replace(merged, admitted=False, failed_checks=("host_memory",), messages=(message,))

    def _host_memory(self, spec: TenantSpec, tenant: str | None) -> HostMemoryInput:
        """The host RAM beside the devices: an engine process for every tenant, and the weights
        of each tenant that may sleep (``--idle-sleep``, or any but always-on ones with overcommit)."""
        others = [r.spec for r in self.store.tenants() if r.spec.name != tenant]
        sleepers = [s for s in others if self._may_sleep(s)]
        return HostMemoryInput(
            total=read_meminfo(self.settings.meminfo)["MemTotal"],
            headroom=self.settings.host_headroom,
            per_engine=self.settings.engine_host_memory,
            engines=len(others),
            pinned_by_others=sum(self._weights(s) for s in sleepers),
            sleepers=len(sleepers),
            requested_pinned=self._weights(spec) if self._may_sleep(spec) else 0,
        )

    def _may_sleep(self, spec: TenantSpec) -> bool:
        return bool(spec.idle_sleep_s) or (self.settings.overcommit and not spec.always_on)

    def _weights(self, spec: TenantSpec) -> int:
        try:
            return self.models.sizing.footprint(spec.model, bool(spec.quantization))[0].weight_bytes
        except GtmError:
            return 0  # a model that cannot be read: its tenant fails with that reason, pinning nothing

    def _on_device(self, spec: TenantSpec, tenant: str | None, gpu: str | None) -> tuple[DeviceMemory | None, Decision]:
        requested = spec.gpu_memory
        self.models.check_model_len(spec.model, spec.max_model_len)  # what-if says so too, before any number
        devices = self.inventory.devices()
        own = self.store.find_tenant(tenant) if tenant else None
        if gpu is not None:
            candidates = select_devices(devices, gpu)
        elif own is not None:
            current = device_of(own, devices)
            candidates = [current] if current else devices
        else:
            candidates = devices
        rows = [r for r in self.store.tenants() if r.spec.name != tenant]
        measured = self.meter.measured_use()
        least = self.models.minimum(
            spec.model,
            spec.max_model_len,
            bool(spec.quantization),
            spec.max_images,
            spec.max_image_pixels,
            spec.max_num_seqs,
        )
        overhead = self.meter.process_overhead
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
                reclaimable=(measured.get(own.spec.name) or 0) if own and on_device(own, devices, device) else 0,
                process_overhead=overhead,
                model_minimum=least,
                system_reserved=device.reserved,
                others=engines,
                device=device_label(device) if len(devices) > 1 or gpu is not None or device.node else "",
                measure=measure,
            )

        here = {d.uuid: [r for r in rows if on_device(r, devices, d)] for d in candidates}
        if not self.settings.overcommit:
            index, decision = place([ledger(d, here[d.uuid]) for d in candidates])
            return (candidates[index] if index is not None else None), decision
        # overcommit: the tenants awake now (and what sleepers keep), else (it starts asleep) every
        # one that may sleep asleep
        kept = self.meter.kept_asleep
        awake = []
        for d in candidates:
            up = [r for r in here[d.uuid] if r.status != TenantStatus.ASLEEP]
            sleeping = sum(resident(r, kept=kept).kept for r in here[d.uuid] if r.status == TenantStatus.ASLEEP)
            awake.append(ledger(d, up, (sum(r.spec.gpu_memory for r in up) + sleeping, len(up))))
        index, decision = place(awake)
        if index is not None:
            return candidates[index], replace(decision, messages=("fits awake now", *decision.messages))
        beside = [
            ledger(d, [], counted_beside([resident(r, kept=kept) for r in here[d.uuid]], always_on, overhead), False)
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
