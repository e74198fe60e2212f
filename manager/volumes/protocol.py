"""What the control plane needs of encrypted volumes (``FscryptVolumes`` is the real one; the
unit tests' in-memory one passes the same checks, ``tests/volumes_contract.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class EncryptedVolumes(Protocol):
    mechanism: str

    def problem(self) -> str | None:
        """Why this host cannot hold encrypted volumes, naming what it lacks; None: it can."""
        ...

    def exists(self, name: str) -> bool: ...
    def names(self) -> list[str]: ...
    def volume_id(self, name: str) -> str | None:
        """The UUID the volume was made with (its wrapped key is bound to it)."""
        ...

    def data_path(self, name: str) -> Path:
        """What an engine binds at /data: it exists only while the volume is open."""
        ...

    def create(self, name: str, size: int, key: bytes, volume_id: str, owner: int) -> None:
        """Makes it, all or nothing, and leaves it open."""
        ...

    def open(self, name: str, key: bytes) -> None:
        """Idempotent; VolumeRefused when ``key`` is not its key."""
        ...

    def is_open(self, name: str) -> bool: ...
    def close(self, name: str) -> None:
        """The key out of the kernel, then unmounted: ciphertext until the next open."""
        ...

    def erase(self, name: str) -> None:
        """Crypto-erase: closed, then the image removed."""
        ...
