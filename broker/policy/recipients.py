"""Who gets a record by default. One function, so the policy engine can replace it."""

from __future__ import annotations

import json
from collections.abc import Sequence

from broker.db.models import Person


def default_recipients(sender_role: str, team: Sequence[Person]) -> list[Person]:
    """Provider mail goes to the school members, school mail to the providers."""
    other = {"provider": "school", "school": "provider"}.get(sender_role)
    return [p for p in team if p.active and p.role == other]


def hold_reasons(sender: Person) -> list[str]:
    """Why this record is held, as the parent will read it."""
    tags = ", ".join(_tags(sender)) or "none"
    return [
        "every record is held for a guardian's decision (no standing consent on file)",
        f"sender {sender.email} is a {sender.role} on the team (tags: {tags})",
    ]


def _tags(person: Person) -> list[str]:
    return list(json.loads(person.tags or "[]"))
