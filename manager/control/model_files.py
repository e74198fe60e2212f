"""Bringing a model into the models volume (``import-model``) and taking it out (``remove-model``).

A source is a Hugging Face model directory (config.json, a tokenizer, *.safetensors) or
a snapshot in a local Hugging Face cache (``models--org--name/snapshots/<rev>/``, whose
files are links into ``blobs/``: the files themselves are copied). It is checked before
anything is written: config.json parses and names an architecture, a tokenizer is there,
every safetensors header reads. The copy lands under a temporary name and is renamed
into place, so a model is either all there or absent.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from manager.control.modelfit import read_footprint
from manager.errors import Conflict, InvalidInput, NotFound

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


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


def import_model(models_dir: Path, source: Path, name: str | None = None) -> str:
    """Checks ``source`` and copies it into ``models_dir/<name>``; returns the name."""
    try:
        found = source.is_dir()
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise InvalidInput(f"cannot read {str(source)[:200]!r}: {exc.strerror or exc}") from exc
    if not found:
        raise NotFound(
            f"{source} is not a directory: give the model's directory (config.json, tokenizer, "
            "*.safetensors) or a Hugging Face cache entry (models--org--name)"
        )
    directory = snapshot_dir(source)
    name = name or default_name(source)
    if not MODEL_NAME.match(name):
        raise InvalidInput(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (up to 100), "
            "starting with a letter or digit; pass --name"
        )
    target = models_dir / name
    if target.exists():
        raise Conflict(f"a model named {name!r} is already in the models volume; pass another --name")
    problems = check(directory, name)
    if problems:
        raise InvalidInput(f"{directory} cannot be served: {'; '.join(problems)}. Nothing was imported")
    staging = models_dir / f".importing-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(directory, staging, symlinks=False)  # cache snapshots link into blobs/
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # engines run as another user: readable by all
        staging.rename(target)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise InvalidInput(
            f"copying {directory} into {models_dir} failed ({exc.strerror or exc}); nothing was imported"
        ) from exc
    return name


def remove_model(models_dir: Path, name: str) -> None:
    """Deletes ``models_dir/<name>``: renamed away first, so the model is gone at once, whole."""
    if not MODEL_NAME.match(name) or not (models_dir / name).is_dir():
        raise NotFound(f"model {name!r} is not in the models volume; list-models shows the models there are")
    doomed = models_dir / f".removing-{name}"
    shutil.rmtree(doomed, ignore_errors=True)
    (models_dir / name).rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
