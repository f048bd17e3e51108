"""SQLite writers of one process take turns in the order they asked: the outbox is not
starved by a pipeline that commits batch after batch."""

from __future__ import annotations

import threading
import time

from broker.db.engine import FairLock


def test_waiters_are_served_in_the_order_they_asked() -> None:
    lock = FairLock()
    order: list[int] = []
    lock.acquire()  # the pipeline's batch
    threads = []
    for n in range(5):
        def take(n: int = n) -> None:
            lock.acquire()
            order.append(n)
            lock.release()
        t = threading.Thread(target=take)
        t.start()
        threads.append(t)
        time.sleep(0.05)  # n asks before n + 1
    lock.release()
    lock.acquire()  # the pipeline's next batch queues behind all of them
    order.append(99)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4, 99]


def test_the_holder_may_enter_again() -> None:
    lock = FairLock()
    lock.acquire()
    lock.acquire()
    lock.release()
    other = threading.Thread(target=lambda: (lock.acquire(), lock.release()))
    other.start()
    other.join(0.2)
    assert other.is_alive(), "released while still held once"
    lock.release()
    other.join(5)
    assert not other.is_alive()
