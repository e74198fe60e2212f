"""A tenant's engine sized from its model's own files: ``enginefit``'s rule applied to what
``modelfit`` reads. Admission (the service) and the engine's arguments (the reconciler) both ask
here, so what admission reserved is what the engine is started with.

Footprints are kept while the model's files are unchanged (names, sizes, modification times), so
the reconciler's passes read nothing of an unchanged model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from manager.control.enginefit import EngineFit, Terms, fit, minimum
from manager.control.modelfit import ModelFootprint, image_allowance, read_config, read_footprint, resizes_by_pixels
from manager.control.parsers import ModelText, model_text
from manager.control.quant import checkpoint_method
from manager.domain import TenantSpec
from manager.errors import InvalidInput
from manager.settings import Settings

Stamp = tuple[tuple[str, int, int], ...]


Learned = Callable[[str, bool], int | None]
"""(model, takes images) -> what its GPU engine needed beyond weights, images, sequences and KV
cache at its last start (``TenantStore.engine_overhead``)."""


class Sizing:
    """``learned``: each model's engine overhead as its engines' start-up logged it; it replaces
    the configured figure unless the admin set ``GTM_ENGINE_OVERHEAD``."""

    def __init__(self, settings: Settings, learned: Learned = lambda model, images: None) -> None:
        self.settings = settings
        self.learned = learned
        self.platform = settings.platform
        self._lock = threading.Lock()
        self._footprints: dict[tuple[str, bool], tuple[Stamp, ModelFootprint, dict[str, Any]]] = {}
        self._texts: dict[str, tuple[Stamp, ModelText]] = {}

    def model_text(self, model: str) -> ModelText:
        """What of the model decides its parsers (``parsers.model_text``), kept while its files are
        unchanged: a tokenizer.json is megabytes, and every reconcile of a tenant with parsers asks."""
        directory = self.settings.models_dir / model
        stamp = _stamp(directory, TEXT_FILES)
        with self._lock:
            cached = self._texts.get(model)
        if cached and cached[0] == stamp:
            return cached[1]
        text = model_text(directory)
        with self._lock:
            self._texts[model] = (stamp, text)
        return text

    def footprint(self, model: str, quantized: bool) -> tuple[ModelFootprint, dict[str, Any]]:
        """The model's footprint and its config.json. A pre-quantized checkpoint is served as
        stored, with or without --quant."""
        root = self.settings.models_dir
        stamp = _stamp(root / model)
        with self._lock:
            cached = self._footprints.get((model, quantized))
        if cached and cached[0] == stamp:
            return cached[1], cached[2]
        config = read_config(root, model)
        stored = quantized or checkpoint_method(config) is not None
        footprint = read_footprint(root, model, quantized=stored)
        with self._lock:
            self._footprints[(model, quantized)] = (stamp, footprint, config)
        return footprint, config

    def images(self, config: dict[str, Any], max_images: int, max_image_pixels: int) -> int:
        return image_allowance(config, self.platform, max_images, max_image_pixels)

    def minimum(
        self,
        model: str,
        max_model_len: int,
        quantized: bool,
        max_images: int,
        max_image_pixels: int,
        max_num_seqs: int | None = None,
    ) -> int:
        footprint, config = self.footprint(model, quantized)
        images = self.images(config, max_images, max_image_pixels)
        return self.minimum_of(model, footprint, max_model_len, images, max_num_seqs)

    def minimum_of(
        self, model: str, footprint: ModelFootprint, max_model_len: int, images: int, max_num_seqs: int | None = None
    ) -> int:
        return minimum(footprint, self._terms(model, images, max_model_len, max_num_seqs))

    def fit(self, spec: TenantSpec) -> EngineFit:
        """How the tenant's reservation is split inside its engine; InvalidInput when it cannot hold it."""
        footprint, config = self.footprint(spec.model, bool(spec.quantization))
        images = self.images(config, spec.max_images, spec.max_image_pixels)
        terms = self._terms(spec.model, images, spec.max_model_len, spec.max_num_seqs)
        try:
            split = fit(spec.gpu_memory, footprint, terms)
        except InvalidInput:
            if terms.overhead == self.settings.effective_engine_overhead:
                raise
            # a later start of the model logged more than this tenant was admitted with. On a GPU
            # vLLM sizes the KV cache itself, and refuses a context that does not fit in its own
            # words: the engine runs as few sequences as the reservation leaves room for
            room = spec.gpu_memory - minimum(footprint, replace(terms, overhead=0))
            if room < 0:
                raise
            split = fit(spec.gpu_memory, footprint, replace(terms, overhead=room))
        if images and resizes_by_pixels(config):
            return replace(split, image_pixels=spec.max_image_pixels)
        return split

    def overhead(self, model: str, images: bool) -> int:
        """The engine overhead counted for the model: the admin's ``GTM_ENGINE_OVERHEAD``, else what
        its engines' start-up logged (nvml), else the platform's figure."""
        if self.settings.engine_overhead is None and not self.platform.reservation_is_host_memory:
            learned = self.learned(model, images)
            if learned is not None:
                return learned
        return self.settings.effective_engine_overhead

    def _terms(self, model: str, images: int, max_model_len: int, max_num_seqs: int | None) -> Terms:
        overhead = self.overhead(model, bool(images))
        return Terms(self.platform, overhead, images, max_model_len, self.settings.min_kv_tokens, max_num_seqs)


TEXT_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "chat_template.jinja")


def _stamp(directory: Path, names: tuple[str, ...] = ()) -> Stamp:
    """Names, sizes and modification times of a model's files: ``names``, else its config and weights."""
    try:
        files = [directory / n for n in names] or [directory / "config.json", *sorted(directory.glob("*.safetensors"))]
        return tuple((f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files if f.exists())
    except OSError:
        return ()
