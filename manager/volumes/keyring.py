"""Data keys of encrypted volumes, wrapped under the host's key-encryption keys.

Each encrypted volume has a random 64-byte data key (fscrypt's master key). The manager's state
keeps it only wrapped: AES-256-GCM under a key-encryption key (KEK), with the instance, the
tenant and the volume's UUID as associated data, so a wrapped key opens nothing but its own
volume (a row copied onto another tenant, or an image swapped in, fails to unwrap).

The KEKs come from a file that is not on the state volume: a Docker secret, or a path on tmpfs
(``GTM_VOLUME_KEY_FILE``). One key per line, base64 of 32 random bytes; ``#`` starts a comment.
The first key wraps; every key listed unwraps, so rotating is: put a new key first, run
``rotate-volume-key`` (every data key is rewrapped, no data is touched), then drop the old line.
The file is read at each use, so an edit needs no restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from manager.errors import EncryptionUnavailable

DATA_KEY_BYTES = 64
KEK_BYTES = 32
NONCE_BYTES = 12
VERSION = b"gtm-volume-key/1"


class KeyUnavailable(EncryptionUnavailable):
    """No key-encryption key, an unreadable key file, or a wrapped key none of them opens."""


@dataclass(frozen=True)
class WrappedKey:
    kek_id: str
    """Which key-encryption key wrapped it (``kek_id``)."""
    blob: bytes
    """Nonce, then the ciphertext and its tag."""


def kek_id(kek: bytes) -> str:
    """A key-encryption key's name: not secret, it only says which line of the file it is."""
    return hashlib.sha256(b"gtm-kek-id\0" + kek).hexdigest()[:12]


def new_data_key() -> bytes:
    return secrets.token_bytes(DATA_KEY_BYTES)


def new_kek_line() -> str:
    """A new key-encryption key as a line of the key file."""
    return base64.b64encode(secrets.token_bytes(KEK_BYTES)).decode()


def binding(instance: str, tenant: str, volume_id: str) -> bytes:
    """The associated data a wrapped key is bound to."""
    return b"\0".join((VERSION, instance.encode(), tenant.encode(), volume_id.encode()))


def parse_keys(text: str, where: str) -> list[bytes]:
    """The keys of a key file's text, in order; KeyUnavailable naming the line that is wrong."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            raw = base64.b64decode(line, validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != KEK_BYTES:
            raise KeyUnavailable(
                f"line {number} of the volume key file {where} is not a key: each line is base64 of {KEK_BYTES} "
                "random bytes (head -c 32 /dev/urandom | base64)"
            )
        keys.append(raw)
    return keys


class Keyring:
    """The host's key-encryption keys, read from ``path`` at each use."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def problem(self) -> str | None:
        """Why no key can be wrapped here; None when the first key is there."""
        try:
            self.keys()
        except KeyUnavailable as exc:
            return exc.message
        return None

    def keys(self) -> list[bytes]:
        if self.path is None:
            raise KeyUnavailable(
                "no volume key file is set (GTM_VOLUME_KEY_FILE): give one as a Docker secret or on tmpfs, "
                "never on the state volume"
            )
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            raise KeyUnavailable(
                f"the volume key file {self.path} does not exist: give the host's key-encryption key there as a "
                "Docker secret (scripts/up.sh makes one)"
            ) from None
        except OSError as exc:
            raise KeyUnavailable(f"cannot read the volume key file {self.path}: {exc.strerror}") from None
        keys = parse_keys(text, str(self.path))
        if not keys:
            raise KeyUnavailable(f"the volume key file {self.path} holds no key")
        return keys

    def current_id(self) -> str:
        return kek_id(self.keys()[0])

    def wrap(self, data_key: bytes, bound: bytes) -> WrappedKey:
        kek = self.keys()[0]
        nonce = os.urandom(NONCE_BYTES)
        return WrappedKey(kek_id(kek), nonce + AESGCM(kek).encrypt(nonce, data_key, bound))

    def unwrap(self, wrapped: WrappedKey, bound: bytes, what: str) -> bytes:
        """The data key; KeyUnavailable when its key-encryption key is not in the file, or when
        it was not wrapped for ``bound`` (another tenant's or another volume's key)."""
        by_id = {kek_id(k): k for k in self.keys()}
        kek = by_id.get(wrapped.kek_id)
        if kek is None:
            raise KeyUnavailable(
                f"the key of {what} was wrapped under key-encryption key {wrapped.kek_id}, which the volume key "
                f"file no longer holds (it holds {', '.join(by_id)}); put that key back in the file"
            )
        nonce, sealed = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        try:
            return AESGCM(kek).decrypt(nonce, sealed, bound)
        except InvalidTag:
            raise KeyUnavailable(
                f"the wrapped key stored for {what} does not belong to it (another tenant's or another volume's "
                "key, or a changed image): it is refused"
            ) from None

    def rewrap(self, wrapped: WrappedKey, bound: bytes, what: str) -> WrappedKey:
        """The same data key, wrapped under the first key of the file."""
        return self.wrap(self.unwrap(wrapped, bound, what), bound)
