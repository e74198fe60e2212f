"""Encrypted tenant volumes on ext4's native encryption (fscrypt), one image file per tenant.

Under the volumes directory (``GTM_VOLUMES_DIR``, the same path on the host and in the manager),
in a folder per instance (``root``):

- ``<name>.img``: the ext4 image, its size reserved in full when it is made (``posix_fallocate``;
  ``mkfs`` without discard), so a full disk fails the creation and never a later write;
- ``<name>/``: where the image is mounted, through a loop device;
- ``<name>/data``: the encrypted directory, bound into the engine at ``/data`` (the root of a
  filesystem cannot be encrypted). It exists only inside the mounted image: Docker refuses to
  start an engine whose volume is closed (its bind source is missing), so nothing is ever written
  in plaintext underneath.

The key is a tenant's 64-byte data key, given by the caller for each call and never stored here;
the kernel holds it in the filesystem's keyring while the volume is open. The mount reaches the
host's (and so Docker's) mount namespace through the directory's shared propagation.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

from manager.errors import EncryptionUnavailable, RuntimeUnavailable
from manager.volumes import kernel

DATA = "data"
MKFS_TIMEOUT_S = 120


def data_path(root: Path, name: str) -> Path:
    """The encrypted directory of volume ``name`` under ``root``."""
    return root / name / DATA


class FscryptVolumes:
    """Encrypted volumes as loop-mounted ext4 images with a v2 fscrypt policy."""

    mechanism = "fscrypt"

    def __init__(self, root: Path, require_shared: bool = True) -> None:
        self.root = root
        """``GTM_VOLUMES_DIR/<instance>``: volumes are named by their tenant."""
        self.require_shared = require_shared
        """The volumes directory must be a shared mount (False: only where nothing but this
        process uses the volumes, as the protocol's own tests)."""

    # ---------------------------------------------------------------- paths
    def image(self, name: str) -> Path:
        return self.root / f"{name}.img"

    def mountpoint(self, name: str) -> Path:
        return self.root / name

    def data_path(self, name: str) -> Path:
        """What the engine mounts at /data (it exists only while the volume is mounted)."""
        return data_path(self.root, name)

    def exists(self, name: str) -> bool:
        return self.image(name).exists()

    def names(self) -> list[str]:
        """Every volume with an image here."""
        return sorted(p.name.removesuffix(".img") for p in self.root.glob("*.img")) if self.root.is_dir() else []

    def volume_id(self, name: str) -> str | None:
        """The image's filesystem UUID, which its wrapped key is bound to."""
        return kernel.ext4_uuid(self.image(name))

    # ---------------------------------------------------------------- can this host do it
    def problem(self) -> str | None:
        """Why this host cannot hold encrypted volumes, naming what it lacks; None: it can."""
        if not kernel.ext4_encryption():
            luks = (
                " (it has device-mapper, but LUKS2 volumes are not built into the manager)"
                if Path("/dev/mapper/control").exists()
                else ""
            )
            return (
                "this kernel's ext4 cannot encrypt (no /sys/fs/ext4/features/encryption: CONFIG_FS_ENCRYPTION "
                f"is off){luks}; use a kernel with it"
            )
        if not Path(kernel.LOOP_CONTROL).exists():
            return (
                f"no {kernel.LOOP_CONTROL}: the kernel has no loop devices, or the manager's container was "
                "started without the device (compose/docker-compose.encrypted.yml gives it)"
            )
        if shutil.which("mkfs.ext4") is None:
            return "mkfs.ext4 is missing (Debian's e2fsprogs)"
        if not self.root.parent.is_dir():
            return f"the volumes directory {self.root.parent} does not exist (GTM_VOLUMES_DIR; scripts/up.sh makes it)"
        if self.require_shared and "shared:" not in kernel.propagation_of(self.root.parent):
            return (
                f"{self.root.parent} is not a shared mount, so a volume the manager opens might not reach Docker "
                "and the engines: make it one on the host (scripts/volumes-host.sh: mount --bind DIR DIR && "
                "mount --make-shared DIR) and bind it into the manager's container with propagation rshared "
                "(compose/docker-compose.encrypted.yml)"
            )
        try:
            with open(kernel.LOOP_CONTROL, "rb"):
                pass
        except OSError as exc:
            return (
                f"cannot open {kernel.LOOP_CONTROL} ({exc.strerror}): the manager needs CAP_SYS_ADMIN and the "
                "device-cgroup rule 'b 7:* rwm' (compose/docker-compose.encrypted.yml)"
            )
        return None

    # ---------------------------------------------------------------- lifecycle
    def create(self, name: str, size: int, key: bytes, volume_id: str, owner: int) -> None:
        """Makes the image (its size reserved), its filesystem with ``volume_id`` as UUID, and
        the encrypted data directory owned by ``owner``, and leaves it open. All or nothing: a
        failure removes whatever was made."""
        image = self.image(name)
        if image.exists():
            raise EncryptionUnavailable(f"the encrypted volume {name} exists already ({image})")
        try:
            self._allocate(image, size)
            self._mkfs(image, volume_id)
            self._mount(name)
            data = self.data_path(name)
            data.mkdir(mode=0o700)
            identifier = kernel.add_key(self.mountpoint(name), key)
            kernel.set_policy(data, identifier)
            os.chown(data, owner, owner)
        except BaseException:
            with contextlib.suppress(Exception):
                self.erase(name)
            raise

    def open(self, name: str, key: bytes) -> None:
        """Attaches and mounts the image when it is not, and adds its key when it is absent,
        checking that the key is this volume's: idempotent."""
        image = self.image(name)
        if not image.exists():
            raise EncryptionUnavailable(f"the encrypted volume {name} has no image ({image}); it was removed")
        if kernel.mount_of(self.mountpoint(name)) is None:
            self._mount(name)
        data = self.data_path(name)
        expected = kernel.policy_identifier(data) if data.is_dir() else None
        if expected is None:
            raise EncryptionUnavailable(
                f"{image} holds no encrypted data directory; it is not a volume this manager made"
            )
        mountpoint = self.mountpoint(name)
        if kernel.key_status(mountpoint, expected) == kernel.KEY_STATUS_PRESENT:
            return
        added = kernel.add_key(mountpoint, key)
        if added != expected:
            kernel.remove_key(mountpoint, added)
            raise EncryptionUnavailable(
                f"the key given for {name} does not open its volume (key {added.hex()[:12]}, "
                f"the volume wants {expected.hex()[:12]})"
            )

    def is_open(self, name: str) -> bool:
        data = self.data_path(name)
        if kernel.mount_of(self.mountpoint(name)) is None or not data.is_dir():
            return False
        identifier = kernel.policy_identifier(data)
        return (
            identifier is not None and kernel.key_status(self.mountpoint(name), identifier) == kernel.KEY_STATUS_PRESENT
        )

    def close(self, name: str) -> None:
        """Removes the key, then the mount and the loop device: the data reads as ciphertext
        until the next ``open``. Raises when something still holds the volume (nothing closed)."""
        mountpoint = self.mountpoint(name)
        if kernel.mount_of(mountpoint) is not None:
            data = self.data_path(name)
            identifier = kernel.policy_identifier(data) if data.is_dir() else None
            if identifier is not None:
                flags = kernel.remove_key(mountpoint, identifier)
                if flags & kernel.REMOVAL_FILES_BUSY:
                    raise EncryptionUnavailable(
                        f"the encrypted volume {name} is still in use (files open in {data}): its key is removed, "
                        "but what those files hold stays readable until they close; stop what uses it"
                    )
            try:
                kernel.unmount(mountpoint)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise EncryptionUnavailable(
                        f"the encrypted volume {name} is still in use ({mountpoint} is busy); stop what uses it"
                    ) from None
                raise
        for dev in kernel.loop_devices_of(self.image(name)):
            kernel.loop_detach(dev)

    def erase(self, name: str) -> None:
        """Crypto-erase: the key out of the kernel (its identifier is read from the volume), then
        the mount, the loop device and the image."""
        self.close(name)
        self.image(name).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.mountpoint(name).rmdir()

    # ---------------------------------------------------------------- steps
    @staticmethod
    def _allocate(image: Path, size: int) -> None:
        image.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(image, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise EncryptionUnavailable(
                    f"No space left on device: the host's disk cannot hold an encrypted volume of {size} bytes "
                    f"in {image.parent}; free space, or ask for a smaller --volume-size"
                ) from None
            raise
        finally:
            os.close(fd)

    @staticmethod
    def _mkfs(image: Path, volume_id: str) -> None:
        # no discard: the blocks fallocate reserved stay the image's; no reserved blocks for root
        argv = ["mkfs.ext4", "-q", "-F", "-O", "encrypt", "-E", "nodiscard", "-m", "0", "-U", volume_id, str(image)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=MKFS_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeUnavailable(f"mkfs.ext4 failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")

    def _mount(self, name: str) -> None:
        mountpoint = self.mountpoint(name)
        mountpoint.mkdir(mode=0o755, exist_ok=True)
        try:
            dev, fd = kernel.loop_attach(self.image(name))
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOSPC, errno.EBUSY, errno.ENXIO):
                raise EncryptionUnavailable(
                    f"no free loop device for the encrypted volume {name} ({exc.strerror}); "
                    "detach unused ones (losetup -D) or allow more (max_loop)"
                ) from None
            raise
        try:
            kernel.mount_ext4(dev, mountpoint)
            kernel.loop_autoclear(fd)
        except BaseException:
            os.close(fd)
            kernel.loop_detach(dev)
            raise
        os.close(fd)
