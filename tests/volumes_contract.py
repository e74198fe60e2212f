"""The promises of the ``EncryptedVolumes`` protocol, as one set of tests.

``tests/unit/test_vault.py`` runs them against the in-memory ``MemoryVolumes`` and
``tests/integration/test_encrypted_volumes.py`` against ``FscryptVolumes`` on the kernel: a
subclass provides the ``volumes`` fixture.
"""

from __future__ import annotations

import os
import uuid

import pytest

from manager.errors import EncryptionUnavailable
from manager.volumes.protocol import EncryptedVolumes

SIZE = 64 * 1024**2
OWNER = 1000


class VolumesContract:
    def test_a_new_volume_is_open_and_holds_what_is_written(self, volumes: EncryptedVolumes) -> None:
        key, vid = os.urandom(64), str(uuid.uuid4())
        volumes.create("t1", SIZE, key, vid, OWNER)
        assert volumes.exists("t1") and volumes.is_open("t1") and "t1" in volumes.names()
        assert volumes.volume_id("t1") == vid
        if os.geteuid() == 0:
            assert os.stat(volumes.data_path("t1")).st_uid == OWNER
        (volumes.data_path("t1") / "note").write_text("kept")
        volumes.close("t1")
        assert not volumes.is_open("t1") and volumes.exists("t1")
        volumes.open("t1", key)
        volumes.open("t1", key)  # idempotent
        assert (volumes.data_path("t1") / "note").read_text() == "kept"

    def test_a_closed_volume_has_no_data_path(self, volumes: EncryptedVolumes) -> None:
        volumes.create("t2", SIZE, os.urandom(64), str(uuid.uuid4()), OWNER)
        volumes.close("t2")
        volumes.close("t2")  # idempotent
        assert not volumes.data_path("t2").exists()

    def test_another_key_does_not_open_it(self, volumes: EncryptedVolumes) -> None:
        volumes.create("t3", SIZE, os.urandom(64), str(uuid.uuid4()), OWNER)
        volumes.close("t3")
        with pytest.raises(EncryptionUnavailable, match="does not open its volume"):
            volumes.open("t3", os.urandom(64))
        assert not volumes.is_open("t3")

    def test_erase_leaves_nothing_and_is_idempotent(self, volumes: EncryptedVolumes) -> None:
        volumes.create("t4", SIZE, os.urandom(64), str(uuid.uuid4()), OWNER)
        volumes.erase("t4")
        volumes.erase("t4")
        assert not volumes.exists("t4") and "t4" not in volumes.names()
        assert not volumes.data_path("t4").exists() and volumes.volume_id("t4") is None
        with pytest.raises(EncryptionUnavailable, match="no image"):
            volumes.open("t4", os.urandom(64))

    def test_a_volume_is_made_once(self, volumes: EncryptedVolumes) -> None:
        volumes.create("t5", SIZE, os.urandom(64), str(uuid.uuid4()), OWNER)
        with pytest.raises(EncryptionUnavailable, match="exists already"):
            volumes.create("t5", SIZE, os.urandom(64), str(uuid.uuid4()), OWNER)
