"""Where a releasing record ends up once none of its copies is waiting any more.

Used by the outbox sender (a copy was sent or failed for good) and by consent revocation
(queued copies were cancelled), in the caller's transaction:

- some copy still queued: nothing changes yet;
- any copy failed: release_failed (the guardians were told when it failed);
- every copy cancelled (its consent revoked) before any left: stopped, nothing was sent;
- otherwise (at least one sent, none failed): released, and the sender is told it was
  forwarded (when `notify_sender_on_release`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.crypto.keys import broker_private_key
from broker.db.models import Delivery, Person, Record
from broker.records import states
from broker.records.transitions import transition
from broker.review import render
from broker.review.notify import Notifier

if TYPE_CHECKING:
    from broker.runtime import Runtime

BROKER_ACTOR = "broker"


def make_notifier(rt: Runtime) -> Notifier:
    """The notifier the sender uses: signs with the broker's key, honours the daily cap."""
    return Notifier(rt.content, rt.settings.domain,
                    signer=broker_private_key(rt.settings.home),
                    per_day=rt.settings.limits.notices_per_address_per_day)


def settle(s: Session, rt: Runtime, notifier: Notifier, record: Record) -> None:
    """Moves a RELEASING record to its final state once no release copy is queued."""
    # Lock the record (PostgreSQL) before counting its copies: two senders finishing the
    # last two copies at once then settle one after the other, and the second one sees
    # the first one's copy as sent instead of both seeing the other's as queued.
    # Only the state is read again: refreshing the whole record would also drop its
    # loaded child, read again at the next use.
    s.flush()
    s.refresh(record, ["state"], with_for_update=True)
    if record.state != states.RELEASING:
        return
    copies = s.scalars(
        select(Delivery.state).where(Delivery.record_id == record.id,
                                     Delivery.kind == "release")
    ).all()
    if any(c == "queued" for c in copies):
        return
    failed = [c for c in copies if c == "failed"]
    cancelled = [c for c in copies if c == "cancelled"]
    description = {"copies": len(copies), "failed": len(failed)}
    if cancelled:
        description["cancelled"] = len(cancelled)
    if failed:
        new_state = states.RELEASE_FAILED
    elif copies and len(cancelled) == len(copies):
        new_state = states.STOPPED
    else:
        new_state = states.RELEASED
    transition(s, record, new_state, actor=BROKER_ACTOR, actor_role="broker",
               description=description)
    if new_state == states.RELEASED and rt.settings.notify_sender_on_release:
        sender = s.get(Person, record.sender_id) if record.sender_id else None
        if sender is not None and sender.active:
            notifier.notice(
                s, record.child, sender, "forwarded",
                render.render_forwarded(child_name=record.child.name,
                                        subject=record.subject,
                                        received_at=record.received_at),
                subject=record.subject, record=record, auto_submitted="auto-replied",
            )
