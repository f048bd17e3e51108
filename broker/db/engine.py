"""Engine and sessions. SQLite gets WAL and FULL sync (a commit is on disk when it
returns); PostgreSQL is used as it comes."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            # Let SQLAlchemy issue BEGIN itself (IMMEDIATE, below) so writers queue
            # on the database lock instead of failing half-way with "locked".
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            # Readers (see Database.read_session) begin deferred: in WAL mode they never
            # wait for a writer, which matters on the SMTP event loop.
            if conn.get_execution_options().get("broker_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class FairLock:
    """A re-entrant lock granted in the order it was asked for, and shared with the other
    processes on the same SQLite file through a lock file (``lock_path``).

    SQLite has one writer at a time, and a writer waiting in its busy handler only polls,
    sleeping longer each time (up to 100 ms): the pipeline, committing batch after batch,
    took the lock again before the outbox ever saw it free, and review requests waited
    behind the whole backlog. Writers of one process queue here first, so each waits at
    most for those ahead; then they take the lock file (``flock``), which the kernel hands
    to a waiting process as soon as it is free: the pipeline's and the outbox's processes
    of `broker serve` take turns within a few transactions instead of one starving."""

    def __init__(self, lock_path: str | None = None) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket whose holder may go
        self._owner: int | None = None
        self._depth = 0
        self._lock_path = lock_path
        self._file: BinaryIO | None = None  # a file object: closed when collected

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
            self._owner, self._depth = me, 1
        try:
            self._lock_file(fcntl.LOCK_EX)
        except BaseException:
            self._hand_on()
            raise

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth:
                return
        try:
            self._lock_file(fcntl.LOCK_UN)
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        with self._cond:
            self._owner, self._depth = None, 0
            self._serving += 1
            self._cond.notify_all()

    def _lock_file(self, how: int) -> None:
        """Only ever called by the holder of the in-process lock."""
        if self._lock_path is None:
            return
        if self._file is None:
            self._file = os.fdopen(os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600),
                                   "r+b", buffering=0)
        fcntl.flock(self._file.fileno(), how)

    def close(self) -> None:
        """Closes the lock file (only between uses: it must not be held)."""
        with self._cond:
            if self._file is not None and self._owner is None:
                self._file.close()
                self._file = None


def write_lock_path(url: str) -> str | None:
    """The lock file beside a SQLite database file (None for memory and other databases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database + ".writelock"


class Database:
    """One engine plus a session factory; `with db.session() as s:` commits or rolls back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # Sealed columns (models.SealedText) find the home's content key by this URL.
        self.engine.dialect.broker_url = url  # type: ignore[attr-defined]
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: writers take turns in order, this process's and the others' (FairLock).
        self._write_lock = FairLock(write_lock_path(url)) if url.startswith("sqlite") else None
        self._read_factory = sessionmaker(
            self.engine.execution_options(broker_readonly=True), expire_on_commit=False
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        lock = self._write_lock
        if lock is not None:
            lock.acquire()
        try:
            s = self._factory()
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise
            finally:
                s.close()
        finally:
            if lock is not None:
                lock.release()

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reading only: on SQLite it takes no write lock (it never waits
        behind a writer); anything it changes is rolled back."""
        s = self._read_factory()
        try:
            yield s
        finally:
            s.rollback()
            s.close()

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def dispose(self) -> None:
        self.engine.dispose()
        if self._write_lock is not None:
            self._write_lock.close()
