"""import-model: what is checked before anything is written, and what lands in the volume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from manager.control.catalog import describe_origin
from manager.control.model_files import import_model, origin
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
    files = sorted(p.name for p in (volume / "mine").iterdir())
    assert files == ["config.json", "gtm-origin.json", "model.safetensors", "tokenizer.json"]
    assert origin(volume, "mine") == {"kind": "directory", "source": str(source)}
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


class FakeConverter:
    """The converter job's contract (``gguf_convert.py``) without torch: it finds the file in the
    staging folder and writes a model folder beside it, or answers a refusal."""

    def __init__(self, volume: Path, refuse: str | None = None, broken: bool = False) -> None:
        self.volume, self.refuse, self.broken = volume, refuse, broken
        self.calls: list[tuple[str, str]] = []

    def __call__(self, model: str, staging: str) -> dict[str, object]:
        self.calls.append((model, staging))
        assert (self.volume / staging / "source.gguf").read_bytes().startswith(b"GGUF")
        if self.refuse:
            return {"ok": False, "reason": self.refuse}
        written = a_model(self.volume / staging, "model")
        if self.broken:
            (written / "tokenizer.json").unlink()
        return {"ok": True, "architecture": "LlamaForCausalLM", "quantization": "Q4_1", "seconds": 1.0}


def a_gguf(root: Path, name: str = "SmolLM2-135M-Instruct.Q4_1.gguf", head: bytes = b"GGUF\x03\x00\x00\x00") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(head + bytes(64))
    return root / name


def test_a_gguf_file_is_converted_into_the_volume_under_its_name_with_its_origin(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    convert = FakeConverter(volume)
    assert import_model(volume, a_gguf(tmp_path / "upload"), None, convert) == "SmolLM2-135M-Instruct.Q4_1"
    assert convert.calls == [("SmolLM2-135M-Instruct.Q4_1", ".importing-SmolLM2-135M-Instruct.Q4_1")]
    assert [p.name for p in volume.iterdir()] == ["SmolLM2-135M-Instruct.Q4_1"]  # staging and its copy gone
    facts = origin(volume, "SmolLM2-135M-Instruct.Q4_1")
    assert facts == {
        "kind": "gguf",
        "source": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "architecture": "LlamaForCausalLM",
        "quantization": "Q4_1",
    }
    assert describe_origin(facts) == "gguf SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1)"
    assert import_model(volume, a_gguf(tmp_path / "upload"), "smollm2", convert) == "smollm2"
    with pytest.raises(Conflict, match="already in the models volume"):
        import_model(volume, a_gguf(tmp_path / "upload"), "smollm2", convert)


@pytest.mark.parametrize(
    ("converter", "says"),
    [
        ({"refuse": "it holds no tokenizer"}, "cannot be imported: it holds no tokenizer. Nothing was imported"),
        ({"broken": True}, "converted into a folder that cannot be served: no tokenizer"),
    ],
)
def test_a_gguf_the_converter_refuses_or_breaks_leaves_nothing(
    tmp_path: Path, converter: dict[str, object], says: str
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    convert = FakeConverter(volume, **converter)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=says):
        import_model(volume, a_gguf(tmp_path / "upload"), "smol", convert)
    assert list(volume.iterdir()) == []


def test_a_file_that_is_not_gguf_is_refused_before_any_conversion(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    convert = FakeConverter(volume)
    with pytest.raises(InvalidInput, match=r"not a GGUF file .* give a \.gguf file, or the model's directory"):
        import_model(volume, a_gguf(tmp_path / "upload", "model.bin", head=b"PK\x03\x04"), "x", convert)
    with pytest.raises(InvalidInput, match="invalid model name"):
        import_model(volume, a_gguf(tmp_path / "upload"), "../up", convert)
    assert convert.calls == [] and list(volume.iterdir()) == []
