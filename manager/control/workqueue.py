"""A per-key work queue with delays: each key is handled by one worker at a time,
a key added while queued is not duplicated, and the earliest due time wins."""

from __future__ import annotations

import heapq
import threading
import time


class WorkQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._closed = False

    def add(self, key: str, delay: float = 0.0) -> None:
        at = time.monotonic() + delay
        with self._cond:
            if key in self._due and self._due[key] <= at:
                return
            self._due[key] = at
            heapq.heappush(self._heap, (at, key))
            self._cond.notify()

    def get(self, timeout: float | None = None) -> str | None:
        """The next due key, or None when closed or when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # superseded entry
                if self._heap and self._heap[0][0] <= now:
                    _, key = heapq.heappop(self._heap)
                    del self._due[key]
                    return key
                wait = self._heap[0][0] - now if self._heap else None
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
            return None

    def pending(self) -> dict[str, float]:
        with self._cond:
            return dict(self._due)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
