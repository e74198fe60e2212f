"""Requests held while the tenant sleeps or wakes: they wait at the gateway, first come first
released, until the manager pushes a config without ``hold`` (its engine serves again).

A held request is not yet admitted: no quota counts it until it is served. The queue is bounded
(``max_waiting``) and each request waits at most ``timeout_s``; the proxy answers the others with
a 503 that says the tenant is waking. When the manager says the tenant cannot wake now
(overcommit: nothing can be put to sleep to make room), every request gets a 503 with its numbers."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import Enum

from manager.contract import HOLD_TIMEOUT_S, MAX_WAITING


class Held(Enum):
    RELEASED = "released"
    TIMED_OUT = "timed_out"
    FULL = "full"
    REFUSED = "refused"
    """The tenant cannot wake now (``Hold.refusal`` says why)."""


def _release(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Hold:
    def __init__(self) -> None:
        self.on = False
        self.timeout_s = HOLD_TIMEOUT_S
        self.max_waiting = MAX_WAITING
        self.refusal = ""
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._since: dict[asyncio.Future[None], float] = {}
        """When each waiter arrived (wall clock): the manager wakes the longest waiting first."""

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_since(self) -> float | None:
        """When the longest waiting request arrived; None when none waits (from any thread)."""
        return min(list(self._since.values()), default=None)  # one C-level copy, as in ``set``

    def set(self, on: bool, timeout_s: float, max_waiting: int, refusal: str = "") -> None:
        """From any thread (the admin app's): a hold lifted releases every waiter, in arrival order;
        a refusal releases them too, and each of them then reads it."""
        self.timeout_s, self.max_waiting, self.refusal = timeout_s, max_waiting, refusal
        self.on = on
        if not on or refusal:
            for future in list(self._waiting):  # one C-level copy: the loop may append meanwhile
                future.get_loop().call_soon_threadsafe(_release, future)

    async def wait(self) -> Held:
        """On the event loop, while ``on``: until the hold is lifted or refused, the deadline passes,
        or at once when the queue is full or the wake is refused."""
        if self.refusal:
            return Held.REFUSED
        if len(self._waiting) >= self.max_waiting:
            return Held.FULL
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._since[future] = time.time()
        try:
            if not self.on:  # lifted between the caller's look and the append: the release missed it
                return Held.RELEASED
            try:
                await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                return Held.TIMED_OUT
            return Held.REFUSED if self.on and self.refusal else Held.RELEASED
        finally:
            self._waiting.remove(future)
            del self._since[future]
