"""Wrapping encrypted volumes' data keys under the host's key-encryption keys
(``manager.volumes.keyring``): bound to tenant and volume, rotated without touching data."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager.errors import EncryptionUnavailable
from manager.volumes.keyring import Keyring, KeyUnavailable, binding, kek_id, new_data_key, new_kek_line


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "volume-keys"
    path.write_text(f"# the host's key\n{new_kek_line()}\n")
    return path


def test_a_wrapped_key_unwraps_only_for_its_own_tenant_and_volume(key_file: Path) -> None:
    ring, key = Keyring(key_file), new_data_key()
    wrapped = ring.wrap(key, binding("gtm", "companya", "v-1"))
    assert key not in wrapped.blob and len(key) == 64
    assert ring.unwrap(wrapped, binding("gtm", "companya", "v-1"), "companya") == key
    for other in (
        binding("gtm", "companyb", "v-1"),
        binding("gtm", "companya", "v-2"),
        binding("x", "companya", "v-1"),
    ):
        with pytest.raises(KeyUnavailable, match="does not belong to it"):
            ring.unwrap(wrapped, other, "companya")


def test_two_wraps_of_one_key_differ(key_file: Path) -> None:
    ring, key, bound = Keyring(key_file), new_data_key(), binding("gtm", "a", "v")
    assert ring.wrap(key, bound).blob != ring.wrap(key, bound).blob  # a fresh nonce each time


def test_rotation_rewraps_under_the_first_key_and_the_old_line_can_go(key_file: Path) -> None:
    ring, key, bound = Keyring(key_file), new_data_key(), binding("gtm", "a", "v")
    old = ring.wrap(key, bound)
    new_line = new_kek_line()
    key_file.write_text(new_line + "\n" + key_file.read_text())
    new = ring.rewrap(old, bound, "a")
    assert new.kek_id != old.kek_id and new.kek_id == ring.current_id()
    key_file.write_text(new_line + "\n")
    assert ring.unwrap(new, bound, "a") == key
    with pytest.raises(KeyUnavailable, match=f"wrapped under key-encryption key {old.kek_id}.*put that key back"):
        ring.unwrap(old, bound, "a")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (None, "does not exist: give the host's key-encryption key there as a Docker secret"),
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        ("c2hvcnQ=\n", "line 1 of the volume key file .* is not a key: each line is base64 of 32 random bytes"),
        ("not base64 at all!\n", "line 1 .* is not a key"),
    ],
)
def test_a_missing_or_wrong_key_file_is_refused_with_what_to_do(tmp_path: Path, text: str | None, error: str) -> None:
    path = tmp_path / "keys"
    if text is not None:
        path.write_text(text)
    ring = Keyring(path)
    assert ring.problem() is not None
    with pytest.raises(EncryptionUnavailable, match=error):
        ring.wrap(new_data_key(), b"x")


def test_no_key_file_set_says_where_it_must_come_from() -> None:
    assert "GTM_VOLUME_KEY_FILE" in (Keyring(None).problem() or "")


def test_a_keys_id_names_it_without_telling_it(key_file: Path) -> None:
    ring = Keyring(key_file)
    kek = ring.keys()[0]
    assert ring.current_id() == kek_id(kek) and len(ring.current_id()) == 12 and ring.current_id() not in kek.hex()
