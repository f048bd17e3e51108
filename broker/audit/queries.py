"""Read-only questions a parent asks of the audit log: who received what, and when.

Plain SQLAlchemy in, plain dataclasses out, so the CLI (and later a web view) only
formats. Every filter runs in SQL against the composite indexes of migration 0002:
the log grows without bound and must never be scanned in Python. Rows are read as
plain Core rows (no ORM identity map), which is several times cheaper per event.

What was sent (subject, attachment names) is record content, so it is not in the audit
log (append-only and hash-chained: it could never be re-encrypted). A "delivered" event
names its delivery; the subject and attachments come from that delivery's sealed summary
(deliveries.summary, opened with the home's content key), fetched in batches. Events
written before sealing, which still carry a subject, are shown as they are.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, Select, func, select
from sqlalchemy.orm import Session

from broker.audit.rows import (
    DELIVERED,
    SUMMARY_BATCH,
    Disclosure,
    EventRow,
    day_start,
    delivery_id,
    disclosure,
    event_row,
    loads,
)
from broker.db.models import AuditEvent, Child, Delivery

TABLE = AuditEvent.__table__


def _filtered(
    query: Select[Any],
    child: str | None,
    since: dt.date | None,
    until: dt.date | None,
    record_id: int | None,
    newest_first: bool = False,
) -> Select[Any]:
    """Adds the shared filters and chain order (reversed for `newest_first`)."""
    query = _where(query, child, since, until, record_id)
    # A record has a handful of events: by seq lets the planner take the record_id index.
    # Otherwise time, then seq: the same as chain order (times are taken under the append
    # lock), and it lets the (..., at) indexes hand rows back already sorted.
    order = [AuditEvent.seq] if record_id is not None else [AuditEvent.at, AuditEvent.seq]
    return query.order_by(*(c.desc() for c in order) if newest_first else order)


def _where(
    query: Select[Any],
    child: str | None,
    since: dt.date | None,
    until: dt.date | None,
    record_id: int | None,
) -> Select[Any]:
    """The shared filters; `until` is inclusive, so the bound is the next midnight."""
    if child is not None:
        query = query.where(AuditEvent.child == child)
    if record_id is not None:
        query = query.where(AuditEvent.record_id == record_id)
    if since is not None:
        query = query.where(AuditEvent.at >= day_start(since))
    if until is not None:
        query = query.where(AuditEvent.at < day_start(until + dt.timedelta(days=1)))
    return query


def _latest(
    s: Session, query: Select[Any], filters: tuple[Any, ...], limit: int | None
) -> list[Row[Any]]:
    """The rows of `query` + filters oldest first; with a limit, only the latest `limit`
    of them (read newest first from the index, so a long history is never all read)."""
    if not limit:
        return list(s.execute(_filtered(query, *filters)))
    rows = list(s.execute(_filtered(query, *filters, newest_first=True).limit(limit)))
    rows.reverse()
    return rows


def _summaries(s: Session, delivery_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Opened summaries of these deliveries (sealed column), by id."""
    out: dict[int, dict[str, Any]] = {}
    unique = sorted(set(delivery_ids))
    for i in range(0, len(unique), SUMMARY_BATCH):
        chunk = unique[i : i + SUMMARY_BATCH]
        for did, summary in s.execute(
            select(Delivery.id, Delivery.summary).where(Delivery.id.in_(chunk))
        ):
            loaded = loads(summary, {})
            out[did] = loaded if isinstance(loaded, dict) else {}
    return out


def _to_disclosure(row: Row[Any], summary: dict[str, Any] | None, desc: Any) -> Disclosure:
    return disclosure(row.seq, row.at, row.child, row.record_id, row.recipients, desc, summary)


def _to_event(row: Row[Any]) -> EventRow:
    return event_row(row.seq, row.at, row.child, row.record_id, row.actor, row.actor_role,
                     row.action, row.recipients, row.description)


def disclosures(
    s: Session,
    child: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    record_id: int | None = None,
    limit: int | None = None,
) -> list[Disclosure]:
    """Every released copy ("delivered" events) matching the filters, oldest first;
    with `limit`, only the latest that many (count_matching tells how many there are)."""
    query = select(TABLE).where(AuditEvent.action == DELIVERED)
    rows = _latest(s, query, (child, since, until, record_id), limit)
    descs = [loads(row.description, {}) for row in rows]
    ids = [delivery_id(desc) for desc in descs]
    wanted = [d for d in ids if d is not None]
    summaries = _summaries(s, wanted) if wanted else {}
    return [
        _to_disclosure(row, summaries.get(d) if d is not None else None, desc)
        for row, desc, d in zip(rows, descs, ids, strict=True)
    ]


def events(
    s: Session,
    child: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    record_id: int | None = None,
    limit: int | None = None,
) -> list[EventRow]:
    """Every audit event matching the filters, oldest first (chain order); with `limit`,
    only the latest that many."""
    rows = _latest(s, select(TABLE), (child, since, until, record_id), limit)
    return [_to_event(row) for row in rows]


def count_matching(
    s: Session,
    child: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    record_id: int | None = None,
    *,
    disclosures_only: bool,
) -> int:
    """How many disclosures (or events) match, counted in the index: to say how many a
    limited listing left out."""
    query = select(func.count()).select_from(TABLE)
    if disclosures_only:
        query = query.where(AuditEvent.action == DELIVERED)
    return s.scalar(_where(query, child, since, until, record_id)) or 0


@dataclass(frozen=True)
class ReleaseCopy:
    """One release copy as the outbox holds it, its sealed summary opened."""

    id: int
    record_id: int | None
    person_id: int | None
    recipient: str
    message_id: str
    sha256: str
    consent_id: int | None
    state: str  # queued | sent | failed | cancelled
    attempts: int
    last_error: str
    created_at: dt.datetime
    sent_at: dt.datetime | None
    summary: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


_COPY_COLUMNS = (
    Delivery.id, Delivery.record_id, Delivery.person_id, Delivery.recipient,
    Delivery.message_id, Delivery.sha256, Delivery.consent_id, Delivery.state,
    Delivery.attempts, Delivery.last_error, Delivery.created_at, Delivery.sent_at,
    Delivery.summary,
)  # fmt: skip


def _to_copy(row: Row[Any]) -> ReleaseCopy:
    summary = loads(row.summary, {})
    return ReleaseCopy(
        id=row.id, record_id=row.record_id, person_id=row.person_id, recipient=row.recipient,
        message_id=row.message_id, sha256=row.sha256, consent_id=row.consent_id,
        state=row.state, attempts=row.attempts, last_error=row.last_error or "",
        created_at=row.created_at, sent_at=row.sent_at,
        summary=summary if isinstance(summary, dict) else {},
    )


def release_copies(
    s: Session,
    *,
    ids: list[int] | None = None,
    child_id: int | None = None,
    states: tuple[str, ...] = (),
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> list[ReleaseCopy]:
    """Release copies by id (batched), or of one child in some states, queued in a period
    (by created_at: when the approved copy was queued), oldest first."""
    base = select(*_COPY_COLUMNS).where(Delivery.kind == "release")
    if ids is not None:
        out: list[ReleaseCopy] = []
        unique = sorted(set(ids))
        for i in range(0, len(unique), SUMMARY_BATCH):
            chunk = unique[i : i + SUMMARY_BATCH]
            out.extend(_to_copy(r) for r in s.execute(base.where(Delivery.id.in_(chunk))))
        return sorted(out, key=lambda c: c.id)
    query = base
    if child_id is not None:
        query = query.where(Delivery.child_id == child_id)
    if states:
        query = query.where(Delivery.state.in_(states))
    if since is not None:
        query = query.where(Delivery.created_at >= day_start(since))
    if until is not None:
        query = query.where(Delivery.created_at < day_start(until + dt.timedelta(days=1)))
    return [_to_copy(r) for r in s.execute(query.order_by(Delivery.created_at, Delivery.id))]


def record_events(
    s: Session, record_ids: list[int], actions: tuple[str, ...]
) -> list[EventRow]:
    """The events of these records with these actions (record_id index, batched), by seq."""
    out: list[EventRow] = []
    unique = sorted(set(record_ids))
    for i in range(0, len(unique), SUMMARY_BATCH):
        chunk = unique[i : i + SUMMARY_BATCH]
        query = select(TABLE).where(AuditEvent.record_id.in_(chunk))
        if actions:
            query = query.where(AuditEvent.action.in_(actions))
        out.extend(_to_event(row) for row in s.execute(query))
    return sorted(out, key=lambda e: e.seq)


def child_actions(s: Session, child: str, actions: tuple[str, ...]) -> list[EventRow]:
    """Every event of one child with one of these actions (the child/action index), by seq."""
    query = select(TABLE).where(AuditEvent.child == child, AuditEvent.action.in_(actions))
    return [_to_event(row) for row in s.execute(query.order_by(AuditEvent.seq))]


def child_slugs(s: Session) -> list[str]:
    """Known children, so a mistyped --child is an error rather than an empty answer."""
    return list(s.scalars(select(Child.slug).order_by(Child.slug)))
