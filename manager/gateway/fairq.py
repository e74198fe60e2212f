"""Fair queuing among one tenant's members, at the gateway.

The tenant's engine runs ``slots`` sequences at once (its ``--max-num-seqs``, the config's
``concurrency``); beyond them vLLM queues first come, first served, so one member with many
streams makes every other member wait behind all of them. The gateway therefore lets at most
``slots`` requests into the engine and keeps the rest in one queue per member. When a slot frees,
the next request comes from the backlogged member that has received the least service: the
virtual token counter of Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024):

- each member has a counter of the service it received, in weighted tokens: prompt tokens count
  ``PROMPT_WEIGHT``, generated ones ``COMPLETION_WEIGHT`` (decoding a token costs the engine
  about twice a prompt token), divided by the member's weight (``--weight``: 2 gets twice the
  service of 1 while both wait);
- a request is charged what it has used (the engine's own count) while it streams, about once a
  second (``progress``), and the rest as it leaves, so a member's long streams cost it as they
  run, not only once they end;
- a member that was not waiting has its counter lifted to the least counter among those waiting
  (or to the last one served when none waits): time spent idle banks no credit, so a member
  that returns cannot then shut the others out.

One slot is kept for members with nothing running (``RESERVED_SLOTS``, on an engine of at least
``RESERVE_FROM`` slots): a member with requests in the engine takes at most the others, so a
quiet member's request enters at once instead of waiting for a flood's stream to end. It costs
the flood one slot of the engine's (an eighth at 8 slots, under 1% at vLLM's 128).

No request starves: every dispatch raises a counter, and the one with the least is served next,
so any waiting member's turn comes after a bounded amount of others' service. What waits is
bounded in count (``max_waiting``) and in time (``max_wait_s``). Nothing here counts quotas:
a request is admitted by its quotas first, and waits holding that admission (counted once,
waited or not); one that leaves the queue unserved cancels it.

It runs on the gateway's event loop; ``configure`` may be called from the admin app's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

PROMPT_WEIGHT = 1.0
COMPLETION_WEIGHT = 2.0
RESERVED_SLOTS = 1
RESERVE_FROM = 4
"""The smallest engine (sequences at once) that keeps a slot for members with nothing running."""
MAX_WAITING = 1000
"""Requests the queue holds at once, every member together; more are answered 503 at once."""
MAX_WAIT_S = 120.0
"""How long a request waits for a slot before it is answered 503 (``Retry-After``)."""


class Queued(Enum):
    ADMITTED = "admitted"
    FULL = "full"
    TIMED_OUT = "timed_out"
    GONE = "gone"
    """The client disconnected while its request waited."""


@dataclass(eq=False)
class Waiter:
    member: str
    seq: int
    future: asyncio.Future[None] = field(repr=False)


@dataclass
class Ticket:
    """A request let into the engine: ``leave`` charges it and frees its slot."""

    member: str
    left: bool = False
    charged: float = 0.0
    """What the member has been charged for it so far (``progress``)."""


def charge(prompt_tokens: int, completion_tokens: int) -> float:
    return PROMPT_WEIGHT * prompt_tokens + COMPLETION_WEIGHT * completion_tokens


class FairQueue:
    """``slots`` None: no limit (a config from a manager that sends no concurrency, or fairness off)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.slots: int | None = None
        self.max_waiting = MAX_WAITING
        self.max_wait_s = MAX_WAIT_S
        self.weights: dict[str, float] = {}
        self.running = 0
        self.in_flight: dict[str, int] = {}
        self.counters: dict[str, float] = {}
        self._queues: dict[str, deque[Waiter]] = {}
        self._waiting = 0
        self._last = 0.0
        """The counter of the member served last: where a member that was not waiting starts."""
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return self._waiting

    def waiting_of(self, member: str) -> int:
        queue = self._queues.get(member)
        return len(queue) if queue else 0

    def configure(
        self,
        slots: int | None,
        weights: dict[str, float],
        max_waiting: int = MAX_WAITING,
        max_wait_s: float = MAX_WAIT_S,
    ) -> None:
        """From any thread: new limits take effect at once; more slots let waiters in."""
        self.weights = dict(weights)
        self.max_waiting, self.max_wait_s = max_waiting, max_wait_s
        self.slots = slots if slots and slots > 0 else None
        if self._loop is not None and self._waiting:
            self._loop.call_soon_threadsafe(self._dispatch)

    # ---------------------------------------------------------------- entering and leaving
    def enter_now(self, member: str) -> Ticket | None:
        """The fast path: a ticket when a slot the member may take is free and nobody who may take
        it waits; None: ``wait`` instead."""
        if self.slots is not None and (not self._may_take(member) or any(map(self._may_take, self._backlogged()))):
            return None
        self._lift(member)
        return self._admit(member)

    def _may_take(self, member: str) -> bool:
        """Whether a free slot is one the member may take: the reserved ones only with nothing running."""
        if self.slots is None:
            return True
        reserved = RESERVED_SLOTS if self.slots >= RESERVE_FROM and self.in_flight.get(member) else 0
        return self.running < self.slots - reserved

    def _backlogged(self) -> list[str]:
        return [m for m, q in self._queues.items() if q]

    async def wait(self, member: str, gone: asyncio.Event | None = None) -> tuple[Queued, Ticket | None]:
        """Waits for a slot in the member's queue; ``gone`` is set when the client disconnects."""
        ticket = self.enter_now(member)
        if ticket is not None:
            return Queued.ADMITTED, ticket
        if self._waiting >= self.max_waiting:
            return Queued.FULL, None
        loop = asyncio.get_running_loop()
        self._loop = loop
        waiter = Waiter(member, next(self._seq), loop.create_future())
        queue = self._queues.setdefault(member, deque())
        if not queue:
            self._lift(member)
        queue.append(waiter)
        self._waiting += 1
        watch: list[asyncio.Future[Any]] = [waiter.future]
        gone_wait = asyncio.ensure_future(gone.wait()) if gone is not None else None
        if gone_wait is not None:
            watch.append(gone_wait)
        try:
            await asyncio.wait(watch, timeout=self.max_wait_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request's task ends (its connection closed): its place goes
            if waiter.future.done() and not waiter.future.cancelled():
                self.leave(Ticket(member), 0, 0)  # let in this turn: the slot goes back
            else:
                waiter.future.cancel()
                self._remove(waiter)
            raise
        finally:
            if gone_wait is not None:
                gone_wait.cancel()
        if waiter.future.done() and not waiter.future.cancelled():
            return Queued.ADMITTED, Ticket(member)  # ``_dispatch`` took its slot
        waiter.future.cancel()
        self._remove(waiter)
        return (Queued.GONE if gone is not None and gone.is_set() else Queued.TIMED_OUT), None

    def progress(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int) -> None:
        """A running request has used this much so far: the member is charged what is new."""
        if ticket.left:
            return
        used = charge(prompt_tokens, completion_tokens)
        if used > ticket.charged:
            self._charge(ticket.member, used - ticket.charged)
            ticket.charged = used

    def leave(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int) -> None:
        """The request is done (answered, failed or abandoned): its slot frees and the member is
        charged the rest of what it used. Once per ticket."""
        if ticket.left:
            return
        self.progress(ticket, prompt_tokens, completion_tokens)
        ticket.left = True
        self.running -= 1
        left = self.in_flight.get(ticket.member, 0) - 1
        if left > 0:
            self.in_flight[ticket.member] = left
        else:
            self.in_flight.pop(ticket.member, None)
        self._dispatch()

    # ---------------------------------------------------------------- the counter
    def _weight(self, member: str) -> float:
        weight = self.weights.get(member, 1.0)
        return weight if weight > 0 else 1.0

    def _charge(self, member: str, tokens: float) -> None:
        self.counters[member] = self.counters.get(member, 0.0) + tokens / self._weight(member)

    def _lift(self, member: str) -> None:
        """A member that was not waiting starts at the least counter among those waiting, or at the
        last one served: never below, so idle time banks no credit."""
        floor = min((self.counters.get(m, 0.0) for m, q in self._queues.items() if q and m != member), default=None)
        floor = self._last if floor is None else floor
        self.counters[member] = max(self.counters.get(member, 0.0), floor)

    def _admit(self, member: str) -> Ticket:
        self.running += 1
        self.in_flight[member] = self.in_flight.get(member, 0) + 1
        self._last = self.counters.get(member, 0.0)
        return Ticket(member)

    def _dispatch(self) -> None:
        """Free slots go to the waiting member with the least counter (ties: who came first) among
        those who may take them."""
        while self._waiting:
            candidates = [m for m in self._backlogged() if self._may_take(m)]
            if not candidates:
                return
            member = min(candidates, key=lambda m: (self.counters.get(m, 0.0), self._queues[m][0].seq))
            waiter = self._queues[member].popleft()
            self._waiting -= 1
            if not self._queues[member]:
                del self._queues[member]
            if waiter.future.done():  # timed out or gone in this same turn
                continue
            self._admit(member)
            waiter.future.set_result(None)

    def _remove(self, waiter: Waiter) -> None:
        queue = self._queues.get(waiter.member)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._waiting -= 1
            if not queue:
                del self._queues[waiter.member]
