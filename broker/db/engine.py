"""Engine and sessions. SQLite gets WAL and FULL sync (a commit is on disk when it
returns); PostgreSQL is used as it comes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
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
    """A re-entrant lock granted in the order it was asked for.

    SQLite has one writer at a time, and a thread waiting in its busy handler only
    polls: the pipeline, committing batch after batch, took the lock again before the
    outbox ever saw it free, and review requests waited behind the whole backlog.
    Writers of one process queue here first, so each waits at most for those ahead."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket whose holder may go
        self._owner: int | None = None
        self._depth = 0

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

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth:
                return
            self._owner = None
            self._serving += 1
            self._cond.notify_all()


class Database:
    """One engine plus a session factory; `with db.session() as s:` commits or rolls back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        # Sealed columns (models.SealedText) find the home's content key by this URL.
        self.engine.dialect.broker_url = url  # type: ignore[attr-defined]
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: this process's writers take turns in order (see FairLock).
        self._write_lock = FairLock() if url.startswith("sqlite") else None
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
