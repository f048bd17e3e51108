"""SQLite writers of one process take turns in the order they asked: the outbox is not
starved by a pipeline that commits batch after batch."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import text

from broker.db.engine import Database, FairLock, write_lock_path

REPO = Path(__file__).resolve().parents[1]


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


# -- another process on the same SQLite file ---------------------------------------------------

BUSY_WRITER = """
import sys, time
from broker.db.engine import Database
from sqlalchemy import text
db = Database(sys.argv[1])
print("writing", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # transaction after transaction, no pause between them
    with db.session() as s:
        s.execute(text("INSERT INTO turns (who) VALUES ('busy')"))
        time.sleep(0.02)
"""


def test_a_writer_in_another_process_gets_its_turn_within_a_few_transactions(
    tmp_path: Path,
) -> None:
    """The pipeline's process commits batch after batch; the outbox's process needs one
    write. SQLite's busy handler alone let it wait until the pipeline paused (here, the
    whole 3 s); with the lock file it waits a few of the pipeline's transactions."""
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    db = Database(url)
    with db.session() as s:
        s.execute(text("CREATE TABLE turns (id INTEGER PRIMARY KEY, who TEXT)"))
    busy = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, url, "3"],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert busy.stdout is not None and busy.stdout.readline() == "writing\n"
        time.sleep(0.3)  # its transactions are under way
        waits = []
        for _ in range(3):
            asked = time.monotonic()
            with db.session() as s:
                waits.append(time.monotonic() - asked)
                s.execute(text("INSERT INTO turns (who) VALUES ('outbox')"))
            time.sleep(0.1)
        assert busy.poll() is None  # still writing all along
    finally:
        busy.wait(30)
        db.dispose()
    assert max(waits) < 1.0, waits
    assert (tmp_path / "broker.db.writelock").exists()


def test_the_lock_file_sits_beside_a_sqlite_file_only() -> None:
    assert write_lock_path("sqlite:////srv/broker/broker.db") == "/srv/broker/broker.db.writelock"
    assert write_lock_path("sqlite:///broker.db") == "broker.db.writelock"
    for url in ("sqlite://", "sqlite:///:memory:", "postgresql+psycopg://u@h/db"):
        assert write_lock_path(url) is None
