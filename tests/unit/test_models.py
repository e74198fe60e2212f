"""import-model: what is checked before anything is written, and what lands in the volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from manager.control.model_files import import_model
from manager.errors import Conflict, InvalidInput, NotFound

from .conftest import write_model

CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}


def a_model(root: Path, name: str = "src") -> Path:
    directory = write_model(root, name, {"w": ("BF16", [64, 256])}, CONFIG)
    config = (directory / "config.json").read_text()
    (directory / "config.json").write_text(config[:-1] + ', "architectures": ["LlamaForCausalLM"]}')
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_a_model_directory_is_copied_under_its_name(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    source = a_model(tmp_path / "upload")
    assert import_model(volume, source, "mine") == "mine"
    assert sorted(p.name for p in (volume / "mine").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in volume.iterdir()] == ["mine"]  # no staging left behind
    with pytest.raises(Conflict, match="already in the models volume"):
        import_model(volume, source, "mine")


def test_a_hugging_face_cache_entry_is_copied_from_its_snapshot_with_real_files(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    entry = tmp_path / "hub" / "models--acme--tiny-7b"
    model = a_model(tmp_path / "raw")
    snapshot = entry / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (entry / "blobs").mkdir()
    for f in model.iterdir():
        blob = entry / "blobs" / f.name
        blob.write_bytes(f.read_bytes())
        os.symlink(blob, snapshot / f.name)
    assert import_model(volume, entry) == "tiny-7b"
    copied = volume / "tiny-7b" / "model.safetensors"
    assert copied.is_file() and not copied.is_symlink()


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        ("tokenizer.json", "no tokenizer"),
        ("config.json", "no config.json"),
        ("model.safetensors", r"no \*\.safetensors"),
    ],
)
def test_an_incomplete_directory_is_refused_and_nothing_is_written(tmp_path: Path, breakage: str, says: str) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    source = a_model(tmp_path / "upload")
    (source / breakage).unlink()
    with pytest.raises(InvalidInput, match=says):
        import_model(volume, source, "broken")
    assert list(volume.iterdir()) == []


def test_bad_names_and_missing_sources(tmp_path: Path) -> None:
    source = a_model(tmp_path / "upload")
    with pytest.raises(InvalidInput, match="invalid model name"):
        import_model(tmp_path, source, "../escape")
    with pytest.raises(NotFound, match="is not a directory"):
        import_model(tmp_path, tmp_path / "nothing-here")
    with pytest.raises(InvalidInput, match="cannot read"):
        import_model(tmp_path, tmp_path / ("x" * 4096))


def test_a_safetensors_file_cut_short_is_refused_with_how_much_is_there(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    source = a_model(tmp_path / "upload")
    weights = source / "model.safetensors"
    raw = weights.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    weights.write_bytes(raw[: header + 100])  # the header intact, the tensors cut short
    with pytest.raises(
        InvalidInput, match=r"model\.safetensors is cut short: .* bytes of the \d+ its header describes"
    ):
        import_model(volume, source, "broken")
    assert list(volume.iterdir()) == []


def test_remove_model_refuses_while_a_tenant_uses_it_and_names_them(svc) -> None:
    from manager.domain import TenantSpec

    a_model(svc.settings.models_dir, "spare")
    spec = TenantSpec(name="lab", port=30001, gpu_memory=2 * 1024**3, model="demo", max_model_len=512)
    svc.create(spec, "admin")
    with pytest.raises(Conflict, match="model 'demo' is used by tenant lab; move them"):
        svc.models.remove("demo", "admin")
    svc.models.remove("spare", "admin")
    assert not (svc.settings.models_dir / "spare").exists()
    assert sorted(p.name for p in svc.settings.models_dir.iterdir()) == ["demo"]
    with pytest.raises(NotFound, match=r"model .spare. not found .* available: demo"):
        svc.models.remove("spare", "admin")
    assert [a.action for a in svc.audit_log(action="remove-model")] == ["remove-model", "remove-model"]
