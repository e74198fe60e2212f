"""Encrypted tenant volumes on the real path: ext4's encryption through the kernel's ioctls,
loop devices, Docker binding the volume into a container, SQLite keeping the wrapped keys. The
containers here stand in for an engine (the manager's image, as uid 1000, /data bound the way the
engine's plan binds it): a real engine on an encrypted volume is test_stack's companya, made by
``docker exec manager add-tenant --volume encrypted:/data`` in the manager's container.

Cost: about 10 s (a few one-off containers; no engine starts)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from manager import names
from manager.control.plan import ENGINE_UID, data_source
from manager.control.reconciler import Reconciler
from manager.control.sqlite_store import SqliteStore
from manager.control.vault import Vault
from manager.domain import TenantSpec
from manager.errors import EncryptionUnavailable, GtmError
from manager.gpu.cpu import HostMemoryInventory
from manager.names import Role
from manager.runtime.docker import DockerRuntime
from manager.runtime.types import ContainerPlan, Mount, VolumePlan
from manager.settings import Settings
from manager.volumes import kernel
from manager.volumes.fscrypt import FscryptVolumes
from manager.volumes.keyring import new_kek_line
from tests.volumes_contract import VolumesContract

from .conftest import MANAGER_IMAGE, erase_encrypted_volumes, settings_for, shared_mount

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not kernel.ext4_encryption() or not Path(kernel.LOOP_CONTROL).exists(),
    reason="encrypted volumes need root, ext4 encryption and loop devices (CI has them)",
)
MIB = 1024**2


class TestFscryptVolumes(VolumesContract):
    @pytest.fixture
    def volumes(self, tmp_path: Path) -> Iterator[FscryptVolumes]:
        volumes = FscryptVolumes(tmp_path / "volumes", require_shared=False)
        yield volumes
        for name in volumes.names():
            volumes.erase(name)


class World:
    def __init__(self, instance: str, tmp_path: Path, models_dir: Path) -> None:
        self.instance = instance
        key_file = tmp_path / "volume-keys"
        key_file.write_text(new_kek_line() + "\n")
        self.settings: Settings = settings_for(
            instance,
            models_dir,
            tmp_path / "state",
            volumes_dir=tmp_path / "volumes",
            volume_key_file=key_file,
            volume_size=128 * MIB,
        )
        self.settings.volumes_dir.mkdir()
        shared_mount(self.settings.volumes_dir)
        self.runtime = DockerRuntime()
        self.store = SqliteStore(self.settings.database_path)
        self.vault = Vault(self.settings, self.store, FscryptVolumes(self.settings.volumes_dir / instance))
        self.spec = TenantSpec(
            name="enc", port=30001, gpu_memory=1536 * MIB, model="demo", max_model_len=512, volume="encrypted"
        )

    def as_engine(self, code: str, name: str = "writer") -> tuple[int, str]:
        """``code`` run in python3 as the engine's user, with /data bound as the engine's plan binds it."""
        plan = ContainerPlan(
            name=f"{self.instance}-{name}",
            image=MANAGER_IMAGE,
            entrypoint=["python3", "-c", code],
            command=[],
            labels=names.labels(self.instance, Role.PREPARE, self.spec.name),
            network="none",
            mounts=[Mount(data_source(self.spec, self.settings), "/data")],
            user=f"{ENGINE_UID}:{ENGINE_UID}",
        )
        return self.runtime.run_to_completion(plan, 60)


@pytest.fixture
def world(instance: str, tmp_path: Path, models_dir: Path) -> Iterator[World]:
    w = World(instance, tmp_path, models_dir)
    try:
        yield w
    finally:
        w.store.close()
        erase_encrypted_volumes(lambda i: i == instance, w.settings.volumes_dir)
        subprocess.run(["umount", str(w.settings.volumes_dir)], check=False)


def test_what_an_engine_writes_reaches_the_disk_only_encrypted(world: World) -> None:
    assert world.vault.problem() is None
    assert world.vault.ready(world.spec, ENGINE_UID) is True
    marker = "PLAINTEXT-" + uuid.uuid4().hex
    code, out = world.as_engine(
        f"import os; os.makedirs('/data/hf/hub'); open('/data/known.txt','w').write('{marker}' * 100)"
    )
    assert code == 0, out
    data = world.vault.data_path("enc")
    assert (data / "known.txt").read_text().startswith(marker) and (data / "known.txt").stat().st_uid == ENGINE_UID
    os.sync()
    image = world.vault.volumes.image("enc")  # type: ignore[attr-defined]
    raw = image.read_bytes()
    assert len(raw) == 128 * MIB and marker.encode() not in raw and b"known.txt" not in raw

    # closed (key out of the kernel, unmounted), then a wrong key: refused, and the names unreadable
    world.vault.volumes.close("enc")
    with pytest.raises(EncryptionUnavailable, match="does not open its volume"):
        world.vault.volumes.open("enc", os.urandom(64))
    shown = sorted(os.listdir(data))
    assert "known.txt" not in shown and "hf" not in shown and len(shown) == 2
    with pytest.raises(OSError, match="Required key not available"):
        (data / shown[0]).read_bytes() if (data / shown[0]).is_file() else (data / shown[1]).read_bytes()
    world.vault.ready(world.spec, ENGINE_UID)  # its own key, unwrapped from the state
    assert (data / "known.txt").read_text().startswith(marker)


def test_an_engine_started_while_the_volume_is_closed_fails_and_writes_nothing_underneath(world: World) -> None:
    world.vault.ready(world.spec, ENGINE_UID)
    world.vault.volumes.close("enc")
    with pytest.raises(GtmError, match="bind source path does not exist"):
        world.as_engine("open('/data/leak.txt', 'w').write('plaintext')", name="early")
    mountpoint = world.settings.volumes_dir / world.instance / "enc"
    assert os.listdir(mountpoint) == [], "nothing under the closed volume's mount point"


def test_a_manager_restart_and_a_reboot_keep_the_data(world: World) -> None:
    world.vault.ready(world.spec, ENGINE_UID)
    (world.vault.data_path("enc") / "kept.txt").write_text("still here")
    # a manager restart: a new process, the same state; the open volume is left as it is
    again = Vault(world.settings, SqliteStore(world.settings.database_path), FscryptVolumes(world.vault.volumes.root))  # type: ignore[attr-defined]
    assert again.ready(world.spec, ENGINE_UID) is False
    # a reboot: no mount, no loop device, no key in the kernel; the next start opens it again
    world.vault.volumes.close("enc")
    assert not world.vault.volumes.is_open("enc")
    assert again.ready(world.spec, ENGINE_UID) is False
    assert (again.data_path("enc") / "kept.txt").read_text() == "still here"
    again.store.close()


def test_removal_leaves_no_key_mount_loop_device_or_image(world: World) -> None:
    world.vault.ready(world.spec, ENGINE_UID)
    image = world.vault.volumes.image("enc")  # type: ignore[attr-defined]
    (loop,) = kernel.loop_devices_of(image)
    wrapped = world.store.volume_key("enc")
    assert wrapped is not None
    busy = open(world.vault.data_path("enc") / "open.txt", "w")  # noqa: SIM115 - held open on purpose
    with pytest.raises(EncryptionUnavailable, match="still in use"):
        world.vault.erase("enc")
    busy.close()
    world.vault.erase("enc")
    mountpoint = world.settings.volumes_dir / world.instance / "enc"
    assert not image.exists() and not mountpoint.exists()
    assert str(mountpoint) not in Path("/proc/self/mountinfo").read_text()
    assert not Path(f"/sys/block/{loop.removeprefix('/dev/')}/loop/backing_file").exists(), "the loop device is free"
    assert world.store.volume_key("enc") is None
    db = world.settings.database_path
    assert wrapped.wrapped not in db.read_bytes() + db.with_name(db.name + "-wal").read_bytes()


def test_update_tenant_moves_a_plain_volumes_data_into_the_encrypted_one(
    world: World, docker_client: docker.DockerClient
) -> None:
    """The reconciler's step between the old engine's removal and the new one's start (the engine
    itself is test_stack's): the Docker volume copied in, owners kept, then removed."""
    plain = names.volume(world.instance, "enc")
    world.runtime.ensure_volume(VolumePlan(plain, names.labels(world.instance, Role.VOLUME, "enc")))
    fill = (
        "import os; os.makedirs('/d/vllm-cache'); open('/d/vllm-cache/c.bin','w').write('cached'); "
        "[os.chown(p, 1000, 1000) for p in ('/d', '/d/vllm-cache', '/d/vllm-cache/c.bin')]; os.chmod('/d', 0o700)"
    )
    docker_client.containers.run(
        MANAGER_IMAGE, ["-c", fill], entrypoint="python3", remove=True, volumes={plain: {"bind": "/d", "mode": "rw"}},
        network_mode="none", labels=names.labels(world.instance, Role.PREPARE, "enc"),
    )  # fmt: skip
    with world.store.transaction() as db:
        world.store.insert_tenant(db, world.spec, gateway_token="t")
    rec = Reconciler(world.settings, world.store, world.runtime, HostMemoryInventory(), volumes=world.vault.volumes)
    rec._open_volume(world.store.tenant("enc"))
    copied = rec.vault.data_path("enc") / "vllm-cache" / "c.bin"
    assert copied.read_text() == "cached" and copied.stat().st_uid == ENGINE_UID
    assert rec.vault.moved("enc")
    assert plain not in {v.name for v in world.runtime.volumes(names.selector(world.instance))}
    rec._open_volume(world.store.tenant("enc"))  # idempotent: nothing to move any more
