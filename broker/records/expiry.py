"""Holds that outlive their lifetime expire: treated as denied, guardians told,
recipients never."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from broker.crypto.keys import broker_private_key
from broker.db.models import Record, utcnow
from broker.policy.context import record_audience
from broker.records import states
from broker.records.transitions import transition
from broker.review import render, tokens
from broker.review.notify import Notifier
from broker.runtime import Runtime


def expire_due(rt: Runtime, limit: int = 200, now: dt.datetime | None = None) -> int:
    """``now``: the scheduler's clock (tests drive time through it)."""
    notifier = Notifier(rt.content, rt.settings.domain, signer=broker_private_key(rt.settings.home))
    now = now or utcnow()
    with rt.db.session() as s:
        due = s.scalars(
            select(Record)
            .where(Record.state.in_(states.OPEN), Record.expires_at <= now)
            .order_by(Record.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for record in due:
            tokens.close_all(s, record, "dead")
            record.decided_at = now
            record.decided_by = "expiry"
            transition(s, record, states.EXPIRED, actor="broker", actor_role="broker",
                       description={"expires_at": record.expires_at.isoformat()
                                    if record.expires_at else None})
            for g in record_audience(s, rt.rules, record, now.date()):
                notifier.notice(
                    s, record.child, g, "expired",
                    render.render_expired(child_name=record.child.name, record_id=record.id,
                                          subject=record.subject, sender=record.sender_email,
                                          expired_at=now),
                    subject=record.subject, record=record,
                )
        return len(due)
