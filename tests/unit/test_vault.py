"""Encrypted volumes on the control side (``manager.control.vault`` and the reconciler's use of
it) against the in-memory ``MemoryVolumes``, which passes the same contract as the kernel's
(``tests/integration/test_encrypted_volumes.py`` runs it on fscrypt)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from manager import names
from manager.control.plan import ENGINE_UID
from manager.control.reconciler import Reconciler
from manager.control.service import TenantService
from manager.control.sqlite_store import SqliteStore
from manager.control.vault import MOVED
from manager.domain import ENCRYPTED, TenantSpec, TenantStatus
from manager.errors import EncryptionUnavailable, InvalidInput
from manager.gpu.cpu import HostMemoryInventory
from manager.runtime.memory import MemoryRuntime
from manager.runtime.types import ContainerPlan
from manager.settings import Settings
from manager.volumes.keyring import new_kek_line
from tests.volumes_contract import VolumesContract

from .conftest import write_demo_model
from .fakes import FakeGateway, MemoryVolumes

MIB = 1024**2
INSTANCE = "gtmu"


class TestMemoryVolumes(VolumesContract):
    @pytest.fixture
    def volumes(self, tmp_path: Path) -> MemoryVolumes:
        return MemoryVolumes(tmp_path / "volumes")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.key_file = tmp_path / "volume-keys"
        self.key_file.write_text(new_kek_line() + "\n")
        write_demo_model(tmp_path / "models")
        self.settings = Settings(
            gpu_mode="cpu",
            instance=INSTANCE,
            state_dir=tmp_path,
            models_dir=tmp_path / "models",
            volume_key_file=self.key_file,
            volumes_dir=tmp_path,
            volume_size=64 * MIB,
        )
        self.db = tmp_path / "manager.db"
        self.store = SqliteStore(self.db)
        self.runtime = MemoryRuntime()
        self.volumes = MemoryVolumes(tmp_path / "volumes")
        self.clock = Clock()
        self.rec = Reconciler(
            self.settings,
            self.store,
            self.runtime,
            HostMemoryInventory(),
            connect=FakeGateway(),
            clock=self.clock,
            volumes=self.volumes,
        )
        self.svc = TenantService(self.settings, self.store, self.runtime, HostMemoryInventory(), self.rec)
        self.vault = self.rec.vault

    def spec(self, name: str = "acme", **more: object) -> TenantSpec:
        return self.svc.new_spec(name, port=30001, gpu_memory=1536 * MIB, **more)

    def add(self, name: str = "acme", **more: object) -> None:
        self.svc.create(self.spec(name, **more), "test")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


# ---------------------------------------------------------------- the vault itself
def test_a_volume_is_made_once_then_opened_with_its_unwrapped_key(world: World) -> None:
    spec = world.spec(volume="encrypted:/data")
    assert spec.volume == ENCRYPTED
    assert world.vault.ready(spec, ENGINE_UID) is True
    row = world.store.volume_key("acme")
    assert row is not None and row.size == 64 * MIB and row.volume_id == world.volumes.volume_id("acme")
    world.volumes.close("acme")
    assert world.vault.ready(spec, ENGINE_UID) is False and world.volumes.is_open("acme")


def test_a_wrapped_key_moved_onto_another_volume_opens_nothing(world: World) -> None:
    a, b = world.spec("aaa", volume="encrypted"), world.spec("bbb", volume="encrypted")
    world.vault.ready(a, ENGINE_UID)
    world.vault.ready(b, ENGINE_UID)
    world.volumes.close("bbb")
    stolen = world.store.volume_key("aaa")
    assert stolen is not None
    world.store.put_volume_key(stolen.__class__(**{**stolen.__dict__, "tenant": "bbb"}))
    with pytest.raises(EncryptionUnavailable, match="does not belong to it"):
        world.vault.ready(b, ENGINE_UID)
    assert not world.volumes.is_open("bbb")


def test_erase_leaves_no_volume_and_no_wrapped_key_in_the_database_file(world: World) -> None:
    spec = world.spec(volume="encrypted")
    world.vault.ready(spec, ENGINE_UID)
    row = world.store.volume_key("acme")
    assert row is not None
    world.vault.erase("acme")
    world.vault.erase("acme")  # idempotent
    assert world.store.volume_key("acme") is None and not world.volumes.exists("acme")
    wal = world.db.with_name(world.db.name + "-wal")
    on_disk = world.db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert row.wrapped not in on_disk


def test_rotation_rewraps_every_key_and_the_volumes_still_open(world: World) -> None:
    for name in ("aaa", "bbb"):
        world.vault.ready(world.spec(name, volume="encrypted"), ENGINE_UID)
        world.volumes.close(name)
    old = world.vault.keyring.current_id()
    world.key_file.write_text(new_kek_line() + "\n" + world.key_file.read_text())
    kek, done = world.svc.rotate_volume_keys("test")
    assert done == ["aaa", "bbb"] and kek != old
    assert world.svc.rotate_volume_keys("test")[1] == []  # nothing left to rewrap
    world.key_file.write_text(world.key_file.read_text().splitlines()[0] + "\n")  # the old key dropped
    for name in ("aaa", "bbb"):
        world.vault.ready(world.spec(name, volume="encrypted"), ENGINE_UID)
        assert world.volumes.is_open(name)
    assert world.store.audit_log(action="rotate-volume-key")[0].result == "ok"


# ---------------------------------------------------------------- refusals, before anything is written
def test_a_host_that_cannot_is_refused_with_what_it_lacks_and_nothing_is_made(world: World) -> None:
    world.volumes.lacks = "this kernel's ext4 cannot encrypt"
    with pytest.raises(EncryptionUnavailable, match="cannot have an encrypted volume on this host: this kernel"):
        world.add(volume="encrypted:/data")
    assert world.store.tenants() == [] and world.volumes.names() == []
    world.volumes.lacks = None
    world.key_file.unlink()
    with pytest.raises(EncryptionUnavailable, match=r"volume key file .* does not exist"):
        world.add(volume="encrypted:/data")
    assert world.store.tenants() == []
    world.add()  # a plain tenant needs none of it
    assert world.store.tenant("acme").spec.volume == "plain"


def test_encryption_switched_off_refuses_it(world: World) -> None:
    world.vault.settings = world.settings.model_copy(update={"volume_encryption": "off"})
    with pytest.raises(EncryptionUnavailable, match="GTM_VOLUME_ENCRYPTION=off"):
        world.add(volume="encrypted")


@pytest.mark.parametrize("written", ["encrypted:/srv", "luks", "encrypted:", "encrypted:/data/x"])
def test_only_data_can_be_encrypted(world: World, written: str) -> None:
    with pytest.raises(InvalidInput, match=r"--volume is encrypted:/data .* or plain"):
        world.add(volume=written)


def test_a_disk_without_room_is_refused_with_both_numbers(world: World) -> None:
    with pytest.raises(InvalidInput, match=r"No space left on device .* needs 1024\.0 TiB, the disk of .* free"):
        world.add(volume="encrypted", volume_size=1024**5)
    assert world.store.tenants() == []


def test_an_encrypted_volume_stays_encrypted_and_keeps_its_size(world: World) -> None:
    world.add(volume="encrypted")
    with pytest.raises(InvalidInput, match="is encrypted and stays so"):
        world.svc.update("acme", "test", volume="plain")
    with pytest.raises(InvalidInput, match="keeps the size it was made with"):
        world.svc.update("acme", "test", volume_size=128 * MIB)


# ---------------------------------------------------------------- the reconciler
def engine_mounts(world: World, name: str) -> dict[str, str]:
    c = world.runtime.container(names.engine(INSTANCE, name))
    assert c is not None
    plan = world.runtime.plan_of(c.name)
    return {m.target: m.source for m in plan.mounts}


def test_the_volume_is_open_before_the_engine_starts_which_binds_its_data(world: World) -> None:
    world.add(volume="encrypted:/data")
    world.rec.reconcile("acme")
    assert world.volumes.is_open("acme")
    assert engine_mounts(world, "acme")["/data"] == str(world.settings.volumes_dir / INSTANCE / "acme" / "data")
    assert names.volume(INSTANCE, "acme") not in {v.name for v in world.runtime.volumes([])}
    assert world.runtime.completed[-1] == names.prepare(INSTANCE, "acme")


def test_a_volume_that_does_not_open_fails_the_tenant_with_the_reason_and_starts_no_engine(world: World) -> None:
    world.add(volume="encrypted:/data")
    world.rec.reconcile("acme")
    world.runtime.remove_container(names.engine(INSTANCE, "acme"))
    world.volumes.close("acme")
    world.key_file.write_text(new_kek_line() + "\n")  # the host's key replaced, not rotated
    with pytest.raises(EncryptionUnavailable):
        world.rec.reconcile("acme")
    row = world.store.tenant("acme")
    assert row.status == TenantStatus.FAILED and row.reason.startswith("encrypted volume: the key of tenant acme")
    assert world.runtime.container(names.engine(INSTANCE, "acme")) is None


def test_removal_crypto_erases(world: World) -> None:
    world.add(volume="encrypted:/data")
    world.rec.reconcile("acme")
    world.svc.remove("acme", "test")
    world.rec.reconcile("acme")
    assert world.store.find_tenant("acme") is None
    assert not world.volumes.exists("acme") and world.store.volume_key("acme") is None


def test_an_orphaned_volume_is_erased_after_the_grace_period(world: World) -> None:
    world.vault.ready(world.spec("ghost", volume="encrypted"), ENGINE_UID)
    assert "ghost" in world.rec._actual_tenants()
    world.rec.reconcile("ghost")
    assert world.volumes.exists("ghost")  # seen once: within its grace
    world.clock.now += world.settings.orphan_grace_s + 1
    world.rec.reconcile("ghost")
    assert not world.volumes.exists("ghost") and world.store.volume_key("ghost") is None


def copy_job(world: World, fail: bool = False) -> None:
    def copy(plan: ContainerPlan) -> None:
        target = world.vault.data_path("acme")
        (target / "cache.bin").write_text("from the plain volume")
        if not fail:
            (target / MOVED).touch()

    world.runtime.effects[names.move_data(INSTANCE, "acme")] = copy


def test_update_moves_a_plain_volumes_data_in_then_removes_the_plain_volume(world: World) -> None:
    world.add()
    world.rec.reconcile("acme")
    assert names.volume(INSTANCE, "acme") in {v.name for v in world.runtime.volumes([])}
    copy_job(world)
    world.svc.update("acme", "test", volume="encrypted:/data")
    world.rec.reconcile("acme")
    assert (world.vault.data_path("acme") / "cache.bin").read_text() == "from the plain volume"
    assert names.volume(INSTANCE, "acme") not in {v.name for v in world.runtime.volumes([])}
    assert engine_mounts(world, "acme")["/data"].endswith("/acme/data")
    order = world.runtime.completed
    after = order[order.index(names.move_data(INSTANCE, "acme")) :]
    assert names.prepare(INSTANCE, "acme") in after  # the new volume, given to the engine's user


def test_a_copy_that_fails_keeps_the_plain_volume_and_leaves_no_encrypted_one(world: World) -> None:
    world.add()
    world.rec.reconcile("acme")
    world.svc.update("acme", "test", volume="encrypted:/data")
    world.runtime.fail_next(names.move_data(INSTANCE, "acme"), "cp: No space left on device")
    with pytest.raises(Exception, match="copying the data of acme into its encrypted volume failed"):
        world.rec.reconcile("acme")
    assert names.volume(INSTANCE, "acme") in {v.name for v in world.runtime.volumes([])}
    assert not world.volumes.exists("acme") and world.store.volume_key("acme") is None
    assert world.store.tenant("acme").status == TenantStatus.FAILED
    assert world.runtime.container(names.engine(INSTANCE, "acme")) is None
    # a copy cut short (no marker) is redone from an empty volume
    copy_job(world, fail=True)
    with pytest.raises(Exception, match="copying"):
        world.rec.reconcile("acme")
    world.store.clear_engine_failure("acme")
    copy_job(world)
    world.rec.reconcile("acme")
    assert world.vault.moved("acme") and names.volume(INSTANCE, "acme") not in {
        v.name for v in world.runtime.volumes([])
    }


def test_only_an_encrypted_volume_changes_the_engines_identity(world: World) -> None:
    assert world.spec(volume="encrypted").engine_hash() != world.spec().engine_hash()
    assert world.spec().engine_hash() == world.spec(volume="plain").engine_hash()


def test_a_plain_tenant_touches_no_encrypted_volume(world: World) -> None:
    world.volumes.lacks = "no loop devices"
    world.add()
    world.rec.reconcile("acme")
    assert world.volumes.names() == [] and world.store.volume_keys() == []
    assert engine_mounts(world, "acme")["/data"] == names.volume(INSTANCE, "acme")
