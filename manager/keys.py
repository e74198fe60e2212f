"""API keys: ``<prefix>_<id>_<secret>``, stored as SHA-256 only, compared in constant time.

The id is public (logs, audit, console show it); the secret is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX = "gtm"


@dataclass(frozen=True)
class IssuedKey:
    id: str
    secret_key: str
    hash: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def issue(prefix: str = PREFIX) -> IssuedKey:
    key_id = secrets.token_hex(4)
    key = f"{prefix}_{key_id}_{secrets.token_urlsafe(32)}"
    return IssuedKey(key_id, key, hash_key(key))


def key_id(key: str) -> str | None:
    """The id part of a presented key, or None if it is not shaped like one of ours."""
    parts = key.split("_", 2)
    if len(parts) != 3 or not all(parts):
        return None
    return parts[1]


def matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), stored_hash)
