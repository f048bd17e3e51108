"""Appending to and reading the audit log in the database.

`record_event` must be called inside the same transaction as the change it
describes, so a change and its audit row commit or vanish together.

The chain needs one writer at a time: the one-row audit_head table is locked
(SELECT ... FOR UPDATE on PostgreSQL; SQLite's write lock already serialises) to
give each event the next seq and the previous hash. That lock is taken as late as
possible: `record_event` only queues the event on the session, and the queue is
written just before the transaction commits (`append_pending`, run from the
session's before_commit hook). A process that holds the lock from its first event
until its commit would make every other process wait for its whole batch of work,
and two pipeline processes would run one after the other. Events queued inside a
savepoint that rolls back are dropped with it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Dialect, column, event, select, table, text
from sqlalchemy.orm import Session, SessionTransaction

from broker.audit.chain import (
    GENESIS,
    Event,
    Verdict,
    canonical_parts,
    check_head,
    compact,
    event_hash,
)
from broker.db.models import AuditEvent, AuditHead, utcnow

_PENDING = "broker_audit_pending"  # Session.info key: events waiting for the commit
_MARKS = "broker_audit_marks"  # Session.info key: queue length when each savepoint began


@dataclass(frozen=True)
class PendingEvent:
    """An event described but not yet chained (no seq or hash until the commit)."""

    at: dt.datetime
    child: str
    record_id: int | None
    actor: str
    actor_role: str
    action: str
    recipients: tuple[str, ...]
    description: dict


def record_event(
    s: Session,
    *,
    action: str,
    actor: str,
    actor_role: str,
    child: str = "",
    record_id: int | None = None,
    recipients: Sequence[str] = (),
    description: dict | None = None,
    at: dt.datetime | None = None,
) -> PendingEvent:
    """Queue one event on this transaction; it is chained and written at commit."""
    when = (at or utcnow()).astimezone(dt.UTC)
    # Round-trip through the column's precision (microseconds, no tz) before hashing.
    when = when.replace(tzinfo=None).replace(tzinfo=dt.UTC)
    pending = PendingEvent(
        at=when, child=child, record_id=record_id, actor=actor, actor_role=actor_role,
        action=action, recipients=tuple(recipients),
        description=json.loads(json.dumps(description or {}, sort_keys=True)),
    )
    s.info.setdefault(_PENDING, []).append(pending)
    return pending


def queued_events(s: Session) -> list[PendingEvent]:
    """Events this transaction recorded that are not in the audit table yet: a read
    of the log that must see them checks these too (without taking the chain's lock)."""
    return list(s.info.get(_PENDING, ()))


def append_pending(s: Session) -> list[AuditEvent]:
    """Chain and write the events queued on this session, under the audit_head lock.

    Runs by itself before every commit. Calling it earlier takes the lock early and
    holds it to the commit: prefer `queued_events` for reads."""
    queued: list[PendingEvent] = s.info.pop(_PENDING, None) or []
    if not queued:
        return []
    head = s.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one()
    rows: list[AuditEvent] = []
    seq, prev = head.seq, head.hash
    for p in queued:
        seq += 1
        chained = Event(
            seq=seq,
            at=p.at.isoformat(timespec="microseconds"),
            child=p.child,
            record_id=p.record_id,
            actor=p.actor,
            actor_role=p.actor_role,
            action=p.action,
            recipients=p.recipients,
            description=p.description,
            prev_hash=prev,
        )
        digest = event_hash(chained)
        rows.append(AuditEvent(
            seq=seq,
            at=p.at,
            child=p.child,
            record_id=p.record_id,
            actor=p.actor,
            actor_role=p.actor_role,
            action=p.action,
            recipients=json.dumps(list(p.recipients)),
            description=json.dumps(p.description, sort_keys=True, ensure_ascii=False),
            prev_hash=prev,
            hash=digest,
        ))
        prev = digest
    s.add_all(rows)
    head.seq = seq
    head.hash = prev
    # The queue is empty now: a savepoint still open began before these rows, so its
    # ROLLBACK TO removes them in the database, and its queued events are all after 0.
    marks: dict[int, int] = s.info.get(_MARKS, {})
    for key in marks:
        marks[key] = 0
    s.flush()
    return rows


@event.listens_for(Session, "before_commit")
def _append_before_commit(s: Session) -> None:
    # The hook also runs when a savepoint is released: wait for the real commit.
    if not s.in_nested_transaction():
        append_pending(s)


@event.listens_for(Session, "after_transaction_create")
def _mark_savepoint(s: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        s.info.setdefault(_MARKS, {})[id(transaction)] = len(s.info.get(_PENDING, ()))


@event.listens_for(Session, "after_soft_rollback")
def _drop_rolled_back(s: Session, previous: SessionTransaction) -> None:
    """A rolled-back savepoint takes its events with it (this hook runs after the
    savepoint's after_transaction_end, so its mark is still there)."""
    marks: dict[int, int] = s.info.get(_MARKS, {})
    if previous.nested and id(previous) in marks:
        del s.info.setdefault(_PENDING, [])[marks.pop(id(previous)):]


@event.listens_for(Session, "after_transaction_end")
def _forget_at_end(s: Session, transaction: SessionTransaction) -> None:
    """The outermost transaction ended: committed events were written before the
    commit; anything still queued belonged to a rollback."""
    if transaction.parent is None and not transaction.nested:
        s.info.pop(_PENDING, None)
        s.info.pop(_MARKS, None)


# The columns an event is verified from, in this order (plain rows: no ORM objects).
_STORED = (
    AuditEvent.seq, AuditEvent.at, AuditEvent.child, AuditEvent.record_id, AuditEvent.actor,
    AuditEvent.actor_role, AuditEvent.action, AuditEvent.recipients, AuditEvent.description,
    AuditEvent.prev_hash, AuditEvent.hash,
)  # fmt: skip


def to_event(row: Any) -> Event:
    """The chain's view of a stored event (an AuditEvent or a row of _STORED)."""
    return Event(
        seq=row.seq,
        at=row.at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        child=row.child,
        record_id=row.record_id,
        actor=row.actor,
        actor_role=row.actor_role,
        action=row.action,
        recipients=tuple(json.loads(row.recipients)),
        description=json.loads(row.description),
        prev_hash=row.prev_hash,
    )


def _stream(
    s: Session, batch: int, raw: bool = False, after: int | None = None,
    upto: int | None = None,
) -> Iterator[Any]:
    """The events' columns in seq order (those with after < seq <= upto, if given): one
    query, fetched `batch` rows at a time (a server-side cursor on PostgreSQL), so memory
    stays flat however long the log. `raw`: the driver's values, without SQLAlchemy's
    per-row type conversion (on SQLite `at` is then the stored text, on PostgreSQL a
    naive UTC datetime)."""
    if raw:
        seq = column("seq")
        query = select(*(column(c.key) for c in _STORED)).select_from(
            table(AuditEvent.__tablename__))
    else:
        seq = AuditEvent.seq
        query = select(*_STORED)
    if after is not None:
        query = query.where(seq > after)
    if upto is not None:
        query = query.where(seq <= upto)
    options = {"stream_results": True, "yield_per": batch}
    if raw:
        return iter(s.connection().execute(query.order_by(seq), execution_options=options))
    return iter(s.execute(query.order_by(seq), execution_options=options))


def iter_events(s: Session, batch: int = 5000) -> Iterator[tuple[Event, str]]:
    """(event, stored hash) in seq order: the input of chain.verify."""
    for row in _stream(s, batch):
        yield to_event(row), row.hash


def _iso(at: Any) -> str | None:
    """The chain's `at` text from the driver's raw value, if it has the usual form (with
    microseconds); None sends the event to the reference path."""
    if type(at) is str:  # SQLite: "YYYY-MM-DD HH:MM:SS.ffffff", as SQLAlchemy stores it
        return f"{at[:10]}T{at[11:]}+00:00" if len(at) == 26 and at[10] == " " else None
    if type(at) is dt.datetime and at.tzinfo is None:  # PostgreSQL: naive UTC
        text = at.isoformat()  # isoformat(timespec=...) costs twice as much
        return text + "+00:00" if len(text) == 26 else None
    return None


def _reference_hash(dialect: Dialect, row: Any) -> str:
    """One event's hash as chain.verify computes it: the raw row through the columns'
    own result conversion (as a typed select gives it), decoded, then chain.event_hash."""
    typed = {}
    for col, value in zip(_STORED, row, strict=True):
        convert = col.type.dialect_impl(dialect).result_processor(dialect, None)
        typed[col.key] = convert(value) if convert is not None and value is not None else value
    return event_hash(to_event(SimpleNamespace(**typed)))


@dataclass(frozen=True)
class _Span:
    """What one pass over events in seq order found. Its first event's seq and prev_hash
    are left for _combine to check against the span before."""

    first_seq: int | None = None  # None: no events
    first_prev: str = ""
    last_seq: int = 0
    last_hash: str = ""
    checked: int = 0  # good events before the bad one, if any
    bad_seq: int | None = None
    reason: str = ""


def _check_span(dialect: Dialect, rows: Iterable[Any]) -> _Span:
    """chain.verify's checks, in its order, on raw rows, at a few microseconds an event.

    Each event is hashed from the driver's values as stored (chain.canonical_parts; the
    JSON columns through chain.compact). Only an event whose stored hash that does not
    give is decoded and hashed as chain.verify does, so a shortcut can only cost time:
    every "altered" verdict comes from the reference encoding."""
    sha256 = hashlib.sha256
    first: tuple[int, str] | None = None
    last_seq, prev, checked = 0, "", 0
    for row in rows:
        seq, at, child, record_id, actor, role, action, recipients, desc, prev_hash, stored = row
        if first is None:
            first = (seq, prev_hash)
        elif seq != last_seq + 1:
            return _Span(*first, last_seq, prev, checked, last_seq + 1,
                         f"event {last_seq + 1} is missing")
        elif prev_hash != prev:
            return _Span(*first, last_seq, prev, checked, seq,
                         "prev_hash does not match the event before")
        try:
            at_text, fast_d = _iso(at), compact(desc)
            # Most events have one recipient or none: nothing to compact.
            fast_r = recipients if ", " not in recipients else compact(recipients)
            ok = (
                at_text is not None
                and fast_r is not None
                and fast_d is not None
                and sha256(canonical_parts(
                    seq, at_text, child, record_id, actor, role, action, fast_r, fast_d,
                    prev_hash,
                )).hexdigest() == stored
            )
        except TypeError:  # a column of an unexpected type (NULL?): the reference decides
            ok = False
        if not ok:
            try:
                ok = _reference_hash(dialect, row) == stored
            except (TypeError, ValueError, AttributeError):
                return _Span(*first, last_seq, prev, checked, seq,
                             "the event's content cannot be decoded")
            if not ok:
                return _Span(*first, last_seq, prev, checked, seq,
                             "hash does not match the event's content")
        last_seq, prev = seq, stored
        checked += 1
    if first is None:
        return _Span()
    return _Span(*first, last_seq, prev, checked)


def _combine(spans: Iterable[_Span], head: tuple[int, str]) -> Verdict:
    """The verdict of chain.verify from consecutive spans (in seq order) and the head."""
    expected, prev, checked = 1, GENESIS, 0
    for span in spans:
        if span.first_seq is None:
            continue
        if span.first_seq != expected:
            return Verdict(False, checked, expected, f"event {expected} is missing")
        if span.first_prev != prev:
            return Verdict(False, checked, expected, "prev_hash does not match the event before")
        if span.bad_seq is not None:
            return Verdict(False, checked + span.checked, span.bad_seq, span.reason)
        expected, prev, checked = span.last_seq + 1, span.last_hash, checked + span.checked
    return check_head(checked, prev, head)


# Below this many events a second process costs more (its start-up) than it saves.
PARALLEL_MIN = 200_000


def verify_log(s: Session, batch: int = 10_000, workers: int = 1) -> Verdict:
    """chain.verify(iter_events(s), head), with the same verdict, in seconds for a
    million events. `workers` > 1 splits a long log by seq among that many processes
    (each hashes its share; the links between shares are checked here), when the session
    has not begun a transaction: another process cannot see this one's uncommitted rows.

    Head and events are read in one snapshot: on PostgreSQL the transaction is REPEATABLE
    READ and the workers import its snapshot; a SQLite reader sees one snapshot anyway
    (and a worker reads only events at or below the head, committed before it)."""
    fresh = not s.in_transaction()
    dialect = s.get_bind().dialect
    if fresh and dialect.name == "postgresql":
        s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    row = s.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
    head = (row.seq, row.hash)
    n = min(workers, head[0] // (PARALLEL_MIN // 2))
    if not fresh or n < 2:
        return _combine([_check_span(dialect, _stream(s, batch, raw=True))], head)
    bounds = [head[0] * i // n for i in range(1, n)]
    snapshot = None
    if dialect.name == "postgresql":
        snapshot = s.execute(text("SELECT pg_export_snapshot()")).scalar_one()
    url = s.get_bind().url.render_as_string(hide_password=False)
    jobs = [(url, lo, hi, batch, snapshot) for lo, hi in zip([None, *bounds[:-1]], bounds,
                                                             strict=True)]
    # spawn, not fork: a forked child must not open SQLite while its parent has it open.
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        pending = pool.starmap_async(_span_of, jobs)
        last = _check_span(dialect, _stream(s, batch, raw=True, after=bounds[-1]))
        spans = pending.get()
    return _combine([*spans, last], head)


def _span_of(url: str, after: int | None, upto: int, batch: int, snapshot: str | None) -> _Span:
    """A worker process's share of verify_log: the events with after < seq <= upto."""
    from broker.db.engine import Database

    db = Database(url)
    try:
        with db.read_session() as s:
            if snapshot is not None:
                if not re.fullmatch(r"[0-9A-F-]+", snapshot):
                    raise ValueError("unexpected snapshot id")
                s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                s.execute(text(f"SET TRANSACTION SNAPSHOT '{snapshot}'"))
            return _check_span(db.engine.dialect, _stream(s, batch, True, after, upto))
    finally:
        db.dispose()
