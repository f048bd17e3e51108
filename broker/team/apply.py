"""Creating or updating one child's team from a TeamSpec, idempotently and audited.

People left out of the file are deactivated, not deleted: past records and audit
events keep pointing at them.
"""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit.log import record_event
from broker.crypto import pgp
from broker.db.models import Child, Person
from broker.team.spec import TeamSpec

OPERATOR = "operator"


def apply_team(s: Session, spec: TeamSpec, actor: str = OPERATOR) -> list[str]:
    """Returns the changes made, one line each; empty when the file matched already."""
    changes: list[str] = []
    child = s.scalar(select(Child).where(Child.slug == spec.slug))
    if child is None:
        child = Child(slug=spec.slug, name=spec.name, birthdate=spec.birthdate,
                      jurisdiction=spec.jurisdiction, approval=spec.approval)
        s.add(child)
        s.flush()
        changes.append(f"child {spec.slug} created")
        _audit(s, spec.slug, actor, "child_created",
               {"name": spec.name, "jurisdiction": spec.jurisdiction,
                "approval": spec.approval,
                "birthdate": spec.birthdate.isoformat() if spec.birthdate else None})
    else:
        fields = {"name": spec.name, "birthdate": spec.birthdate,
                  "jurisdiction": spec.jurisdiction, "approval": spec.approval}
        diff = {k: v for k, v in fields.items() if getattr(child, k) != v}
        if diff:
            for k, v in diff.items():
                setattr(child, k, v)
            changes.append(f"child {spec.slug} updated: {', '.join(sorted(diff))}")
            _audit(s, spec.slug, actor, "child_updated",
                   {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in diff.items()})

    existing = {p.email: p for p in s.scalars(select(Person).where(Person.child_id == child.id))}
    wanted = {p.email: p for p in spec.people}
    for email, p in wanted.items():
        tags = json.dumps(list(p.tags))
        person = existing.get(email)
        if person is None:
            s.add(Person(child_id=child.id, role=p.role, name=p.name, email=email, tags=tags,
                         active=True, pgp_key=p.pgp_key, pgp_key_revoked=p.pgp_key_revoked,
                         require_encryption=p.require_encryption,
                         reply_auth=p.authentication))
            changes.append(f"{p.role} {email} added")
            _audit(s, spec.slug, actor, "person_added",
                   {"email": email, "name": p.name, "role": p.role, "tags": list(p.tags),
                    **_pgp_audit(p.pgp_key, p.pgp_key_revoked, p.require_encryption),
                    "authentication": p.authentication})
            continue
        diff = {}
        for key, value in (("role", p.role), ("name", p.name), ("tags", tags), ("active", True),
                           ("pgp_key", p.pgp_key), ("pgp_key_revoked", p.pgp_key_revoked),
                           ("require_encryption", p.require_encryption),
                           ("reply_auth", p.authentication)):
            if getattr(person, key) != value:
                diff[key] = value
                setattr(person, key, value)
        if diff:
            changes.append(f"{p.role} {email} updated: {', '.join(sorted(diff))}")
            shown = {k: (json.loads(v) if k == "tags" else v) for k, v in diff.items()}
            if "pgp_key" in shown:  # the fingerprint, not the whole armored key
                shown["pgp_key"] = _pgp_audit(p.pgp_key, False, False)["pgp_key"]
            _audit(s, spec.slug, actor, "person_updated", {"email": email, **shown})
    for email, person in existing.items():
        if email not in wanted and person.active:
            person.active = False
            changes.append(f"{person.role} {email} deactivated")
            _audit(s, spec.slug, actor, "person_removed", {"email": email, "role": person.role})
    s.flush()
    return changes


def _pgp_audit(key: str | None, revoked: bool, required: bool) -> dict:
    if not key and not required:
        return {}
    try:
        fpr = pgp.fingerprint(key) if key else None
    except pgp.PGPError:
        fpr = "unreadable"
    return {"pgp_key": fpr, "pgp_key_revoked": revoked, "require_encryption": required}


def _audit(s: Session, child: str, actor: str, action: str, description: dict) -> None:
    record_event(s, action=action, actor=actor, actor_role="operator", child=child,
                 description=description)
