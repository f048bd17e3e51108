"""From a decision to queued copies: the release check, then one copy per recipient.

The release check runs on the day of the release: for each recipient, the active consent
on file that covers the sender, the recipient and every category of the record, or else the
guardians' explicit approval of this record (a parent-directed disclosure). The basis is
written into the audit event, each copy's footer and each copy's row (so revoking the
consent cancels what is still queued under it).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.consents.manage import active_for_child
from broker.db.models import Consent, Person, Record, utcnow
from broker.mail.document import Document, Draft
from broker.policy.context import evaluation_of, jurisdiction, member
from broker.policy.evaluate import Coverage, coverage_for
from broker.records import states
from broker.records.transitions import transition
from broker.redact.text import apply_draft
from broker.release.builder import queue_release
from broker.review import tokens

if TYPE_CHECKING:
    from broker.policy.rules import Rules
    from broker.review.notify import Notifier
    from broker.runtime import Runtime

PARENT_DIRECTED_FOOTER = "a parent-directed disclosure: the family approved this record itself"


def draft_counts(draft: Draft) -> dict[str, Any]:
    """What the parent changed, as counts and ids (never the removed text)."""
    return {"paragraphs_removed": sorted(draft.redact_ids),
            "phrases_removed": len(draft.phrases),
            "attachments_dropped": sorted(draft.dropped),
            "recipients": None if draft.recipients is None else list(draft.recipients),
            "note": bool(draft.note)}


def release_check(s: Session, rules: Rules, record: Record, recipients: Sequence[Person],
                  day: dt.date | None = None) -> dict[str, Coverage]:
    """recipient address -> the basis a copy to them would go out under, today."""
    day = day or utcnow().date()
    ev = evaluation_of(record)
    sender = s.get(Person, record.sender_id) if record.sender_id else None
    if sender is None:
        return {p.email: Coverage(p.email, None, PARENT_DIRECTED_FOOTER) for p in recipients}
    cov = coverage_for(
        active_for_child(s, record.child_id, day),
        sender=member(sender).party, recipients=[member(p) for p in recipients],
        categories=ev.categories if ev else (), jurisdiction=jurisdiction(rules, record.child),
        day=day,
    )
    return {c.email: c for c in cov}


def release(
    s: Session,
    rt: Runtime,
    notifier: Notifier,
    record: Record,
    doc: Document,
    draft: Draft,
    recipients: Sequence[Person],
    *,
    approvers: Sequence[dict[str, Any]],
    actor: str,
    actor_role: str,
    auth: str,
    automatic: int | None = None,
) -> dict[str, str]:
    """Approve and queue. ``approvers``: [{email, name, role, auth, at}] of every person
    whose APPROVE this release rests on (empty for an automatic release under consent
    ``automatic``). Returns recipient -> sha256 of the queued copy."""
    content = apply_draft(doc, draft)  # RedactionError before anything changes
    ev = evaluation_of(record)
    basis = release_check(s, rt.rules, record, recipients)
    if automatic is not None and any(c.consent_id != automatic for c in basis.values()):
        raise ValueError("automatic release outside its consent")
    consents = {c.id: c for c in s.scalars(select(Consent).where(
        Consent.id.in_([c.consent_id for c in basis.values() if c.consent_id])))}
    tokens.close_all(s, record, "used")
    record.decided_at = utcnow()
    record.decided_by = actor
    emails = [p.email for p in recipients]
    counts = draft_counts(draft)
    described = {e: (f"consent:{c.consent_id}" if c.consent_id else "parent-directed")
                 for e, c in basis.items()}
    transition(s, record, states.APPROVED, actor=actor, actor_role=actor_role,
               recipients=emails,
               description={"version": record.version, **counts, "auth": auth,
                            "basis": described, "approvers": list(approvers),
                            "categories": list(ev.categories) if ev else [],
                            "notices": list(ev.notices) if ev else [],
                            "always_redacted": dict(ev.always_redacted) if ev else {},
                            "automatic": automatic is not None,
                            "consent": _consent_words(basis)})
    sender = s.get(Person, record.sender_id) if record.sender_id else None
    if automatic is not None:
        released_by = f"the family, through consent #{automatic} on file"
    else:
        released_by = ", ".join(a.get("name") or a["email"] for a in approvers)
    footers = {e: (c.consent_id, f"{c.label} on file" if c.consent_id else PARENT_DIRECTED_FOOTER)
               for e, c in basis.items()}
    purposes = {e: (consents[c.consent_id].purpose if c.consent_id in consents
                    else "parent-directed disclosure") for e, c in basis.items()}
    hashes: dict[str, str] = {}
    texts: dict[str, str] = {}  # the body for each basis, rendered once for all copies
    for person in recipients:
        # One call per recipient so each summary carries its own purpose.
        hashes.update(queue_release(
            s, rt.content, rt.settings.domain, record, content, [person], released_by,
            signer=notifier.signer, basis=footers, released_at=record.decided_at,
            texts=texts,
            notices=ev.notices if ev else (),
            summary_extra={
                "released_by": actor, "purpose": purposes[person.email],
                "categories": list(ev.categories) if ev else [],
                "sender": record.sender_email, "sender_name": sender.name if sender else "",
                "sender_role": sender.role if sender else "",
                "received_at": record.received_at.isoformat(),
                "approvers": list(approvers), "redactions": {
                    **counts, "always_redacted": dict(ev.always_redacted) if ev else {}},
            }))
    transition(s, record, states.RELEASING, actor="broker", actor_role="broker",
               recipients=emails,
               # What was sent (subject, attachment names) is in each delivery's sealed
               # summary; `broker audit` opens it. The audit keeps the copies' hashes.
               description={"copies": hashes, "attachments": len(content.attachments)})
    return hashes


def _consent_words(basis: dict[str, Coverage]) -> str:
    ids = sorted({c.consent_id for c in basis.values() if c.consent_id})
    parent = any(c.consent_id is None for c in basis.values())
    parts = [f"consent #{i}" for i in ids] + (["explicit approval by the guardians"]
                                              if parent else [])
    return ", ".join(parts) or "explicit approval by the guardians"
