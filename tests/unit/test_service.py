"""Tenant operations through the service with the in-memory runtime and a real SQLite
store: what each admin action leaves in the desired state and, after the reconciler's
turn, in the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from manager import names
from manager.control.records import Reach
from manager.control.service import TenantService
from manager.domain import TenantSpec, TenantStatus
from manager.errors import Conflict, InvalidInput

from .conftest import walk_to, write_model

MIB = 1024**2


def create(svc: TenantService, name: str = "acme", port: int = 30001) -> None:
    svc.create(
        svc.new_spec(
            name=name,
            port=port,
            gpu_memory=1536 * MIB,
            model=None,
            max_model_len=None,
            quantization=None,
            shm_size=None,
        ),
        "admin",
    )


def test_an_engine_change_makes_the_tenant_pending_a_quota_change_does_not(svc: TenantService) -> None:
    create(svc)
    walk_to(svc.store, "acme", TenantStatus.RUNNING)
    svc.update("acme", "admin", rpm_limit=10)
    svc.update("acme", "admin", max_body=8 * MIB)  # the gateway's business: no new engine either
    assert svc.store.tenant("acme").status == TenantStatus.RUNNING
    assert svc.store.tenant("acme").spec.max_body == 8 * MIB
    svc.update("acme", "admin", gpu_memory=2048 * MIB)
    row = svc.store.tenant("acme")
    assert row.status == TenantStatus.PENDING and "recreated" in row.reason


def test_a_removed_name_can_be_added_again_once_it_is_gone(svc: TenantService) -> None:
    create(svc)
    svc.reconciler.reconcile("acme")
    svc.remove("acme", "admin")
    with pytest.raises(Conflict, match="already exists"):
        create(svc)  # still being removed
    svc.reconciler.reconcile("acme")
    assert svc.runtime.containers(names.selector("gtmu", tenant="acme")) == []
    create(svc)
    assert svc.store.tenant("acme").status == TenantStatus.PENDING


@pytest.mark.parametrize("quotas", [{"rpm_limit": 2**63}, {"tokens_per_day": 10**16}, {"max_in_flight": 0}])
def test_out_of_range_quotas_are_refused_with_the_range(svc: TenantService, quotas: dict[str, int]) -> None:
    create(svc)
    with pytest.raises(InvalidInput, match="must be between 1 and"):
        svc.update("acme", "admin", **quotas)


def test_grace_periods_are_bounded(svc: TenantService) -> None:
    create(svc)
    for grace in (-1.0, float("nan"), float("inf"), 10.0**12):
        with pytest.raises(InvalidInput, match="grace period"):
            svc.rotate_key("acme", "admin", grace)


def test_a_body_limit_out_of_range_is_refused(svc: TenantService) -> None:
    create(svc)
    with pytest.raises(InvalidInput, match="max body must be between"):
        svc.update("acme", "admin", max_body=1024**3)


def test_quant_is_checked_before_anything_is_created(svc: TenantService) -> None:
    for quant, says in (("int9", "unknown --quant"), ("int4", "is not quantized"), ("fp8", "needs a GPU")):
        with pytest.raises(InvalidInput, match=says):
            svc.new_spec(
                name="qq",
                port=30002,
                gpu_memory=1536 * MIB,
                model=None,
                max_model_len=None,
                quantization=quant,
                shm_size=None,
            )
    assert svc.store.tenants() == []


def write_vision_model(models: Path, architecture: str, vision_config: dict[str, object]) -> None:
    """``tinyvl``: a small text model's weights under a vision architecture's config."""
    text = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256}
    write_model(models, "tinyvl", {"w": ("BF16", [2000, 256])}, text)
    cfg = json.loads((models / "tinyvl" / "config.json").read_text())
    cfg.update(architectures=[architecture], vision_config=vision_config)
    (models / "tinyvl" / "config.json").write_text(json.dumps(cfg))


def test_the_catalog_lists_every_model_with_admissions_own_minimum(svc: TenantService, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_vision_model(models, "Qwen2VLForConditionalGeneration", {"depth": 2})
    (models / "empty").mkdir()
    entries = {e.name: e for e in svc.models.entries(max_model_len=2048)}
    assert set(entries) == {"demo", "empty", "tinyvl"}
    assert entries["tinyvl"].takes_images and not entries["demo"].takes_images
    assert "has no config.json" in entries["empty"].problem
    demo = entries["demo"]
    assert demo.minimum_gpu_memory == svc.models.minimum("demo", svc.settings.default_max_model_len, False)
    assert demo.minimum_gpu_memory_at is not None and demo.minimum_gpu_memory_at >= demo.minimum_gpu_memory
    fits = svc.placer.assess(demo.minimum_gpu_memory, "demo", svc.settings.default_max_model_len)
    short = svc.placer.assess(demo.minimum_gpu_memory - 1, "demo", svc.settings.default_max_model_len)
    assert "model_fit" not in fits.failed_checks and "model_fit" in short.failed_checks


def test_engines_are_measured_at_once_and_one_tenant_alone(svc: TenantService, monkeypatch) -> None:
    """Docker answers a memory read in about a second, so list-tenants, the console, /metrics and
    admission read every engine concurrently: here each read waits until all three are in flight
    (read one after another, the first would wait alone and time out). A tenant's own page reads
    only its engine."""
    import threading

    for i, name in enumerate(("aa", "bb", "cc")):
        create(svc, name, 30001 + i)
        svc.reconciler.reconcile(name)
        svc.runtime.set_health(names.engine("gtmu", name), "healthy")  # type: ignore[attr-defined]
        svc.reconciler.reconcile(name)  # up: the next engine may start
    all_in_flight = threading.Barrier(3, timeout=10)
    read: list[str] = []

    def memory_usage(container: str) -> int:
        read.append(container)
        if all_in_flight is not None:
            all_in_flight.wait()
        return 100 + len(container)

    monkeypatch.setattr(svc.runtime, "memory_usage", memory_usage)
    expected = {t: 100 + len(names.engine("gtmu", t)) for t in ("aa", "bb", "cc")}
    assert svc.meter.measured_use() == expected
    all_in_flight, read[:] = None, []
    assert svc.meter.measured_use("bb") == {"bb": expected["bb"]}
    assert read == [names.engine("gtmu", "bb")]


def test_a_vision_model_takes_four_images_by_default_and_its_minimum_holds_their_decode(
    svc: TenantService, tmp_path: Path
) -> None:
    write_vision_model(tmp_path / "models", "Idefics3ForConditionalGeneration", {"num_hidden_layers": 2})

    def spec(model: str | None, **options: object) -> TenantSpec:
        return svc.new_spec(
            name="vv", port=30002, gpu_memory=3 * 1024 * MIB, model=model, max_model_len=None,
            quantization=None, shm_size=None, **options,
        )  # fmt: skip

    assert spec("tinyvl").max_images == 4 and spec(None).max_images == 0, "a text model's tenant takes none"
    assert spec("tinyvl", max_images=1, max_num_seqs=0).max_num_seqs is None
    decode = 4 * 4096 * 3072 * 21  # cpu mode: four images of the default size, decoded in the reservation
    (entry,) = [e for e in svc.models.entries() if e.name == "tinyvl"]
    assert entry.minimum_gpu_memory == svc.models.minimum("tinyvl", svc.settings.default_max_model_len, False) + decode
    assert svc.models.minimum("tinyvl", 512, False, max_images=4, max_image_pixels=4096 * 3072) == (
        entry.minimum_gpu_memory
    )
    # what-if without image limits: the model's defaults, so it answers what add-tenant would
    assert "model_fit" in svc.placer.assess(entry.minimum_gpu_memory - 1, "tinyvl", 512).failed_checks
    assert "model_fit" not in svc.placer.assess(entry.minimum_gpu_memory, "tinyvl", 512).failed_checks
    with pytest.raises(InvalidInput, match="max images must be between 0 and 64"):
        spec("tinyvl", max_images=65)
    with pytest.raises(InvalidInput, match="unknown tenant options"):
        spec("tinyvl", max_imagez=1)
    created = svc.create(spec("tinyvl"), "test")
    updated = svc.update("vv", "test", model="demo")  # to a text model: it takes no images any more
    assert created.tenant.spec.max_images == 4 and updated.spec.max_images == 0


def test_parsers_are_checked_against_the_engine_and_the_model_before_anything_is_created(
    svc: TenantService,
) -> None:
    def spec(**parsers: object) -> TenantSpec:
        return svc.new_spec(name="tools", port=30003, gpu_memory=1536 * MIB, **parsers)

    tokenizer = {"added_tokens": [{"content": "<|im_start|>"}, {"content": "<|im_end|>"}]}
    (svc.settings.models_dir / "demo" / "tokenizer.json").write_text(json.dumps(tokenizer))

    with pytest.raises(InvalidInput, match="--tool-call-parser auto found no tool parser for model 'demo'"):
        spec(tool_call_parser="auto")
    with pytest.raises(InvalidInput, match="unknown --reasoning-parser 'qwen4'"):
        spec(reasoning_parser="qwen4")
    with pytest.raises(InvalidInput, match="--reasoning-parser qwen3 needs the tokens <think> </think>"):
        spec(reasoning_parser="qwen3")
    assert spec(tool_call_parser="none").tool_call_parser is None
    created = svc.create(spec(tool_call_parser="hermes"), "admin")
    assert created.tenant.spec.tool_call_parser == "hermes" and [r.spec.name for r in svc.tenants()] == ["tools"]
    with pytest.raises(InvalidInput, match="unknown --tool-call-parser"):
        svc.update("tools", "admin", tool_call_parser="hermez")
    assert svc.update("tools", "admin", tool_call_parser="none").spec.tool_call_parser is None


def test_a_tenants_url_is_the_address_its_port_is_bound_to(svc: TenantService) -> None:
    create(svc)
    assert svc.reach(svc.tenants()) == {}, "every interface (the default): the host's name is the admin's to give"
    svc.settings = svc.settings.model_copy(update={"tenant_bind_address": "192.0.2.7"})
    assert svc.reach(svc.tenants()) == {"acme": Reach(url="http://192.0.2.7:30001/v1")}
