"""The one function that changes a record's state, and audits it in the same transaction."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from broker.audit.log import record_event
from broker.db.models import Record
from broker.records import states


def transition(
    s: Session,
    record: Record,
    new_state: str,
    *,
    actor: str,
    actor_role: str,
    action: str | None = None,
    recipients: Sequence[str] = (),
    description: dict | None = None,
) -> None:
    states.check(record.state, new_state)
    old = record.state
    record.state = new_state
    desc = {"from": old, "to": new_state}
    desc.update(description or {})
    record_event(
        s,
        action=action or new_state,
        actor=actor,
        actor_role=actor_role,
        child=record.child.slug,
        record_id=record.id,
        recipients=recipients,
        description=desc,
    )
