"""Turning an approval into one queued copy per recipient, built by the broker.

The provider's MIME is never passed through: every copy is rendered from the
approved ReleaseContent, so only what the parent saw in the preview can leave.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence

from sqlalchemy.orm import Session

from broker.content.store import ContentStore
from broker.crypto.outbound import EncryptionRequired, protect, withheld
from broker.db.models import Person, Record, utcnow
from broker.mail import compose as mc
from broker.mail.document import ReleaseContent
from broker.release.outbox import enqueue
from broker.review import render


def queue_release(
    s: Session,
    content_store: ContentStore,
    domain: str,
    record: Record,
    content: ReleaseContent,
    recipients: Sequence[Person],
    released_by: str,
    signer: str | None = None,
    *,
    basis: Mapping[str, tuple[int | None, str]] | None = None,
    notices: Sequence[str] = (),
    summary_extra: Mapping[str, object] | None = None,
    released_at: dt.datetime | None = None,
    texts: dict[str, str] | None = None,
) -> dict[str, str]:
    """Queues the copies; returns recipient -> sha256 of the exact bytes queued.

    Each copy is signed with ``signer`` (the broker's OpenPGP key) and encrypted to the
    recipient's key where one is usable. A copy that is only signed is queued as composed
    and signed by the outbox before it is sent (its "delivered" event then carries the
    sha256 of the signed bytes that left). A recipient who requires encryption and has no
    usable key raises EncryptionRequired before anything is queued: the caller checks
    (:func:`broker.crypto.outbound.withheld`) and refuses the approval first.

    ``released_by``: who released it, as recipients read it ("Dana Rivera").
    ``basis``: recipient -> (consent id or None, the words for the footer); each copy's
    footer names the basis it goes out under, and the copy row remembers the consent (a
    revocation cancels the copies still queued under it). ``notices``: lines every copy
    carries (e.g. the 42 CFR part 2 notice).

    ``released_at`` (default: now) and ``texts``: a caller queueing one release in several
    calls passes the same moment and the same dict, so every copy says it was released at
    the same time, and the body for each basis is rendered once, not once per call."""
    blocked = [f"{p.email} {why}" for p in recipients if (why := withheld(p))]
    if blocked:
        raise EncryptionRequired("; ".join(blocked))
    child = record.child
    released_at = released_at or utcnow()
    basis = dict(basis or {})
    texts = {} if texts is None else texts

    def text_for(label: str) -> str:
        if label not in texts:
            texts[label] = render.render_release(
                render.ReleaseContext(
                    record_id=record.id,
                    child_name=child.name,
                    content=content,
                    released_by=released_by,
                    released_at=released_at,
                    consent=label,
                    notices=tuple(notices),
                )
            )
        return texts[label]

    summary = {
        "subject": content.subject,
        "attachments": [a.filename for a in content.attachments],
        "attachments_detail": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size,
             "sha256": hashlib.sha256(a.data).hexdigest(),
             **({"pages": a.pages} if a.pages else {})}
            for a in content.attachments
        ],
        "released_by_name": released_by,
        "notices": list(notices),
        **dict(summary_extra or {}),
    }
    hashes: dict[str, str] = {}
    for person in recipients:
        consent_id, label = basis.get(person.email, (None, render.DEFAULT_CONSENT))
        data = mc.compose_release(
            child_name=child.name, slug=child.slug, domain=domain, record_id=record.id,
            to=person.email, to_name=person.name, subject=content.subject or "(no subject)",
            text=text_for(label), attachments=content.attachments, date=released_at,
        )
        sealed = protect(data, person, signer)
        openpgp = ("encrypted to " + (sealed.fingerprint or "") if sealed.encrypted
                   else "signed" if sealed.signed else "none")
        delivery = enqueue(
            s, content_store, kind="release", recipient=person.email, data=sealed.data,
            sign_on_send=sealed.sign_on_send,
            message_id=mc.release_message_id(record.id, person.email, domain),
            child_id=child.id, record_id=record.id, person_id=person.id,
            dedupe_key=f"release:{record.id}:{person.email}",
            summary={**summary, "recipient_name": person.name, "openpgp": openpgp,
                     "basis": f"consent:{consent_id}" if consent_id else "parent-directed",
                     "consent_id": consent_id},
        )
        delivery.consent_id = consent_id
        hashes[person.email] = delivery.sha256
    return hashes
