"""Fakes for the unit tests' seams (the runtime's fake is ``manager.runtime.memory``)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from manager.contract import GatewayActivity, GatewayConfig, UsagePage, UsageRecord
from manager.errors import EncryptionUnavailable


class FakeGateway:
    """Every gateway's admin port: the config each one holds, and usage records to hand out."""

    def __init__(self) -> None:
        self.configs: dict[str, GatewayConfig] = {}
        self.records: dict[str, list[tuple[int, UsageRecord]]] = {}
        self.connected: list[str] = []
        self.activities: dict[str, GatewayActivity] = {}
        """What each gateway serves now (by token); idle since it started unless a test says otherwise."""
        self.sleeping: dict[str, bool] = {}
        """Whether each gateway's engine sleeps in place (vLLM's sleep mode), by token."""
        self.on_sleep: Callable[[str, bool], None] = lambda token, asleep: None
        """Called as an engine falls asleep (True) or wakes (False): a simulated GPU frees or takes memory."""

    def __call__(self, ip: str, token: str) -> FakeGateway._Session:
        self.connected.append(token)
        return FakeGateway._Session(self, token)

    class _Session:
        def __init__(self, owner: FakeGateway, token: str) -> None:
            self.owner, self.token = owner, token

        def __enter__(self) -> FakeGateway._Session:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def version(self) -> str:
            config = self.owner.configs.get(self.token)
            return config.version if config else ""

        def push(self, config: GatewayConfig) -> None:
            self.owner.configs[self.token] = config

        def usage(self, after: int, limit: int = 1000) -> UsagePage:
            page = [(seq, r) for seq, r in self.owner.records.get(self.token, []) if seq > after][:limit]
            return UsagePage(records=[r for _, r in page], cursor=page[-1][0] if page else after)

        def activity(self) -> GatewayActivity:
            held = self.owner.configs.get(self.token)
            found = self.owner.activities.get(self.token)
            base = found or GatewayActivity(last_request_at=None, in_flight=0, waiting=0, hold=False)
            return base.model_copy(update={"hold": bool(held and held.hold)})

        def engine_sleeping(self) -> bool:
            return self.owner.sleeping.get(self.token, False)

        def engine_sleep(self) -> bool:
            self.owner.on_sleep(self.token, True)
            self.owner.sleeping[self.token] = True
            return True

        def engine_wake(self) -> bool:
            self.owner.on_sleep(self.token, False)
            self.owner.sleeping[self.token] = False
            return False


def usage_record(request_id: str, key_id: str = "k", member: str = "", **fields: object) -> UsageRecord:
    """A usage record as a gateway writes it: a 200 for /v1/completions unless ``fields`` say otherwise."""
    values: dict[str, object] = dict(
        model="demo",
        path="/v1/completions",
        prompt_tokens=1,
        completion_tokens=2,
        status=200,
        outcome="ok",
        latency_ms=1.0,
        at=1.0,
    )
    return UsageRecord.model_validate(
        {**values, **fields, "request_id": request_id, "key_id": key_id, "member": member}
    )


class MemoryVolumes:
    """``EncryptedVolumes`` in a plain directory (tests only; ``tests/volumes_contract.py``): a
    volume's data directory exists only while it is open, and only its own key opens it."""

    mechanism = "memory"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lacks: str | None = None
        """What ``problem`` answers."""
        self._volumes: dict[str, tuple[bytes, str]] = {}
        self._open: set[str] = set()
        self._kept: dict[str, Path] = {}

    def problem(self) -> str | None:
        return self.lacks

    def exists(self, name: str) -> bool:
        return name in self._volumes

    def names(self) -> list[str]:
        return sorted(self._volumes)

    def volume_id(self, name: str) -> str | None:
        return self._volumes[name][1] if name in self._volumes else None

    def data_path(self, name: str) -> Path:
        return self.root / name / "data"

    def create(self, name: str, size: int, key: bytes, volume_id: str, owner: int) -> None:
        if name in self._volumes:
            raise EncryptionUnavailable(f"the encrypted volume {name} exists already")
        self._volumes[name] = (hashlib.sha256(key).digest(), volume_id)
        self._kept[name] = self.root / f".{name}.kept"
        self._kept[name].mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(self._kept[name], owner, owner)
        self._mount(name)

    def open(self, name: str, key: bytes) -> None:
        if name not in self._volumes:
            raise EncryptionUnavailable(f"the encrypted volume {name} has no image; it was removed")
        if hashlib.sha256(key).digest() != self._volumes[name][0]:
            raise EncryptionUnavailable(f"the key given for {name} does not open its volume")
        if name not in self._open:
            self._mount(name)

    def is_open(self, name: str) -> bool:
        return name in self._open

    def close(self, name: str) -> None:
        if name in self._open:
            self.data_path(name).rename(self._kept[name])
            self._open.discard(name)

    def erase(self, name: str) -> None:
        self.close(name)
        if name in self._volumes:
            shutil.rmtree(self._kept.pop(name))
            del self._volumes[name]

    def _mount(self, name: str) -> None:
        self.data_path(name).parent.mkdir(parents=True, exist_ok=True)
        self._kept[name].rename(self.data_path(name))
        self._open.add(name)
