"""The models in the models volume: what each needs at the least (admission's own model-fit
figure), importing and removing them, and the defaults a model gives a tenant (its image limit,
its quantization)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manager.control import model_files, parsers
from manager.control.gguf_convert import MARKER as CONVERT_MARKER
from manager.control.modelfit import ModelFootprint, max_positions, read_config, takes_images
from manager.control.plan import convert_plan
from manager.control.quant import checkpoint_method, resolve
from manager.control.sizing import Sizing
from manager.control.store import TenantStore
from manager.domain import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGES, TenantSpec
from manager.errors import Conflict, GtmError, InvalidInput
from manager.runtime.protocol import Runtime
from manager.settings import Settings


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
    tool_parser: str | None = None
    """What ``--tool-call-parser auto`` picks for it (None: nothing; name one)."""
    reasoning_parser: str | None = None
    """What ``--reasoning-parser auto`` picks for it."""
    origin: str | None = None
    """Where it came from: ``gguf FILE (QUANT)``, ``directory PATH``, ``generated ...`` (None:
    placed in the volume by hand)."""
    engine_overhead: int = 0
    """What the minimum counts for the engine beyond weights, images, sequences and KV cache."""
    overhead_learned: bool = False
    """Whether that is what its GPU engine's own start-up logged (else the configured figure)."""


CONVERT_TIMEOUT_S = 3600.0
"""A GGUF conversion's limit: a 7-8B model reads, dequantises and writes 16 GB."""


def describe_origin(facts: dict[str, Any] | None) -> str | None:
    """A model's ``gtm-origin.json`` in one line."""
    if not facts:
        return None
    detail = facts.get("quantization") or facts.get("detail")
    return f"{facts.get('kind', '?')} {facts.get('source', '?')}" + (f" ({detail})" if detail else "")


class ModelCatalog:
    """``lock``: the service's admission lock; a model is not removed while a tenant is admitted on it."""

    def __init__(
        self, settings: Settings, store: TenantStore, sizing: Sizing, runtime: Runtime, lock: threading.Lock
    ) -> None:
        self.settings = settings
        self.store = store
        self.sizing = sizing  # one rule, one cache: admission's and the engine's arguments
        self.runtime = runtime
        self._lock = lock
        self._importing = threading.Lock()  # one import at a time: a conversion holds a model in memory

    def minimum(
        self,
        model: str,
        max_model_len: int,
        quantized: bool,
        max_images: int = 0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_num_seqs: int | None = None,
    ) -> int:
        return self.sizing.minimum(model, max_model_len, quantized, max_images, max_image_pixels, max_num_seqs)

    def _minimum(self, model: str, footprint: ModelFootprint, max_model_len: int, images: int = 0) -> int:
        """Admission's model-fit figure: ``enginefit.minimum``, the rule the engine is started by."""
        return self.sizing.minimum_of(model, footprint, max_model_len, images)

    def concurrency(self, spec: TenantSpec) -> int | None:
        """The sequences the tenant's engine runs at once (None while its model cannot be read)."""
        try:
            return self.sizing.fit(spec).max_num_seqs
        except GtmError:
            return None

    def import_model(self, source: str, name: str | None, actor: str) -> CatalogEntry:
        """Checks a model directory and copies it into the models volume; audited."""
        try:
            with self._importing:
                imported = model_files.import_model(self.settings.models_dir, Path(source), name, self._convert)
        except GtmError as exc:
            self.store.audit(actor, "import-model", None, "refused", {"source": source, "error": exc.message})
            raise
        self.store.audit(actor, "import-model", None, "ok", {"source": source, "model": imported})
        return self._entry(imported, None)

    def _convert(self, model: str, staging: str) -> dict[str, Any]:
        """Runs the converter job (``plan.convert_plan``) and reads its answer."""
        code, out = self.runtime.run_to_completion(convert_plan(self.settings, model, staging), CONVERT_TIMEOUT_S)
        answers = [line.removeprefix(CONVERT_MARKER) for line in out.splitlines() if line.startswith(CONVERT_MARKER)]
        if answers:
            answer: dict[str, Any] = json.loads(answers[-1])
            return answer
        why = "it ran past its time limit" if code == -1 else f"it exited {code}: {out.strip()[-600:]}"
        return {"ok": False, "reason": f"the converter job ({self.settings.converter_image}) failed; {why}"}

    def remove(self, name: str, actor: str) -> None:
        """Deletes a model from the models volume; refused while a tenant uses it (named). Audited."""
        with self._lock:  # no tenant is admitted on the model while it goes
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

    def entries(self, max_model_len: int | None = None) -> list[CatalogEntry]:
        """Every model directory in the models volume; the minimums come from ``_minimum``, the
        function admission's model-fit check uses, so the two never disagree."""
        return [self._entry(name, max_model_len) for name in self.names()]

    def names(self) -> list[str]:
        """The model directories in the models volume, by name (nothing in them read)."""
        root = self.settings.models_dir
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _entry(self, name: str, max_model_len: int | None) -> CatalogEntry:
        try:
            footprint, config = self.sizing.footprint(name, quantized=False)  # as stored, when pre-quantized
        except GtmError as exc:
            origin = describe_origin(model_files.origin(self.settings.models_dir, name))
            return CatalogEntry(name, "", 0, "", 0, False, None, 0, None, exc.message, origin=origin)
        text = config.get("text_config", config)
        vision = takes_images(config)
        # the minimum of a tenant with the default image limits (add-tenant's defaults for this model)
        images = self.sizing.images(config, DEFAULT_MAX_IMAGES, DEFAULT_MAX_IMAGE_PIXELS)
        text_of = self.sizing.model_text(name)
        return CatalogEntry(
            name=name,
            architecture=str((config.get("architectures") or ["unknown"])[0]),
            parameters=footprint.parameters,
            dtype=str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or "unknown"),
            weight_bytes=footprint.weight_bytes,
            takes_images=vision,
            quantization=method[0] if (method := checkpoint_method(config)) else None,
            minimum_gpu_memory=self._minimum(name, footprint, self.settings.default_max_model_len, images),
            minimum_gpu_memory_at=self._minimum(name, footprint, max_model_len, images) if max_model_len else None,
            engine_overhead=self.sizing.overhead(name, bool(images)),
            overhead_learned=self.sizing.learned(name, bool(images)) is not None,
            tool_parser=parsers.pick_tool(text_of),
            reasoning_parser=parsers.pick_reasoning(text_of),
            origin=describe_origin(model_files.origin(self.settings.models_dir, name)),
        )

    def with_parsers(self, spec: TenantSpec) -> TenantSpec:
        """The spec with its parser choices checked against the engine's parsers and the model
        (InvalidInput, saying what to do, when the engine would refuse one), ``none`` as None."""
        model = self.sizing.model_text(spec.model)
        choices = {}
        for kind, field_name in ((parsers.TOOL, "tool_call_parser"), (parsers.REASONING, "reasoning_parser")):
            choice = getattr(spec, field_name)
            chosen = parsers.choose(kind, choice, spec.model, model)
            choices[field_name] = parsers.AUTO if chosen and choice.strip().lower() == parsers.AUTO else chosen
        return spec.with_changes(**choices)

    def check_model_len(self, model: str, max_model_len: int) -> None:
        """No context longer than the model's own (vLLM refuses such an engine at start)."""
        limit = max_positions(read_config(self.settings.models_dir, model))
        if limit is not None and max_model_len > limit:
            raise InvalidInput(
                f"--max-model-len {max_model_len} is beyond model {model}'s own limit of {limit} positions "
                f"(max_position_embeddings in its config.json); use --max-model-len {limit} or less"
            )

    def default_max_images(self, model: str) -> int:
        """A tenant of a model that takes images takes ``DEFAULT_MAX_IMAGES`` a request; of a text model, none."""
        return DEFAULT_MAX_IMAGES if takes_images(read_config(self.settings.models_dir, model)) else 0

    def quantization(self, model: str, requested: object) -> str | None:
        """``--quant`` checked against the engine and the model; int4 mapped by the rule in control.quant."""
        text = requested if isinstance(requested, str) else None
        return resolve(text, model, read_config(self.settings.models_dir, model), self.settings.platform)
