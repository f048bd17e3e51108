"""The rows a parent's questions of the audit log are answered with: plain dataclasses,
shared by the ORM path (queries) and the fast reader (fastread), which must not import
SQLAlchemy. Their as_dict field names are the export format: keep them stable."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

DELIVERED = "delivered"


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
