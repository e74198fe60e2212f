"""Tenants' encrypted volumes, as the control plane keeps them: each made with a random data key,
which the state keeps only wrapped under the host's key-encryption key, bound to the tenant and
the volume; opened (idempotently) before the tenant's engine starts; crypto-erased with the tenant.

The host side is ``manager.volumes`` (an ``EncryptedVolumes``); the keys' wrapping is
``manager.volumes.keyring``. An unwrapped key lives only in this process's memory while a call
needs it, and in the kernel's keyring of the volume's filesystem while it is open.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from manager.control.records import VolumeKeyRow
from manager.control.store import TenantStore
from manager.domain import TenantSpec
from manager.errors import EncryptionUnavailable, InvalidInput
from manager.settings import Settings
from manager.sizes import format_size
from manager.volumes.fscrypt import FscryptVolumes
from manager.volumes.keyring import Keyring, WrappedKey, binding, new_data_key
from manager.volumes.protocol import EncryptedVolumes

log = logging.getLogger(__name__)

MOVED = ".gtm-moved"
"""Left in an encrypted volume once a plain volume's data was copied into it in full."""


def open_volumes(settings: Settings) -> EncryptedVolumes:
    return FscryptVolumes(settings.volumes_dir / settings.instance)


class Vault:
    def __init__(
        self,
        settings: Settings,
        store: TenantStore,
        volumes: EncryptedVolumes,
        keyring: Keyring | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.volumes = volumes
        self.keyring = keyring or Keyring(settings.volume_key_file)
        self.clock = clock

    # ---------------------------------------------------------------- can this host do it
    def problem(self) -> str | None:
        """Why an encrypted tenant cannot be made or opened here; None: it can."""
        if self.settings.volume_encryption == "off":
            return "encrypted volumes are off on this host (GTM_VOLUME_ENCRYPTION=off)"
        if self.settings.runtime == "swarm":  # made and opened on the manager's host: no other node binds it
            return "encrypted volumes are made on the manager's own host, which a swarm's other nodes cannot mount"
        return self.volumes.problem() or self.keyring.problem()

    def status(self) -> dict[str, object]:
        """For ``capacity`` and the console: the mechanism, where, and why not."""
        problem = self.problem()
        return {
            "mechanism": self.volumes.mechanism if self.settings.volume_encryption != "off" else "off",
            "available": problem is None,
            "problem": problem,
            "default_size": self.settings.volume_size,
            "volumes": len(self.store.volume_keys()),
        }

    def check(self, spec: TenantSpec, was: TenantSpec | None = None) -> None:
        """Refuses an encrypted tenant this host cannot make, with the reason (add-tenant and
        update-tenant, before anything is written)."""
        if was is not None and was.encrypted and not spec.encrypted:
            raise InvalidInput(
                f"the volume of {spec.name} is encrypted and stays so: to give it a plain one, copy its data out, "
                "then remove the tenant and add it again"
            )
        if was is not None and was.encrypted and spec.volume_size != was.volume_size:
            raise InvalidInput(
                f"the encrypted volume of {spec.name} keeps the size it was made with "
                f"({format_size(self.size(was))}); add a new tenant for a larger one"
            )
        if not spec.encrypted or (was is not None and was.encrypted):
            return
        problem = self.problem()
        if problem is not None:
            raise EncryptionUnavailable(f"tenant {spec.name!r} cannot have an encrypted volume on this host: {problem}")
        self._check_room(spec)

    def size(self, spec: TenantSpec) -> int:
        return spec.volume_size or self.settings.volume_size

    def _check_room(self, spec: TenantSpec) -> None:
        where = self.settings.volumes_dir
        disk = os.statvfs(where)
        free = disk.f_bavail * disk.f_frsize
        if self.size(spec) > free:
            raise InvalidInput(
                f"No space left on device for the encrypted volume of {spec.name}: it needs "
                f"{format_size(self.size(spec))}, the disk of {where} has {format_size(free)} free; free space or "
                "give a smaller --volume-size"
            )

    # ---------------------------------------------------------------- lifecycle
    def data_path(self, tenant: str) -> Path:
        return self.volumes.data_path(tenant)

    def ready(self, spec: TenantSpec, owner: int) -> bool:
        """The tenant's volume open, made first when it has none: True when it was made now."""
        name = spec.name
        row = self.store.volume_key(name)
        if row is not None and self.volumes.exists(name):
            self.volumes.open(name, self._unwrap(row))
            return False
        if row is not None:
            raise EncryptionUnavailable(
                f"the encrypted volume of {name} is gone from {self.settings.volumes_dir} (its key is still kept): "
                "restore its image, or remove the tenant"
            )
        problem = self.problem()
        if problem is not None:
            raise EncryptionUnavailable(f"cannot make the encrypted volume of {name}: {problem}")
        if self.volumes.exists(name):  # an image whose key was never kept: made by a create cut short
            self.volumes.erase(name)
        key, volume_id, size = new_data_key(), str(uuid.uuid4()), self.size(spec)
        wrapped = self.keyring.wrap(key, self._binding(name, volume_id))
        self.volumes.create(name, size, key, volume_id, owner)
        try:
            self.store.put_volume_key(VolumeKeyRow(name, volume_id, wrapped.kek_id, wrapped.blob, size, self.clock()))
        except BaseException:
            self.volumes.erase(name)
            raise
        log.info("made the encrypted volume of %s (%s)", name, format_size(size))
        return True

    def moved(self, tenant: str) -> bool:
        """Whether a plain volume's data was copied into this (open) volume in full."""
        return (self.data_path(tenant) / MOVED).exists()

    def erase(self, tenant: str) -> None:
        """Crypto-erase: the key out of the kernel, the mount, the loop device and the image
        gone, then the wrapped key deleted for good. Idempotent."""
        if self.volumes.exists(tenant):
            self.volumes.erase(tenant)
            log.info("erased the encrypted volume of %s", tenant)
        if self.store.volume_key(tenant) is not None:
            self.store.delete_volume_key(tenant)

    def names(self) -> list[str]:
        """Tenants with an encrypted volume on this host (for orphans)."""
        return self.volumes.names()

    def rotate(self) -> list[str]:
        """Every data key rewrapped under the first key of the key file; no data is touched.
        The tenants whose key was rewrapped."""
        done = []
        current = self.keyring.current_id()
        for row in self.store.volume_keys():
            if row.kek_id == current:
                continue
            bound = self._binding(row.tenant, row.volume_id)
            new = self.keyring.rewrap(WrappedKey(row.kek_id, row.wrapped), bound, f"tenant {row.tenant}")
            self.store.put_volume_key(
                VolumeKeyRow(row.tenant, row.volume_id, new.kek_id, new.blob, row.size, row.created_at)
            )
            done.append(row.tenant)
        return done

    # ---------------------------------------------------------------- keys
    def _binding(self, tenant: str, volume_id: str) -> bytes:
        return binding(self.settings.instance, tenant, volume_id)

    def _unwrap(self, row: VolumeKeyRow) -> bytes:
        """The data key, bound to the volume's UUID as read from the image itself: a key kept
        for another volume (an image swapped in) does not unwrap."""
        on_disk = self.volumes.volume_id(row.tenant)
        if on_disk is None:
            raise EncryptionUnavailable(f"the encrypted volume of {row.tenant} is not an ext4 image any more")
        return self.keyring.unwrap(
            WrappedKey(row.kek_id, row.wrapped), self._binding(row.tenant, on_disk), f"tenant {row.tenant}"
        )
