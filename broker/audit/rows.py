"""The rows a parent's questions of the audit log are answered with: plain dataclasses,
shared by the ORM path (queries) and the fast reader (fastread), which must not import
SQLAlchemy. Their as_dict field names are the export format: keep them stable."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

DELIVERED = "delivered"
# Delivery summaries are fetched this many ids at a time (one IN list per query).
SUMMARY_BATCH = 500


@dataclass(frozen=True)
class Disclosure:
    """One released copy that reached the relay: the unit a parent can be asked about."""

    seq: int
    at: dt.datetime
    child: str
    record_id: int | None
    recipient: str
    recipient_name: str
    subject: str
    attachments: tuple[str, ...]
    sha256: str
    released_by: str
    # Not part of the export format: the copy's delivery row (None for events written
    # before deliveries were named) and everything known about it (summary + event).
    delivery_id: int | None = None
    details: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; the field names are the export format, keep them stable."""
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "child": self.child,
            "record": self.record_id,
            "recipient": self.recipient,
            "recipient_name": self.recipient_name,
            "subject": self.subject,
            "attachments": list(self.attachments),
            "sha256": self.sha256,
            "released_by": self.released_by,
        }


@dataclass(frozen=True)
class EventRow:
    """One audit event as stored, decoded from its JSON columns."""

    seq: int
    at: dt.datetime
    child: str
    record_id: int | None
    actor: str
    actor_role: str
    action: str
    recipients: tuple[str, ...] = ()
    description: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; the field names are the export format, keep them stable."""
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "child": self.child,
            "record": self.record_id,
            "actor": self.actor,
            "actor_role": self.actor_role,
            "action": self.action,
            "recipients": list(self.recipients),
            "description": self.description,
        }


def day_start(day: dt.date) -> dt.datetime:
    """Midnight UTC opening `day`: date filters are whole UTC days."""
    return dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)


# -- decoding: the same for the ORM path and the fast reader --------------------------------


def loads(text: Any, default: Any) -> Any:
    """Decodes a JSON column; a row that does not parse is shown, not fatal (verify says
    why)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default


def delivery_id(desc: Any) -> int | None:
    """The delivery a "delivered" event names (None for events written before that)."""
    if isinstance(desc, dict) and isinstance(desc.get("delivery"), int):
        return desc["delivery"]
    return None


def event_row(seq: int, at: dt.datetime, child: str, record_id: int | None, actor: str,
              actor_role: str, action: str, recipients: Any, description: Any) -> EventRow:
    """One event from its columns (recipients and description still JSON text)."""
    desc = loads(description, {})
    return EventRow(
        seq=seq,
        at=at,
        child=child,
        record_id=record_id,
        actor=actor,
        actor_role=actor_role,
        action=action,
        recipients=tuple(str(r) for r in loads(recipients, [])),
        description=desc if isinstance(desc, dict) else {"_raw": desc},
    )


def disclosure(seq: int, at: dt.datetime, child: str, record_id: int | None,
               recipients: Any, desc: Any, summary: dict[str, Any] | None) -> Disclosure:
    """One released copy from a "delivered" event's columns (recipients still JSON text,
    its description decoded) and its delivery's opened summary."""
    sent_to = loads(recipients, [])
    if not isinstance(desc, dict):
        desc = {}
    delivery = delivery_id(desc)
    # What was sent lives in the sealed delivery summary; the event's own fields win
    # (legacy events carry the subject themselves).
    desc = {**(summary or {}), **desc}
    if record_id is None and isinstance(desc.get("record"), int):
        record_id = desc["record"]
    attachments = desc.get("attachments") or []
    return Disclosure(
        seq=seq,
        at=at,
        child=child,
        record_id=record_id,
        recipient=str(sent_to[0]) if sent_to else "",
        recipient_name=str(desc.get("recipient_name") or ""),
        subject=str(desc.get("subject") or ""),
        attachments=tuple(str(a) for a in attachments),
        sha256=str(desc.get("sha256") or ""),
        released_by=str(desc.get("released_by") or ""),
        delivery_id=delivery,
        details=desc,
    )
