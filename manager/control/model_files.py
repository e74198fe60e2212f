"""Bringing a model into the models volume (``import-model``) and taking it out (``remove-model``).

A source is one of:
- a Hugging Face model directory (config.json, a tokenizer, *.safetensors) or a snapshot in a
  local Hugging Face cache (``models--org--name/snapshots/<rev>/``, whose files are links into
  ``blobs/``: the files themselves are copied). It is checked before anything is written:
  config.json parses and names an architecture, a tokenizer is there, every safetensors header
  reads.
- a GGUF file (llama.cpp's and Ollama's format): converted by the converter job
  (``gguf_convert.py``, run by the caller) into a Hugging Face folder, then checked the same way.

Either lands under a temporary name (``.importing-<name>``) and is renamed into place, so a
model is either all there or absent; a refusal leaves nothing behind. Each imported model
carries ``gtm-origin.json``: where it came from, which list-models shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from manager.control.gguf_convert import OUT, SOURCE
from manager.control.modelfit import read_footprint
from manager.errors import Conflict, InvalidInput, NotFound

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
ORIGIN_FILE = "gtm-origin.json"
GGUF_MAGIC = b"GGUF"

Converter = Callable[[str, str], dict[str, Any]]
"""``convert(model, staging)``: runs the converter job on ``<staging>/source.gguf`` in the models
volume and returns its answer (``gguf_convert.py``: ``ok`` and the facts, or ``reason``)."""


def is_gguf(source: Path) -> bool:
    with source.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def origin(models_dir: Path, name: str) -> dict[str, Any] | None:
    """Where a model came from (its ``gtm-origin.json``), or None for one placed by hand."""
    try:
        found = json.loads((models_dir / name / ORIGIN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _write_origin(directory: Path, facts: dict[str, Any]) -> None:
    (directory / ORIGIN_FILE).write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    (directory / ORIGIN_FILE).chmod(0o644)


def snapshot_dir(source: Path) -> Path:
    """The directory holding the model's files: ``source`` itself, or the newest snapshot of a
    Hugging Face cache entry (``models--org--name``)."""
    snapshots = source / "snapshots"
    if not (source / "config.json").exists() and snapshots.is_dir():
        candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1]
    return source


def default_name(source: Path) -> str:
    name = source.name
    if name.startswith("models--"):  # a cache entry: models--Qwen--Qwen2.5-7B -> Qwen2.5-7B
        name = name.split("--")[-1]
    return name


def check(directory: Path, name: str) -> list[str]:
    """What is missing or broken in a model directory ([] when it can be served)."""
    problems = []
    try:
        config = json.loads((directory / "config.json").read_text())
        if not config.get("architectures"):
            problems.append("config.json names no architectures")
    except FileNotFoundError:
        problems.append("no config.json")
    except ValueError as exc:
        problems.append(f"config.json is not valid JSON ({exc})")
    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        problems.append(f"no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if not problems:
        try:
            read_footprint(directory.parent, directory.name)  # every safetensors header, and the config
        except (InvalidInput, NotFound, KeyError, OSError, ValueError) as exc:
            problems.append(getattr(exc, "message", None) or f"unreadable weights or config ({exc!r})")
    return problems


def import_model(models_dir: Path, source: Path, name: str | None = None, convert: Converter | None = None) -> str:
    """Checks ``source`` and copies it into ``models_dir/<name>`` (a GGUF file: converts it there
    with ``convert``); returns the name."""
    try:
        found = source.is_dir()
        a_file = not found and source.is_file()
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise InvalidInput(f"cannot read {str(source)[:200]!r}: {exc.strerror or exc}") from exc
    if a_file and convert is not None:
        return import_gguf(models_dir, source, name, convert)
    if not found:
        raise NotFound(
            f"{source} is not a directory or a GGUF file: give the model's directory (config.json, "
            "tokenizer, *.safetensors), a Hugging Face cache entry (models--org--name) or a .gguf file"
        )
    directory = snapshot_dir(source)
    name = _target_name(models_dir, name or default_name(source))
    problems = check(directory, name)
    if problems:
        raise InvalidInput(f"{directory} cannot be served: {'; '.join(problems)}. Nothing was imported")
    staging = models_dir / f".importing-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(directory, staging, symlinks=False)  # cache snapshots link into blobs/
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # engines run as another user: readable by all
        _write_origin(staging, {"kind": "directory", "source": str(source)})
        staging.rename(models_dir / name)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InvalidInput(
            f"copying {directory} into {models_dir} failed ({exc.strerror or exc}); nothing was imported"
        ) from exc
    return name


def import_gguf(models_dir: Path, source: Path, name: str | None, convert: Converter) -> str:
    """Converts the GGUF file ``source`` into ``models_dir/<name>`` (default: the file's name
    without .gguf). The file is linked (or copied) into a staging folder in the volume, where the
    converter job reads it and writes the model folder beside it; the folder is checked like an
    imported directory and renamed into place. Any refusal removes the staging folder."""
    try:
        gguf = is_gguf(source)
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror or exc}") from exc
    if not gguf:
        raise InvalidInput(
            f"{source} is a file but not a GGUF file (it does not start with 'GGUF'): give a .gguf "
            "file, or the model's directory (config.json, tokenizer, *.safetensors)"
        )
    name = _target_name(models_dir, name or source.name.removesuffix(".gguf"))
    staging = models_dir / f".importing-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        try:
            os.link(source, staging / SOURCE)  # the same filesystem: no second copy
        except OSError:
            shutil.copyfile(source, staging / SOURCE)
        answer = convert(name, staging.name)
        if not answer.get("ok"):
            raise InvalidInput(f"{source.name} cannot be imported: {answer.get('reason')}. Nothing was imported")
        converted = staging / OUT
        problems = check(converted, name)
        if problems:
            raise InvalidInput(
                f"{source.name} converted into a folder that cannot be served: {'; '.join(problems)}. "
                "Nothing was imported"
            )
        facts = {k: v for k, v in answer.items() if k not in ("ok", "seconds")}
        _write_origin(converted, {"kind": "gguf", "source": source.name, **facts})
        converted.rename(models_dir / name)
    except OSError as exc:
        raise InvalidInput(
            f"converting {source.name} into {models_dir} failed ({exc.strerror or exc}); nothing was imported"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return name


def _target_name(models_dir: Path, name: str) -> str:
    """``name``, checked: a valid model name not yet in the volume."""
    if not MODEL_NAME.match(name):
        raise InvalidInput(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (up to 100), "
            "starting with a letter or digit; pass --name"
        )
    if (models_dir / name).exists():
        raise Conflict(f"a model named {name!r} is already in the models volume; pass another --name")
    return name


def remove_model(models_dir: Path, name: str) -> None:
    """Deletes ``models_dir/<name>``: renamed away first, so the model is gone at once, whole."""
    if not MODEL_NAME.match(name) or not (models_dir / name).is_dir():
        raise NotFound(f"model {name!r} is not in the models volume; list-models shows the models there are")
    doomed = models_dir / f".removing-{name}"
    shutil.rmtree(doomed, ignore_errors=True)
    (models_dir / name).rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
