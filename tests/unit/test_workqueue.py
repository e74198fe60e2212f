import threading
import time

from manager.control.workqueue import WorkQueue


def test_dedupes_and_orders_by_due_time() -> None:
    q = WorkQueue()
    q.add("b", delay=0.05)
    q.add("a")
    q.add("a")
    assert q.get(timeout=1) == "a"
    assert q.get(timeout=1) == "b"
    assert q.get(timeout=0.05) is None


def test_earlier_due_time_wins() -> None:
    q = WorkQueue()
    q.add("a", delay=60)
    q.add("a", delay=0)
    assert q.get(timeout=1) == "a"
    assert q.pending() == {}


def test_close_wakes_waiters() -> None:
    q = WorkQueue()
    got: list[str | None] = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(timeout=2)
    assert got == [None]
