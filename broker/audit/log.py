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
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import event, select
from sqlalchemy.orm import Session, SessionTransaction

from broker.audit.chain import Event, Verdict, event_hash, verify
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


def to_event(row: AuditEvent) -> Event:
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


def iter_events(s: Session, batch: int = 5000) -> Iterator[tuple[Event, str]]:
    last = 0
    while True:
        rows = s.scalars(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return
        for row in rows:
            yield to_event(row), row.hash
        last = rows[-1].seq
        s.expunge_all()


def verify_log(s: Session) -> Verdict:
    head = s.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
    return verify(iter_events(s), head=(head.seq, head.hash))
