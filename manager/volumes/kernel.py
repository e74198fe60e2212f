"""The kernel calls an encrypted volume is made of: loop devices, ext4 mounts and ext4's native
encryption (fscrypt), through their ioctls and syscalls. No binary is needed but ``mkfs.ext4``:
the manager's image has no ``losetup`` or ``mount``, and a container sees no ``/dev/loopN`` node
made after it started, so one is made here when missing.

References: ``include/uapi/linux/loop.h``, ``include/uapi/linux/fscrypt.h`` and
``Documentation/filesystems/fscrypt.rst`` of the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

# ---------------------------------------------------------------- loop devices
LOOP_MAJOR = 7
LOOP_CONTROL = "/dev/loop-control"
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LOOP_INFO64 = 232
LO_FLAGS_AT = 52
"""``struct loop_info64``: five u64 then lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags."""


def _loop_node(number: int) -> str:
    """``/dev/loopN``, made when this mount namespace has no node for it (a container's /dev
    holds only the devices that existed when it started)."""
    path = f"/dev/loop{number}"
    if not os.path.exists(path):
        with contextlib.suppress(FileExistsError):
            os.mknod(path, stat.S_IFBLK | 0o660, os.makedev(LOOP_MAJOR, number))
    return path


def loop_attach(image: Path) -> tuple[str, int]:
    """Attaches ``image`` to a free loop device: its path and an open descriptor, which the
    caller closes once the device is mounted (``loop_autoclear`` before that)."""
    for _ in range(8):  # another program may take the free device between asking and attaching
        with open(LOOP_CONTROL, "rb") as ctl:
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
        dev = _loop_node(number)
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, LOOP_SET_FD, backing)
            return dev, fd
        except OSError as exc:
            os.close(fd)
            if exc.errno != errno.EBUSY:
                raise
        finally:
            os.close(backing)
    raise OSError(errno.EBUSY, "every free loop device was taken by another program while attaching")


def loop_autoclear(fd: int) -> None:
    """The device lets go of its image when its last user (the mount) closes it."""
    info = bytearray(LOOP_INFO64)
    fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
    (flags,) = struct.unpack_from("<I", info, LO_FLAGS_AT)
    struct.pack_into("<I", info, LO_FLAGS_AT, flags | LO_FLAGS_AUTOCLEAR)
    fcntl.ioctl(fd, LOOP_SET_STATUS64, bytes(info))


def loop_devices_of(image: Path) -> list[str]:
    """The loop devices the image is attached to, matched by the backing file's device and inode
    (``LOOP_GET_STATUS64``): the path ``backing_file`` shows depends on the mount namespace that
    attached it."""
    try:
        st = os.stat(image)
    except FileNotFoundError:
        return []
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        if not (entry / "loop" / "backing_file").exists():
            continue  # not attached
        dev = _loop_node(int(entry.name.removeprefix("loop")))
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = bytearray(LOOP_INFO64)
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        except OSError:
            continue
        finally:
            os.close(fd)
        device, inode = struct.unpack_from("<QQ", info, 0)
        major, minor = (device >> 8) & 0xFFF, (device & 0xFF) | ((device >> 12) & 0xFFF00)
        if inode == st.st_ino and (major, minor) == (os.major(st.st_dev), os.minor(st.st_dev)):
            found.append(dev)
    return found


def loop_detach(dev: str) -> None:
    """Detaches a loop device (nothing when it is detached already)."""
    number = int(dev.removeprefix("/dev/loop"))
    fd = os.open(_loop_node(number), os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------- mounts
MS_NOSUID = 2
MS_NODEV = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount_ext4(dev: str, target: Path) -> None:
    """Mounts the ext4 filesystem on ``dev`` at ``target`` (no device nodes, no setuid)."""
    rc = _libc.mount(dev.encode(), str(target).encode(), b"ext4", MS_NOSUID | MS_NODEV, None)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mount {dev} on {target}: {os.strerror(code)}")


def unmount(target: Path) -> None:
    rc = _libc.umount2(str(target).encode(), 0)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"umount {target}: {os.strerror(code)}")


def _mounts() -> Iterator[tuple[str, str, str]]:
    """Every mount of this namespace, in /proc/self/mountinfo's order: its mount point, its
    source and its optional fields (``shared:N``, ``master:N``)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields = before.split()
        yield fields[4], after.split()[1], " ".join(fields[6:])


def mount_of(target: Path) -> tuple[str, str] | None:
    """The source and propagation of the mount at exactly ``target`` (the last one stacked
    there); None when nothing is mounted there."""
    want = os.path.realpath(target)
    found = None
    for point, source, tags in _mounts():
        if point == want:
            found = (source, tags)
    return found


def propagation_of(path: Path) -> str:
    """The optional fields (``shared:N``, ``master:N``) of the mount that holds ``path``."""
    want = os.path.realpath(path)
    best, found = "", ""
    for point, _, tags in _mounts():
        inside = want == point or want.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, found = point, tags
    return found


# ---------------------------------------------------------------- fscrypt
FS_IOC_SET_ENCRYPTION_POLICY = 0x800C6613
FS_IOC_GET_ENCRYPTION_POLICY_EX = 0xC0096616
FS_IOC_ADD_ENCRYPTION_KEY = 0xC0506617
FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS = 0xC0406619
FS_IOC_GET_ENCRYPTION_KEY_STATUS = 0xC080661A
KEY_SPEC_TYPE_IDENTIFIER = 2
POLICY_V2 = 2
MODE_AES_256_XTS = 1
MODE_AES_256_CTS = 4
POLICY_FLAGS_PAD_32 = 0x03
KEY_SIZE = 64
"""A v2 master key: 64 bytes, what AES-256-XTS's two keys need."""
KEY_STATUS_ABSENT = 1
KEY_STATUS_PRESENT = 2
KEY_STATUS_INCOMPLETELY_REMOVED = 3
REMOVAL_FILES_BUSY = 0x1


def _key_spec(identifier: bytes = b"") -> bytes:
    """``struct fscrypt_key_specifier``: type, reserved, then a 32-byte union (the identifier)."""
    return struct.pack("<II32s", KEY_SPEC_TYPE_IDENTIFIER, 0, identifier)


def ext4_encryption() -> bool:
    """Whether this kernel's ext4 can encrypt (CONFIG_FS_ENCRYPTION)."""
    return Path("/sys/fs/ext4/features/encryption").exists()


def add_key(mountpoint: Path, raw: bytes) -> bytes:
    """Adds a v2 master key to the filesystem's keyring; its 16-byte identifier, which the kernel
    derives from the key itself (so a wrong key gives another identifier)."""
    arg = bytearray(_key_spec() + struct.pack("<II32x", len(raw), 0) + raw)
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, arg)
    finally:
        os.close(fd)
        arg[80:] = bytes(len(raw))  # the key is not left in this buffer
    return bytes(arg[8:24])


def remove_key(mountpoint: Path, identifier: bytes) -> int:
    """Removes the key for every user; the kernel's removal flags (``REMOVAL_FILES_BUSY``: files
    still open keep their contents readable until closed). Nothing when it is not there."""
    arg = bytearray(_key_spec(identifier) + bytes(24))
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS, arg)
    except OSError as exc:
        if exc.errno != errno.ENOKEY:
            raise
        return 0
    finally:
        os.close(fd)
    (flags,) = struct.unpack_from("<I", arg, 40)
    return int(flags)


def key_status(mountpoint: Path, identifier: bytes) -> int:
    """``KEY_STATUS_ABSENT``, ``_PRESENT`` or ``_INCOMPLETELY_REMOVED``."""
    arg = bytearray(_key_spec(identifier) + bytes(128 - 40))
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, arg)
    finally:
        os.close(fd)
    (status,) = struct.unpack_from("<I", arg, 64)
    return int(status)


def set_policy(directory: Path, identifier: bytes) -> None:
    """Encrypts an empty directory (and all that is made in it) under the key ``identifier``:
    AES-256-XTS contents, AES-256-CTS names, names padded to 32 bytes."""
    policy = struct.pack("<BBBB4x16s", POLICY_V2, MODE_AES_256_XTS, MODE_AES_256_CTS, POLICY_FLAGS_PAD_32, identifier)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, policy)
    finally:
        os.close(fd)


def policy_identifier(directory: Path) -> bytes | None:
    """The key identifier of a directory's v2 policy; None when it is not encrypted."""
    arg = bytearray(struct.pack("<Q", 24) + bytes(24))  # policy_size, then the policy
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, arg)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTTY, errno.EOPNOTSUPP):
            return None
        raise
    finally:
        os.close(fd)
    if arg[8] != POLICY_V2:
        return None
    return bytes(arg[16:32])


# ---------------------------------------------------------------- ext4 superblock
EXT4_MAGIC = 0xEF53


def ext4_uuid(image: Path) -> str | None:
    """The filesystem UUID in an ext4 image's superblock (None: not an ext4 image)."""
    try:
        with open(image, "rb") as f:
            f.seek(1024)
            block = f.read(0x78)
    except OSError:
        return None
    if len(block) < 0x78 or struct.unpack_from("<H", block, 0x38)[0] != EXT4_MAGIC:
        return None
    raw = block[0x68:0x78].hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"
