"""Domain objects shared by the control plane: a tenant's spec and its status.

Tenant status, one of::

    pending --(engine created)--> starting --(healthy)--> running
       ^                             |                      |
       |                             +--(exited/unhealthy)--+--> failed
       +---(spec changed: recreate)--------------------------+       |
                                                                      |
    failed --(backoff elapsed, engine started again)--> starting <----+
    any --(remove-tenant)--> removing --(resources gone)--> (row deleted)

``reason`` explains ``failed`` in the engine's own words where it gave any
(for example vLLM's "Free memory on device ... is less than desired").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from manager.errors import InvalidInput
from manager.sizes import MAX_SIZE, format_size


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


ALLOWED_TRANSITIONS: dict[TenantStatus, frozenset[TenantStatus]] = {
    TenantStatus.PENDING: frozenset({TenantStatus.STARTING, TenantStatus.FAILED, TenantStatus.REMOVING}),
    TenantStatus.STARTING: frozenset(
        {TenantStatus.RUNNING, TenantStatus.FAILED, TenantStatus.PENDING, TenantStatus.REMOVING}
    ),
    TenantStatus.RUNNING: frozenset(
        {TenantStatus.FAILED, TenantStatus.PENDING, TenantStatus.STARTING, TenantStatus.REMOVING, TenantStatus.ASLEEP}
    ),
    TenantStatus.FAILED: frozenset({TenantStatus.STARTING, TenantStatus.PENDING, TenantStatus.REMOVING}),
    TenantStatus.REMOVING: frozenset(),
    # a change of its engine (update-tenant) starts it again, as for a running tenant
    TenantStatus.ASLEEP: frozenset({TenantStatus.WAKING, TenantStatus.PENDING, TenantStatus.REMOVING}),
    TenantStatus.WAKING: frozenset(
        {TenantStatus.RUNNING, TenantStatus.FAILED, TenantStatus.PENDING, TenantStatus.REMOVING}
    ),
}


def can_transition(current: TenantStatus, new: TenantStatus) -> bool:
    return current == new or new in ALLOWED_TRANSITIONS[current]


@dataclass(frozen=True)
class Quotas:
    rpm_limit: int | None = None
    tokens_per_day: int | None = None
    requests_per_month: int | None = None
    max_in_flight: int | None = None


QUOTA_FIELDS: tuple[str, ...] = tuple(Quotas.__dataclass_fields__)
"""The quota names, as the API, the CLI, the console and the gateway spell them."""


@dataclass(frozen=True)
class QuotaKind:
    meaning: str
    """What it counts, for help texts and the API's schema."""
    unit: str
    """How a table shows a value of it: ``30/min``."""
    max: int
    """The largest value it takes (far beyond any real host; well inside SQLite's 64-bit integers)."""


QUOTA_KINDS: dict[str, QuotaKind] = {
    "rpm_limit": QuotaKind("requests per minute", "/min", 10**9),
    "tokens_per_day": QuotaKind("prompt + completion tokens per UTC day", "/day", 10**15),
    "requests_per_month": QuotaKind("requests per calendar month", "/month", 10**12),
    "max_in_flight": QuotaKind("requests in flight at once", " in flight", 10**6),
}
"""The one declaration of what each quota means (the fields are ``Quotas``'s): the CLI's options
and tables, the API schema's descriptions and bounds, the store's columns and the checks derive
from these two; ``tests/unit/test_domain.py`` checks that the gateway's contract, the API's
schemas and the database agree."""
QUOTA_MAX: dict[str, int] = {name: kind.max for name, kind in QUOTA_KINDS.items()}
MIN_PORT, MAX_PORT = 1024, 65535
MIN_MODEL_LEN, MAX_MODEL_LEN = 16, 10**7
MIN_BODY, MAX_BODY = 64 * 1024, 64 * 1024**2
"""Bounds of a tenant's request body limit; the gateway's memory limit is sized for the largest."""
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
MIN_IDLE_SLEEP_S, MAX_IDLE_SLEEP_S = 5.0, 366 * 86400.0
"""Bounds of ``--idle-sleep``: a tenant idle that long sleeps (unset or 0: it never does)."""


def check_quotas(quotas: Quotas) -> None:
    """Every quota unset or within its documented range (a tenant's and a member's alike)."""
    for name in QUOTA_FIELDS:
        value = getattr(quotas, name)
        if value is not None and not 1 <= value <= QUOTA_MAX[name]:
            raise InvalidInput(
                f"{name.replace('_', ' ')} must be between 1 and {QUOTA_MAX[name]} (or unset for no limit), got {value}"
            )


def check_bounds(spec: TenantSpec) -> None:
    """Every number of a spec within its documented range; the API's schema states the same bounds."""
    check_quotas(spec.quotas)
    if not MIN_PORT <= spec.port <= MAX_PORT:
        raise InvalidInput(f"port {spec.port} is out of range: use {MIN_PORT}-{MAX_PORT}")
    if not MIN_MODEL_LEN <= spec.max_model_len <= MAX_MODEL_LEN:
        raise InvalidInput(
            f"max model len must be between {MIN_MODEL_LEN} and {MAX_MODEL_LEN} tokens, got {spec.max_model_len}"
        )
    if not MIN_BODY <= spec.max_body <= MAX_BODY:
        raise InvalidInput(
            f"max body must be between {format_size(MIN_BODY)} and {format_size(MAX_BODY)}, "
            f"got {format_size(spec.max_body)}"
        )
    if not 0 <= spec.max_images <= MAX_IMAGES:
        raise InvalidInput(f"max images must be between 0 and {MAX_IMAGES}, got {spec.max_images}")
    if not MIN_IMAGE_PIXELS <= spec.max_image_pixels <= MAX_IMAGE_PIXELS:
        raise InvalidInput(
            f"max image pixels must be between {MIN_IMAGE_PIXELS} and {MAX_IMAGE_PIXELS} (width x height), "
            f"got {spec.max_image_pixels}"
        )
    if spec.max_num_seqs is not None and not 1 <= spec.max_num_seqs <= MAX_NUM_SEQS:
        raise InvalidInput(
            f"max num seqs must be between 1 and {MAX_NUM_SEQS} (or unset for the engine's default), "
            f"got {spec.max_num_seqs}"
        )
    if spec.idle_sleep_s is not None and not MIN_IDLE_SLEEP_S <= spec.idle_sleep_s <= MAX_IDLE_SLEEP_S:
        raise InvalidInput(
            f"idle sleep must be between {MIN_IDLE_SLEEP_S:.0f} s and {MAX_IDLE_SLEEP_S / 86400:.0f} days "
            f"(or 0 for never), got {spec.idle_sleep_s:g} s"
        )
    if spec.always_on and spec.idle_sleep_s is not None:
        raise InvalidInput(
            "a tenant that is always on never sleeps: drop --idle-sleep (or set it to 0), or drop --always-on"
        )
    for label, size in (("gpu memory", spec.gpu_memory), ("shm size", spec.shm_size)):
        if not 1 <= size <= MAX_SIZE:
            raise InvalidInput(f"{label} must be between 1 byte and {format_size(MAX_SIZE)}, got {size}")


@dataclass(frozen=True)
class TenantSpec:
    """What the admin asked for. The engine's identity is ``engine_hash()``: a change
    to any engine-relevant field recreates the engine; quota changes do not."""

    name: str
    port: int
    gpu_memory: int
    model: str
    max_model_len: int
    quantization: str | None = None
    shm_size: int = 1024**3
    quotas: Quotas = field(default_factory=Quotas)
    max_body: int = 32 * 1024**2
    """Largest request body the tenant's port takes (a 20 MB image as a base64 data: URL fits)."""
    max_images: int = 0
    """Images a chat request may carry: checked by the gateway and the engine's per-prompt limit.
    New tenants of a model that takes images get ``DEFAULT_MAX_IMAGES`` (the service decides)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Width x height of the largest image, read by the gateway from the image's header."""
    enable_prefix_caching: bool = True
    """vLLM's automatic prefix caching; members' caches are kept apart by a per-member cache salt."""
    trust_remote_code: bool = False
    """Lets the engine run Python code shipped with the model: only when the admin asks."""
    max_num_seqs: int | None = None
    """Sequences the engine batches at once; None is vLLM's default."""
    idle_sleep_s: float | None = None
    """After this long without a request the tenant sleeps: its engine stops, and the next request
    starts it again (held by the gateway meanwhile). None: it never sleeps."""
    always_on: bool = False
    """Never put to sleep, neither when idle nor (on a host with ``GTM_OVERCOMMIT``) to make room
    for another tenant's wake: its reservation is always counted."""

    def options(self) -> dict[str, object]:
        """The image limits and engine options (``ENGINE_OPTIONS``) with their values."""
        return {name: getattr(self, name) for name in ENGINE_OPTIONS}

    def engine_hash(self) -> str:
        engine_fields = asdict(self)
        # max_image_pixels stays: in cpu mode the engine's memory holds the decode of its images
        for gateway_only in ("quotas", "port", "max_body", "idle_sleep_s", "always_on"):
            engine_fields.pop(gateway_only)
        raw = json.dumps(engine_fields, sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def with_changes(self, **changes: object) -> TenantSpec:
        return replace(self, **changes)  # type: ignore[arg-type]


ENGINE_OPTIONS: tuple[str, ...] = (
    "max_images",
    "max_image_pixels",
    "enable_prefix_caching",
    "trust_remote_code",
    "max_num_seqs",
)
"""The spec's image limits and engine options, as the API, the CLI and the console spell them."""
