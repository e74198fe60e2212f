"""The page-cache warm-up before a model's first engine (cpu mode): vLLM's CPU backend counts the
page cache it reads as used memory, so the engine image's packages and the model are read once
beforehand (see ``plan.warmup_plan``). It runs on a thread of its own: a cold 7B model takes tens
of seconds, and the reconciler's worker keeps pushing keys and limits to every gateway meanwhile."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from manager.control.plan import warmup_plan
from manager.runtime.protocol import Runtime
from manager.settings import Settings

log = logging.getLogger(__name__)
WARMUP_TIMEOUT_S = 300.0
WARMUP_WAIT_S = 1.0
"""How long the worker waits for a warm-up it has just begun before it moves on to other tenants'
turns (later turns only look whether it has ended)."""


class PageCacheWarmer:
    """Once per manager process, model and node (and again after a start failed for a cold cache)."""

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings, self.runtime = settings, runtime
        self._warmed: set[tuple[str, str, str]] = set()
        self.warming: dict[tuple[str, str, str], threading.Thread] = {}
        """The warm-ups running, by (engine image, model, swarm node ('' on one host))."""
        self._then: dict[tuple[str, str, str], list[Callable[[], None]]] = {}
        """What to call when a running warm-up ends (the worker queues its tenant again)."""
        self._ended: set[tuple[str, str, str]] = set()
        """Warm-ups whose thread has ended, until ``ready`` sees it."""
        self._lock = threading.Lock()

    def ready(self, model: str, node: str = "", then: Callable[[], None] | None = None) -> bool:
        """True once the model's warm-up (on ``node``) has ended (also when it failed: that never
        blocks a start); False while it runs (the first call begins it), and ``then`` is called
        when it ends."""
        key = (self.settings.engine_image, model, node)
        if key in self._warmed:
            return True
        with self._lock:
            thread = self.warming.get(key)
            begun = thread is None
            if thread is None:
                thread = threading.Thread(target=self._run, args=key, name=f"warm-up-{model}", daemon=True)
                self.warming[key] = thread
                thread.start()
        if begun:
            thread.join(WARMUP_WAIT_S)  # an already warm cache ends within this: no extra round on the queue
        with self._lock:
            if key not in self._ended:
                if then is not None:
                    self._then.setdefault(key, []).append(then)
                return False
            self._ended.discard(key)
            del self.warming[key]
        self._warmed.add(key)
        return True

    def forget(self, model: str) -> None:
        """An engine of this model met a cold cache: warm it again (on every node) before the next start."""
        self._warmed = {key for key in self._warmed if key[:2] != (self.settings.engine_image, model)}

    def _run(self, image: str, model: str, node: str) -> None:
        try:
            self._warm_up(model, node)
        finally:
            with self._lock:
                self._ended.add((image, model, node))
                waiting = self._then.pop((image, model, node), [])
            for then in waiting:
                then()

    def _warm_up(self, model: str, node: str) -> None:
        started = time.monotonic()
        try:
            code, out = self.runtime.run_to_completion(warmup_plan(self.settings, model, node), WARMUP_TIMEOUT_S)
        except Exception as exc:  # never blocks a start: at worst the engine meets a cold cache once
            log.warning("page-cache warm-up for %s failed: %r", model, exc)
            return
        if code == 0:
            log.info("page cache warmed for %s in %.1f s: %s", model, time.monotonic() - started, out.strip())
        else:  # at worst the engine meets a cold cache, fails once and is retried
            log.warning("page-cache warm-up for %s failed (exit %d): %s", model, code, out.strip()[-300:])
