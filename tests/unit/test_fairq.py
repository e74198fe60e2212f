"""The gateway's fair queue (manager.gateway.fairq) on its own: which member's request enters the
engine next, weights, bounds, starvation and a client that leaves while it waits. The proxy's
use of it, with quotas and streams, is in test_gateway_fairness.py; a real engine in
tests/integration/test_stack.py."""

from __future__ import annotations

import asyncio

import pytest

from manager.gateway.fairq import COMPLETION_WEIGHT, FairQueue, Queued, Ticket

pytestmark = pytest.mark.anyio


async def enter(queue: FairQueue, member: str, served: list[str]) -> Ticket | None:
    """One request: waits for a slot and notes who got it, in order."""
    queued, ticket = await queue.wait(member)
    if queued is Queued.ADMITTED:
        served.append(member)
    return ticket


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def admitted(tasks: list[asyncio.Task[Ticket | None]]) -> Ticket:
    """The ticket of the request that entered last and is still running."""
    for _ in range(50):
        for task in tasks:
            if task.done() and (ticket := task.result()) is not None and not ticket.left:
                return ticket
        await asyncio.sleep(0)
    raise AssertionError("no request entered")


async def test_a_quiet_member_goes_before_a_flood_that_holds_the_engine() -> None:
    """One slot; the flood holds it and queues three more; quiet's one request, queued after all
    of them, enters as soon as the slot frees: the flood has been served, quiet has not."""
    queue, served = FairQueue(), []
    queue.configure(1, {})
    first = queue.enter_now("flood")
    assert first is not None and queue.enter_now("quiet") is None, "the slot is taken"
    flood = [asyncio.create_task(enter(queue, "flood", served)) for _ in range(3)]
    await settle()
    quiet = asyncio.create_task(enter(queue, "quiet", served))
    await settle()
    assert (queue.waiting, queue.waiting_of("flood"), queue.waiting_of("quiet")) == (4, 3, 1)
    queue.leave(first, 100, 500)  # a long answer
    await settle()
    assert served == ["quiet"]
    ticket = await quiet
    assert ticket is not None
    queue.leave(ticket, 100, 20)
    await settle()
    assert served == ["quiet", "flood"] and queue.running == 1
    for task in flood:
        task.cancel()


async def test_first_come_first_served_while_one_member_alone_waits() -> None:
    queue, served = FairQueue(), []
    queue.configure(1, {})
    first = queue.enter_now("a")
    assert first is not None
    tasks = [asyncio.create_task(enter(queue, "a", served)) for _ in range(3)]
    await settle()
    ticket: Ticket | None = first
    for i, task in enumerate(tasks):
        assert ticket is not None
        queue.leave(ticket, 100, 10)
        ticket = await task
        assert all(t.done() == (j <= i) for j, t in enumerate(tasks)), "in the order they came"


async def test_a_heavier_member_gets_its_weights_share_while_both_wait() -> None:
    """Both members always waiting, equal requests: the PI (weight 2) gets twice the student's turns."""
    queue, served = FairQueue(), []
    queue.configure(1, {"pi": 2.0, "student": 1.0})
    running = queue.enter_now("student")
    tasks = [asyncio.create_task(enter(queue, who, served)) for _ in range(30) for who in ("pi", "student")]
    await settle()
    for _ in range(30):
        assert running is not None
        queue.leave(running, 100, 100)
        await settle()
        running = await admitted(tasks)
    assert served[:30].count("pi") == 20 and served[:30].count("student") == 10, served[:30]
    for task in tasks:
        task.cancel()


async def test_what_waits_is_bounded_in_count_and_in_time() -> None:
    queue = FairQueue()
    queue.configure(1, {}, max_waiting=2, max_wait_s=0.05)
    assert queue.enter_now("a") is not None
    waiting = [asyncio.create_task(queue.wait("b")) for _ in range(2)]
    await settle()
    assert await queue.wait("c") == (Queued.FULL, None), "two wait already"
    assert [await w for w in waiting] == [(Queued.TIMED_OUT, None)] * 2
    assert queue.waiting == 0 and queue.running == 1


async def test_no_member_starves_however_much_another_sends() -> None:
    """A member that keeps five requests waiting at all times, and one that sends one request:
    the lone request enters within two dispatches, not after the other's backlog."""
    queue, served = FairQueue(), []
    queue.configure(1, {})
    running = queue.enter_now("flood")
    flood = [asyncio.create_task(enter(queue, "flood", served)) for _ in range(5)]
    await settle()
    for _ in range(20):  # the flood has been served a lot
        assert running is not None
        queue.leave(running, 50, 200)
        await settle()
        flood.append(asyncio.create_task(enter(queue, "flood", served)))
        running = await admitted(flood)
    lone = asyncio.create_task(enter(queue, "lone", served))
    await settle()
    assert running is not None
    queue.leave(running, 50, 200)
    await settle()
    assert served[-1] == "lone"
    for task in flood:
        task.cancel()
    assert await lone is not None


async def test_idle_time_banks_no_credit() -> None:
    """A member served little long ago starts, when it comes back, at the least counter among
    those waiting: it goes next once, then takes turns, instead of shutting the others out."""
    queue, served = FairQueue(), []
    queue.configure(1, {})
    running = queue.enter_now("busy")
    busy = [asyncio.create_task(enter(queue, "busy", served)) for _ in range(6)]
    await settle()
    for _ in range(3):
        assert running is not None
        queue.leave(running, 100, 1000)
        running = await admitted(busy)
    back = [asyncio.create_task(enter(queue, "back", served)) for _ in range(3)]
    await settle()
    assert queue.counters["back"] >= queue.counters["busy"] - 1000 * COMPLETION_WEIGHT
    for _ in range(4):
        assert running is not None
        queue.leave(running, 100, 1000)
        await settle()
        running = await admitted([*busy, *back])
    assert served[3:7] == ["back", "busy", "back", "busy"], served
    for task in [*busy, *back]:
        task.cancel()


async def test_a_client_that_leaves_while_waiting_frees_its_place_and_takes_no_slot() -> None:
    queue = FairQueue()
    queue.configure(1, {})
    running = queue.enter_now("a")
    gone = asyncio.Event()
    waiting = asyncio.create_task(queue.wait("b", gone))
    await settle()
    assert queue.waiting == 1
    gone.set()
    assert await waiting == (Queued.GONE, None)
    assert queue.waiting == 0 and queue.running == 1 and "b" not in queue._queues
    assert running is not None
    queue.leave(running, 1, 1)
    queue.leave(running, 1, 1)  # once per ticket
    assert queue.running == 0


async def test_more_slots_let_waiters_in_and_no_slots_means_no_queue() -> None:
    queue = FairQueue()
    queue.configure(1, {})
    assert queue.enter_now("a") is not None
    waiting = asyncio.create_task(queue.wait("b"))
    await settle()
    queue.configure(2, {})  # the engine's concurrency grew (a resize)
    queued, ticket = await waiting
    assert queued is Queued.ADMITTED and ticket is not None and queue.running == 2
    queue.configure(None, {})  # fairness off: nothing waits at the gateway
    assert all(queue.enter_now("c") is not None for _ in range(10))


async def test_a_request_cancelled_while_waiting_leaves_no_trace() -> None:
    queue = FairQueue()
    queue.configure(1, {})
    assert queue.enter_now("a") is not None
    waiting = asyncio.create_task(queue.wait("b"))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert queue.waiting == 0 and queue.running == 1


async def test_an_engine_of_four_slots_keeps_one_for_members_with_nothing_running() -> None:
    """The flood takes three of four slots and waits for more; quiet, with nothing running, takes
    the fourth at once. With quiet's request done, the flood still takes three: the fourth stays
    free for the next member that comes."""
    queue, served = FairQueue(), []
    queue.configure(4, {})
    flood = [queue.enter_now("flood") for _ in range(3)]
    assert all(flood) and queue.enter_now("flood") is None
    waiting = asyncio.create_task(enter(queue, "flood", served))
    await settle()
    quiet = queue.enter_now("quiet")
    assert quiet is not None and queue.running == 4
    queue.leave(quiet, 10, 5)
    await settle()
    assert served == [] and queue.running == 3, "the free slot stays kept"
    first = flood[0]
    assert first is not None
    queue.leave(first, 10, 200)
    await settle()
    assert served == ["flood"] and queue.running == 3
    assert await waiting is not None


async def test_a_long_stream_is_charged_as_it_runs_not_only_when_it_ends() -> None:
    """Two members each with a stream running and one waiting: the one whose stream has written
    more by now goes after the other, though neither stream has ended."""
    queue, served = FairQueue(), []
    queue.configure(2, {})
    long, short = queue.enter_now("long"), queue.enter_now("short")
    assert long is not None and short is not None
    waiting = [asyncio.create_task(enter(queue, who, served)) for who in ("long", "short")]
    await settle()
    queue.progress(long, 10, 900)  # what the gateway saved of each stream so far
    queue.progress(short, 10, 50)
    queue.progress(long, 10, 900)  # the same count again charges nothing more
    assert queue.counters["long"] == 10 + 2 * 900
    queue.leave(short, 10, 60)  # charged only the rest: 20 more tokens
    await settle()
    assert served == ["short"] and queue.counters["short"] == 10 + 2 * 60
    for task in waiting:
        task.cancel()
