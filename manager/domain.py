"""Domain objects shared by the control plane: a tenant's spec and its status.

Tenant status, one of::

    pending --(engine created)--> starting --(healthy)--> running
       ^                             |                      |
       |                             +--(exited/unhealthy)--+--> failed
       +---(spec changed: recreate)--------------------------+       |
                                                                      |
    failed --(backoff elapsed, engine started again)--> starting <----+

    running --(idle for idle_sleep_s, or put to sleep for another's wake)--> asleep
    asleep --(a request waits, or it may not sleep any more)--> waking --(healthy)--> running
    waking --(its engine failed)--> failed
    asleep | waking --(spec changed: recreate)--> pending
    any but removing --(spec changed, fits only by overcommit)--> asleep

    any --(remove-tenant)--> removing --(resources gone)--> (row deleted)

``ALLOWED_TRANSITIONS`` is this diagram; the store checks every status write against it
(``TenantStore.set_status``), and ``tests/unit/test_store.py`` walks it.

``reason`` explains ``failed`` in the engine's own words where it gave any
(for example vLLM's "Free memory on device ... is less than desired").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from manager.errors import InvalidInput
from manager.fields import Kind, Section, TenantField, declare, declared
from manager.sizes import MAX_SIZE


class TenantStatus(StrEnum):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    REMOVING = "removing"
    ASLEEP = "asleep"
    """Idle for its ``idle_sleep_s``: its engine is stopped, its gateway holds the next request."""
    WAKING = "waking"
    """A request is waiting: its engine is starting again, and its gateway still holds requests."""


_S = TenantStatus
ALLOWED_TRANSITIONS: dict[TenantStatus, frozenset[TenantStatus]] = {
    _S.PENDING: frozenset({_S.STARTING, _S.FAILED, _S.REMOVING, _S.ASLEEP}),
    _S.STARTING: frozenset({_S.RUNNING, _S.FAILED, _S.PENDING, _S.REMOVING, _S.ASLEEP}),
    _S.RUNNING: frozenset({_S.FAILED, _S.PENDING, _S.STARTING, _S.REMOVING, _S.ASLEEP}),
    _S.FAILED: frozenset({_S.STARTING, _S.PENDING, _S.REMOVING, _S.ASLEEP}),
    _S.REMOVING: frozenset(),
    _S.ASLEEP: frozenset({_S.WAKING, _S.PENDING, _S.REMOVING}),
    _S.WAKING: frozenset({_S.RUNNING, _S.FAILED, _S.PENDING, _S.REMOVING, _S.ASLEEP}),
}
"""Where each status may go (staying is always allowed): the diagram above, arrow by arrow."""


def can_transition(current: TenantStatus, new: TenantStatus) -> bool:
    return current == new or new in ALLOWED_TRANSITIONS[current]


MIN_PORT, MAX_PORT = 1024, 65535
MIN_MODEL_LEN, MAX_MODEL_LEN = 16, 10**7
MIN_BODY, MAX_BODY = 64 * 1024, 64 * 1024**2
"""Bounds of a tenant's request body limit; the gateway's memory limit is sized for the largest."""
DEFAULT_BODY = 32 * 1024**2
DEFAULT_SHM = 1024**3
PLAIN, ENCRYPTED = "plain", "encrypted"
"""A tenant's volume (``TenantSpec.volume``): a Docker volume, or an encrypted image
(``manager.control.vault``)."""
MIN_VOLUME_SIZE = 64 * 1024**2
"""ext4's own structures take a few MiB of a volume."""


def volume_kind(text: str) -> str:
    """``plain`` or ``encrypted``, as an admin writes it: ``encrypted:/data`` (or ``encrypted``),
    ``plain``. The engine's volume is /data either way."""
    kind, colon, path = str(text).strip().partition(":")
    if kind in (PLAIN, ENCRYPTED) and (path == "/data" or not colon):
        return kind
    raise InvalidInput(
        f"--volume is encrypted:/data (an encrypted volume) or plain (a Docker volume), got {text!r}; "
        "the engine's volume is /data either way"
    )


MAX_GRACE_S = 366 * 86400.0
DEFAULT_MAX_IMAGES, MAX_IMAGES = 4, 64
"""Images in one chat request for a model that takes images (a text model's tenant takes none):
the gateway refuses more, and the engine is started with the same per-prompt limit."""
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 3072
"""Width x height of the largest image the gateway passes: 12.6 megapixels, so a 4000 x 3000
phone photo passes and a 12000 x 12000 image does not. What an image costs the engine to decode
is measured (README, "Vision tenants"; control.modelfit.IMAGE_DECODE_BYTES_PER_PIXEL) and
reserved for a vision tenant in cpu mode, so its engine survives every image it is sent."""
MIN_IMAGE_PIXELS, MAX_IMAGE_PIXELS = 64 * 64, 178_956_970
"""The top is Pillow's own refusal (twice its decompression-bomb warning), which engines answer with a 500."""
MAX_NUM_SEQS = 4096
MAX_CPU_WEIGHT = 262_144
"""Docker's largest CPU shares (a cgroup v2 cpu.weight of 10000)."""
MIN_IDLE_SLEEP_S, MAX_IDLE_SLEEP_S = 5.0, 366 * 86400.0
"""Bounds of ``--idle-sleep``: a tenant idle that long sleeps (unset or 0: it never does)."""


def _quota(meaning: str, label: str, unit: str, top: int) -> Any:
    """A quota: a whole number from 1 to ``top`` (far beyond any real host; well inside SQLite's
    64-bit integers), or None for no limit; pushed to the gateway, which enforces it."""
    return field(
        default=None,
        metadata=declare(
            Kind.INT, meaning, label, lo=1, hi=top, unset="no limit", gateway=True, section=Section.QUOTA,
            quota_unit=unit,
        ),
    )  # fmt: skip


@dataclass(frozen=True)
class Quotas:
    """A tenant's or a member's limits; None is no limit. A member's nest inside its tenant's."""

    rpm_limit: int | None = _quota("requests per minute", "Requests per minute", "/min", 10**9)
    tokens_per_day: int | None = _quota("prompt + completion tokens per UTC day", "Tokens per day", "/day", 10**15)
    requests_per_month: int | None = _quota("requests per calendar month", "Requests per month", "/month", 10**12)
    max_in_flight: int | None = _quota("requests in flight at once", "Requests in flight at once", " in flight", 10**6)


QUOTA_DECLARED: tuple[TenantField, ...] = tuple(TenantField(f.name, f.d, None, quota=True) for f in declared(Quotas))
QUOTA_FIELDS: tuple[str, ...] = tuple(f.name for f in QUOTA_DECLARED)
"""The quota names, as the API, the CLI, the console, the store and the gateway spell them."""


@dataclass(frozen=True)
class QuotaKind:
    meaning: str
    """What it counts, for help texts and the API's schema."""
    unit: str
    """How a table shows a value of it: ``30/min``."""
    max: int
    """The largest value it takes."""


QUOTA_KINDS: dict[str, QuotaKind] = {
    f.name: QuotaKind(f.d.help, f.d.quota_unit, int(f.d.hi or 0)) for f in QUOTA_DECLARED
}
"""Each quota's meaning, unit and top, read from ``Quotas``'s declarations."""
QUOTA_MAX: dict[str, int] = {name: kind.max for name, kind in QUOTA_KINDS.items()}


def check_quotas(quotas: Quotas) -> None:
    """Every quota unset or within its documented range (a tenant's and a member's alike)."""
    for f in QUOTA_DECLARED:
        f.check(getattr(quotas, f.name))


@dataclass(frozen=True)
class TenantSpec:
    """What the admin asked for: one declaration per field (``manager.fields``), from which the
    API, the CLI, the console and the store derive theirs. The engine's identity is
    ``engine_hash()``: a change to a field declared ``engine`` recreates the engine; the others
    apply to the gateway (or the sleeper) at once."""

    name: str
    port: int = field(
        metadata=declare(
            Kind.INT, "the tenant's API port on the host", "Port", lo=MIN_PORT, hi=MAX_PORT, required=True,
            section=Section.MAIN, placeholder="30001",
        )
    )  # fmt: skip
    gpu_memory: int = field(
        metadata=declare(
            Kind.SIZE, "reserved memory, e.g. 10G, 10GiB, 512M (binary units)", "GPU memory", lo=1, hi=MAX_SIZE,
            engine=True, required=True, section=Section.MAIN, placeholder="10G",
        )
    )  # fmt: skip
    model: str = field(
        metadata=declare(
            Kind.TEXT, "model directory under the models volume (default: the demo model)", "Model", engine=True,
            host_default=True, section=Section.MAIN, placeholder="demo",
        )
    )  # fmt: skip
    max_model_len: int = field(
        metadata=declare(
            Kind.INT, "longest context in tokens", "Max model length", lo=MIN_MODEL_LEN, hi=MAX_MODEL_LEN,
            unit="tokens", engine=True, gateway=True, host_default=True, section=Section.MAIN, placeholder="512",
            listed="max-model-len",
        )
    )  # fmt: skip
    quantization: str | None = field(
        default=None,
        metadata=declare(
            Kind.TEXT, "int4 (served from a 4-bit AWQ/GPTQ checkpoint) or an engine method such as awq, gptq, fp8; "
            "checked against the engine and the model before anything is created", "Quantization", unset="none",
            engine=True, flag="--quant", placeholder="none; int4, awq, gptq, fp8",
            title="checked against the engine and the model, as --quant", listed="quant",
        ),
    )  # fmt: skip
    shm_size: int = field(
        default=DEFAULT_SHM,
        metadata=declare(
            Kind.SIZE, "shared memory of the engine, e.g. 5G (default 1G)", "Shared memory", lo=1, hi=MAX_SIZE,
            engine=True, placeholder="1G",
        ),
    )  # fmt: skip
    quotas: Quotas = field(default_factory=Quotas)
    max_body: int = field(
        default=DEFAULT_BODY,
        metadata=declare(
            Kind.SIZE, "largest request body on the tenant's port, 64K to 64M (default 32M: a 20 MB image as a "
            "base64 data: URL)", "Largest request body", lo=MIN_BODY, hi=MAX_BODY, gateway=True, placeholder="32M",
        ),
    )  # fmt: skip
    """Largest request body the tenant's port takes (a 20 MB image as a base64 data: URL fits)."""
    max_images: int = field(
        default=0,
        metadata=declare(
            Kind.INT, f"images in one chat request (default {DEFAULT_MAX_IMAGES}; 0: none); the gateway refuses more "
            "and the engine gets the same per-prompt limit", "Images per request", lo=0, hi=MAX_IMAGES, engine=True,
            gateway=True, host_default=True, placeholder="4 for a vision model, 0 for a text model", listed="images",
        ),
    )  # fmt: skip
    """Images a chat request may carry: checked by the gateway and the engine's per-prompt limit.
    New tenants of a model that takes images get ``DEFAULT_MAX_IMAGES`` (the service decides)."""
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata=declare(
            Kind.INT, f"width x height of the largest image, read from its header by the gateway (default "
            f"{DEFAULT_MAX_IMAGE_PIXELS}: 4096 x 3072; a 4000 x 3000 photo passes)",
            "Largest image (width \N{MULTIPLICATION SIGN} height, pixels)", lo=MIN_IMAGE_PIXELS,
            hi=MAX_IMAGE_PIXELS, engine=True, gateway=True, placeholder=str(DEFAULT_MAX_IMAGE_PIXELS),
        ),
    )  # fmt: skip
    """Width x height of the largest image, read by the gateway from the image's header. An engine
    field too: in cpu mode the engine's memory holds the decode of its images."""
    enable_prefix_caching: bool = field(
        default=True,
        metadata=declare(
            Kind.BOOL, "the engine's prefix cache, with a cache salt per member (default: on)", "Prefix caching",
            engine=True, choices=("on (a cache salt per member)", "off"), listed="prefix-caching",
        ),
    )  # fmt: skip
    """vLLM's automatic prefix caching; members' caches are kept apart by a per-member cache salt."""
    trust_remote_code: bool = field(
        default=False,
        metadata=declare(
            Kind.BOOL, "let the engine run Python code that ships with the model (default: off; only for models you "
            "trust)", "Remote code", engine=True,
            choices=("trusted (the engine runs the model's Python code)", "not trusted"), listed="trust-remote-code",
        ),
    )  # fmt: skip
    """Lets the engine run Python code shipped with the model: only when the admin asks."""
    max_num_seqs: int | None = field(
        default=None,
        metadata=declare(
            Kind.INT, "sequences the engine batches at once (0: what the reservation holds, at most vLLM's default "
            "128)", "Max sequences batched", lo=1, hi=MAX_NUM_SEQS, unset="the engine's default", zero_unsets=True,
            engine=True, placeholder="what the reservation holds", listed="max-num-seqs",
        ),
    )  # fmt: skip
    """Sequences the engine batches at once; None is vLLM's default."""
    idle_sleep_s: float | None = field(
        default=None,
        metadata=declare(
            Kind.DURATION, "after this long without a request the tenant sleeps (its engine stops; the next request "
            "starts it again and waits meanwhile), e.g. 15s, 10m, 2h; 0: never (the default)", "Sleep after idle",
            lo=MIN_IDLE_SLEEP_S, hi=MAX_IDLE_SLEEP_S, unset="never", zero_unsets=True, flag="--idle-sleep",
            metavar="DURATION", words="idle sleep", placeholder="never",
            title="after this long without a request its engine stops; the next request starts it again and waits "
            "meanwhile (15s, 10m, 2h or seconds)",
        ),
    )  # fmt: skip
    """After this long without a request the tenant sleeps: its engine stops, and the next request
    starts it again (held by the gateway meanwhile). None: it never sleeps."""
    always_on: bool = field(
        default=False,
        metadata=declare(
            Kind.BOOL, "never put it to sleep: neither when idle nor, on a host with GTM_OVERCOMMIT, to make room "
            "for another tenant's wake (default: off)", "Always on",
            choices=("yes: never put to sleep", "no: it may sleep"),
        ),
    )  # fmt: skip
    """Never put to sleep, neither when idle nor (on a host with ``GTM_OVERCOMMIT``) to make room
    for another tenant's wake: its reservation is always counted."""
    tool_call_parser: str | None = field(
        default=None,
        metadata=declare(
            Kind.TEXT, "tool calling: the engine's tool-call parser, by name, or auto (chosen from the model's "
            "chat template: hermes for Qwen2.5/Qwen3, llama3_json for Llama 3.x, mistral, ...), or none (the "
            "default: requests with tools are refused)", "Tool-call parser", unset="none", engine=True,
            placeholder="none; auto or a parser name", title="auto picks from the model; list-models shows what",
            listed="tools", hashed_unset=False,
        ),
    )  # fmt: skip
    """vLLM's ``--tool-call-parser`` (with ``--enable-auto-tool-choice``): ``auto``, a name, or None."""
    reasoning_parser: str | None = field(
        default=None,
        metadata=declare(
            Kind.TEXT, "thinking apart from the answer (reasoning_content): the engine's reasoning parser, by "
            "name, or auto (qwen3 for Qwen3, deepseek_r1 for its distills, ...), or none (the default)",
            "Reasoning parser", unset="none", engine=True, placeholder="none; auto or a parser name",
            title="auto picks from the model; list-models shows what", listed="reasoning", hashed_unset=False,
        ),
    )  # fmt: skip
    """vLLM's ``--reasoning-parser``: ``auto``, a name, or None."""
    cpu_weight: int | None = field(
        default=None,
        metadata=declare(
            Kind.INT, "the engine's share of the host's CPUs when engines contend, relative to other engines "
            f"(2-{MAX_CPU_WEIGHT}; default: its reservation in MiB, so a 10G tenant weighs 10240 and a 1536M one "
            "1536; other containers weigh 1024)", "CPU weight", lo=2, hi=MAX_CPU_WEIGHT, unset="its reservation",
            zero_unsets=True, engine=True, placeholder="its reservation in MiB", listed="cpu-weight",
            hashed_unset=False,
        ),
    )  # fmt: skip
    """The engine container's CPU shares (``plan.cpu_shares``); None: its reservation in MiB."""
    fair_queue: bool = field(
        default=True,
        metadata=declare(
            Kind.BOOL, "the gateway lets at most the engine's concurrency in and queues the rest per member, "
            "serving next the member that got the least service lately, so one member's flood does not make "
            "the others wait behind it (default: on; off: first come, first served in the engine)",
            "Fair queuing", gateway=True, choices=("on (per member)", "off (first come, first served)"),
            listed="fair-queue",
        ),
    )  # fmt: skip
    """Fair queuing among the tenant's members at its gateway (``manager.gateway.fairq``)."""
    volume: str = field(
        default=PLAIN,
        metadata=declare(
            Kind.TEXT, "the engine's /data: plain (a Docker volume, the default) or encrypted:/data (an ext4 image "
            "encrypted with a key of its own, unreadable to other tenants and to whoever takes the disk, erased "
            "with the tenant); update-tenant moves an existing tenant's data into it", "Volume", engine=True,
            hashed_unset=False, normalize=volume_kind, placeholder="plain; encrypted:/data", listed="volume",
            section=Section.MAIN, title="encrypted:/data needs a host that can (capacity says)",
        ),
    )  # fmt: skip
    """``PLAIN`` or ``ENCRYPTED`` (``manager.control.vault``)."""
    volume_size: int | None = field(
        default=None,
        metadata=declare(
            Kind.SIZE, "size of an encrypted volume, reserved on the host's disk when it is made and fixed from "
            "then on, e.g. 20G (default: the host's GTM_VOLUME_SIZE)", "Encrypted volume size", lo=MIN_VOLUME_SIZE,
            hi=MAX_SIZE, unset="the host's default", zero_unsets=True, placeholder="the host's default",
            words="volume size",
        ),
    )  # fmt: skip
    """An encrypted volume's size; None: the host's ``GTM_VOLUME_SIZE``."""

    @property
    def encrypted(self) -> bool:
        return self.volume == ENCRYPTED

    def flat(self) -> dict[str, Any]:
        """Every declared field by name, the quotas among them (as the store's columns and the
        API's public model hold them)."""
        return {f.name: getattr(self.quotas if f.quota else self, f.name) for f in TENANT_FIELDS}

    @classmethod
    def from_flat(cls, name: str, values: dict[str, Any]) -> TenantSpec:
        """A spec from every declared field by name (a store row): booleans made booleans again."""

        def value(f: TenantField) -> Any:
            v = values[f.name]
            return bool(v) if f.d.kind is Kind.BOOL else v

        quotas = Quotas(**{f.name: value(f) for f in QUOTA_DECLARED})
        return cls(name=name, quotas=quotas, **{f.name: value(f) for f in SPEC_DECLARED})

    def engine_hash(self) -> str:
        """The engine's identity: the name and every field declared ``engine`` (one declared
        ``hashed_unset=False`` only once it is set)."""
        engine_fields = {"name": self.name}
        for f in ENGINE_FIELDS:
            value = getattr(self, f.name)
            if f.d.hashed_unset or value != f.default:
                engine_fields[f.name] = value
        raw = json.dumps(engine_fields, sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def with_changes(self, **changes: object) -> TenantSpec:
        return replace(self, **changes)  # type: ignore[arg-type]

    def changed(self, flat: dict[str, Any]) -> TenantSpec:
        """This spec with declared fields (quotas among them) set from ``flat``."""
        quota = {k: v for k, v in flat.items() if k in QUOTA_FIELDS}
        rest = {k: v for k, v in flat.items() if k not in QUOTA_FIELDS}
        if quota:
            rest["quotas"] = replace(self.quotas, **quota)
        return self.with_changes(**rest)


SPEC_DECLARED: tuple[TenantField, ...] = tuple(declared(TenantSpec))
TENANT_FIELDS: tuple[TenantField, ...] = (*SPEC_DECLARED[:5], *QUOTA_DECLARED, *SPEC_DECLARED[5:])
"""Every field of a tenant an admin sets, quotas included, in the order forms and help show them."""
FIELDS_BY_NAME: dict[str, TenantField] = {f.name: f for f in TENANT_FIELDS}
ENGINE_FIELDS: tuple[TenantField, ...] = tuple(f for f in SPEC_DECLARED if f.d.engine)
"""A change of one of these recreates the engine."""


def check_bounds(spec: TenantSpec) -> None:
    """Every field of a spec within its declared range; the API's schema states the same bounds."""
    for f in TENANT_FIELDS:
        f.check(getattr(spec.quotas if f.quota else spec, f.name))
    if spec.always_on and spec.idle_sleep_s is not None:
        raise InvalidInput(
            "a tenant that is always on never sleeps: drop --idle-sleep (or set it to 0), or drop --always-on"
        )


def unknown_fields(names: Any) -> None:
    """InvalidInput naming the fields that no declaration knows."""
    unknown = set(names) - set(FIELDS_BY_NAME)
    if unknown:
        raise InvalidInput(f"unknown tenant options {sorted(unknown)}")
