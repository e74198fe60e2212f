from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from manager.control.reconciler import Reconciler
from manager.control.service import TenantService
from manager.control.sqlite_store import SqliteStore
from manager.control.store import TenantStore
from manager.domain import ALLOWED_TRANSITIONS, TenantStatus
from manager.gpu.cpu import HostMemoryInventory
from manager.runtime.memory import MemoryRuntime
from manager.runtime.protocol import Runtime
from manager.settings import Settings
from manager.wiring import create_app
from tests.serving import free_port, serving

from .fakes import FakeGateway

TOKEN = "unit-test-admin-token-0123456789abcdef"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        gpu_mode="cpu",
        state_dir=tmp_path / "state",
        models_dir=tmp_path / "models",
        models_source="gtm-models",
        instance="gtm",
    )


def write_model(models: Path, name: str, tensors: dict[str, tuple[str, list[int]]], config: dict[str, int]) -> Path:
    """A safetensors file with the given tensor headers (zero-filled data) and a config.json."""
    directory = models / name
    directory.mkdir(parents=True)
    sizes = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1}
    header: dict[str, object] = {}
    offset = 0
    for tname, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for dim in shape:
            n *= dim
        header[tname] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_demo_model(models: Path) -> Path:
    """A model named demo, as tiny as the real demo model (what tenants in unit tests serve)."""
    return write_model(
        models,
        "demo",
        {"w": ("BF16", [1000, 256])},
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256},
    )


@contextmanager
def manager_serving(root: Path, instance: str, runtime: Runtime) -> Iterator[str]:
    """The manager's app on a real socket with ``runtime`` behind it (no Docker): its base URL."""
    write_demo_model(root / "models")
    port = free_port()
    config = Settings(
        gpu_mode="cpu",
        instance=instance,
        state_dir=root / "state",
        models_dir=root / "models",
        api_host="127.0.0.1",
        api_port=port,
        admin_token=TOKEN,
        reconcile_interval_s=3600,
        # never the host's own: a unit test makes no encrypted volume (this host "cannot")
        volumes_dir=root / "no-volumes",
        volume_key_file=None,
    )
    with serving(create_app(config, runtime=runtime), port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The manager's app on a real socket with the in-memory runtime behind it (no Docker)."""
    with manager_serving(tmp_path_factory.mktemp("api"), "gtmu", MemoryRuntime()) as url:
        yield url


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[TenantService]:
    write_demo_model(tmp_path / "models")
    settings = Settings(
        gpu_mode="cpu",
        instance="gtmu",
        state_dir=tmp_path,
        models_dir=tmp_path / "models",
        volumes_dir=tmp_path / "no-volumes",
        volume_key_file=None,
    )
    store, runtime, inventory = SqliteStore(tmp_path / "m.db"), MemoryRuntime(), HostMemoryInventory()
    reconciler = Reconciler(settings, store, runtime, inventory, connect=FakeGateway())
    yield TenantService(settings, store, runtime, inventory, reconciler)
    store.close()


def walk_to(store: TenantStore, name: str, status: TenantStatus, reason: str = "") -> None:
    """Test set-up: the tenant walked along the diagram's arrows (``domain.ALLOWED_TRANSITIONS``)
    to ``status``, since the store refuses every write that skips one."""
    start = store.tenant(name).status
    paths: dict[TenantStatus, list[TenantStatus]] = {start: []}
    todo = [start]
    while todo and status not in paths:
        here = todo.pop(0)
        for there in sorted(ALLOWED_TRANSITIONS[here]):
            if there not in paths:
                paths[there] = [*paths[here], there]
                todo.append(there)
    with store.transaction() as tx:
        for step in paths[status] or [status]:
            assert store.set_status(tx, name, step, reason if step == status else ""), step
