"""Appending to and reading the audit log in the database.

`record_event` must be called inside the same transaction as the change it
describes, so a change and its audit row commit or vanish together. The one-row
audit_head table is locked for the append, which serialises writers across
processes (SELECT ... FOR UPDATE on PostgreSQL; SQLite's write lock already does).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit.chain import Event, Verdict, event_hash, verify
from broker.db.models import AuditEvent, AuditHead, utcnow


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
) -> AuditEvent:
    head = s.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one()
    when = (at or utcnow()).astimezone(dt.UTC)
    # Round-trip through the column's precision (microseconds, no tz) before hashing.
    when = when.replace(tzinfo=None).replace(tzinfo=dt.UTC)
    event = Event(
        seq=head.seq + 1,
        at=when.isoformat(timespec="microseconds"),
        child=child,
        record_id=record_id,
        actor=actor,
        actor_role=actor_role,
        action=action,
        recipients=tuple(recipients),
        description=json.loads(json.dumps(description or {}, sort_keys=True)),
        prev_hash=head.hash,
    )
    digest = event_hash(event)
    row = AuditEvent(
        seq=event.seq,
        at=when,
        child=child,
        record_id=record_id,
        actor=actor,
        actor_role=actor_role,
        action=action,
        recipients=json.dumps(list(recipients)),
        description=json.dumps(event.description, sort_keys=True, ensure_ascii=False),
        prev_hash=event.prev_hash,
        hash=digest,
    )
    s.add(row)
    head.seq = event.seq
    head.hash = digest
    s.flush()
    return row


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
