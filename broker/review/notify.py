"""Queueing the broker's own mail to guardians and senders: render, compose, enqueue.

Every function here runs inside the caller's transaction, so a notice is queued if
and only if the change it reports commits.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.audit.log import queued_events, record_event
from broker.content.store import ContentStore
from broker.crypto.outbound import protect, withheld
from broker.db.models import AuditEvent, Child, Delivery, Person, Record, utcnow
from broker.mail import compose as mc
from broker.mail.document import Attachment, Document, ReleaseContent
from broker.policy.context import active_people
from broker.release.outbox import enqueue
from broker.review import render

log = logging.getLogger(__name__)

# Notices that report a guardian's decision, a release or its failure, or an expiry: one
# per record and event, never prompted by an outsider's mail, so never capped. Every other
# notice (receipts, help, not understood, refusals, quarantine notices...) counts against
# [limits] notices_per_address_per_day.
UNCAPPED_NOTICES = frozenset({"decided_released", "decided_denied", "release_failed",
                              "expired", "reminder", "consent_renewal", "consent_expired",
                              "majority_notice", "majority_reached"})


def guardians(s: Session, child: Child) -> list[Person]:
    return [p for p in active_people(s, child) if p.role == "guardian"]


def as_shown(people: Sequence[Person]) -> tuple[render.Person, ...]:
    out = []
    for p in people:
        tags = json.loads(p.tags or "[]")
        role = p.role + (f" ({', '.join(tags)})" if tags else "")
        out.append(render.Person(name=p.name, email=p.email, role=role))
    return tuple(out)


def _full_texts(attachments: Sequence[Attachment]) -> tuple[Attachment, ...]:
    """A text file with the whole numbered text of each long attachment (the mail body
    only summarises it)."""
    out = []
    for a in attachments:
        if render.is_long(a):
            data = render.full_text(a).encode("utf-8")
            out.append(Attachment(label="", filename=render.full_text_name(a),
                                  content_type="text/plain", size=len(data), data=data))
    return tuple(out)


class Notifier:
    """Binds the content store and domain so call sites stay short."""

    def __init__(self, content: ContentStore, domain: str, signer: str | None = None,
                 per_day: int | None = None) -> None:
        self.content = content
        self.domain = domain
        # At most this many notices to one address per UTC day (None: no cap).
        self.per_day = per_day
        # The broker's armored OpenPGP private key: everything queued here is signed with
        # it (and encrypted to recipients with a usable key); None: unsigned.
        self.signer = signer

    def review_request(
        self,
        s: Session,
        record: Record,
        doc: Document,
        token: str,
        recipients: Sequence[Person],
        sender: Person,
        *,
        deciders: Sequence[Person] | None = None,
        coverage: Sequence[str] = (),
        who_decides: Sequence[str] = (),
        suggestions: Sequence[str] = (),
    ) -> list[str]:
        """To each of ``deciders`` (default: the guardians). ``coverage``: one line per
        recipient naming the consent that covers them or flagging a parent-directed
        disclosure; ``who_decides``: whose approval a release needs; ``suggestions``:
        what the rules point out for redaction."""
        child = record.child
        subject = render.notice_subject("review", child_name=child.name, subject=doc.subject,
                                        record_id=record.id)
        sent = []
        people = list(deciders) if deciders is not None else guardians(s, child)
        full_texts = _full_texts(doc.attachments)
        for seq, guardian in enumerate(people):
            text = render.render_review_request(
                render.ReviewContext(
                    record_id=record.id,
                    child_name=child.name,
                    document=doc,
                    recipients=as_shown(recipients),
                    reasons=tuple(json.loads(record.hold_reasons)),
                    received_at=record.received_at,
                    expires_at=record.expires_at or utcnow(),
                    sender_role=as_shown([sender])[0].role,
                    guardian_name=guardian.name,
                    coverage=tuple(coverage),
                    who_decides=tuple(who_decides),
                    suggestions=tuple(suggestions),
                )
            )
            data = mc.compose_review_request(
                child_name=child.name, slug=child.slug, domain=self.domain, token=token,
                to=guardian.email, to_name=guardian.name, subject=subject, text=text, seq=seq,
                attachments=full_texts,
            )
            self._queue(s, "review", guardian, data, record,
                        message_id=mc.review_message_id(token, self.domain, seq))
            sent.append(guardian.email)
        return sent

    def preview(
        self,
        s: Session,
        record: Record,
        content: ReleaseContent,
        token: str,
        recipients: Sequence[Person],
        guardian: Person,
        also_approved: bool,
        seq: int = 0,
    ) -> None:
        """``seq`` tells copies of one version to several deciders apart (Message-IDs)."""
        child = record.child
        text = render.render_preview(
            render.PreviewContext(
                record_id=record.id,
                child_name=child.name,
                content=content,
                recipients=as_shown(recipients),
                expires_at=record.expires_at or utcnow(),
                also_approved=also_approved,
                guardian_name=guardian.name,
            )
        )
        subject = render.notice_subject("preview", child_name=child.name,
                                        subject=record.subject, record_id=record.id)
        data = mc.compose_review_request(
            child_name=child.name, slug=child.slug, domain=self.domain, token=token,
            to=guardian.email, to_name=guardian.name, subject=subject, text=text,
            seq=record.version * 1000 + seq,
            # Exactly what recipients would get, attachments included (redacted PDFs as
            # rebuilt), plus the full text of long ones.
            attachments=tuple(content.attachments) + _full_texts(content.attachments),
        )
        self._queue(s, "preview", guardian, data, record,
                    message_id=mc.review_message_id(token, self.domain,
                                                    record.version * 1000 + seq))

    def fyi(
        self,
        s: Session,
        record: Record,
        content: ReleaseContent,
        token: str,
        recipients: Sequence[Person],
        guardian: Person,
        *,
        consent_id: int,
        consent_label: str,
    ) -> None:
        """The guardians' copy of an automatic release; answering REVOKE stops the consent
        (the token in its Reply-To and Message-ID has purpose "fyi")."""
        child = record.child
        text = render.render_fyi(render.FyiContext(
            record_id=record.id, child_name=child.name, content=content,
            recipients=as_shown(recipients), consent_id=consent_id,
            consent_purpose=consent_label, released_at=record.decided_at or utcnow(),
            guardian_name=guardian.name))
        subject = render.notice_subject("fyi", child_name=child.name, subject=record.subject,
                                        record_id=record.id)
        seq = guardian.id  # one copy per guardian, each with its own Message-ID
        data = mc.compose_review_request(
            child_name=child.name, slug=child.slug, domain=self.domain, token=token,
            to=guardian.email, to_name=guardian.name, subject=subject, text=text, seq=seq)
        self._queue(s, "notice", guardian, data, record,
                    message_id=mc.review_message_id(token, self.domain, seq))

    def notice(
        self,
        s: Session,
        child: Child,
        to: Person | str,
        kind: render.NoticeKind,
        text: str,
        *,
        subject: str = "",
        record: Record | None = None,
        reply_to: str | None = None,
        in_reply_to: str | None = None,
        auto_submitted: str = "auto-generated",
        references: tuple[str, ...] = (),
    ) -> None:
        address = to.email if isinstance(to, Person) else to
        name = to.name if isinstance(to, Person) else ""
        if self._own_address(address):
            # Loops: the broker never writes to its own domain (a notice there would come
            # back in as mail to answer).
            log.info("notice %s to the broker's own domain not sent", kind)
            return
        if kind not in UNCAPPED_NOTICES and self._over_cap(s, address, child, record):
            return
        message_id = mc.new_message_id(self.domain)
        data = mc.compose_notice(
            message_id=message_id,
            child_name=child.name, slug=child.slug, domain=self.domain, to=address,
            to_name=name,
            subject=render.notice_subject(kind, child_name=child.name, subject=subject,
                                          record_id=record.id if record else None),
            text=text, reply_to=reply_to, in_reply_to=in_reply_to,
            auto_submitted=auto_submitted, references=references,
        )
        person = to if isinstance(to, Person) else None
        kind_col = "receipt" if kind in ("receipt", "forwarded") else "notice"
        self._queue(s, kind_col, person or address, data, record, child=child,
                    message_id=message_id)

    def _own_address(self, address: str) -> bool:
        dom = address.strip().rpartition("@")[2].lower()
        return dom == self.domain or dom.endswith("." + self.domain)

    def _over_cap(self, s: Session, address: str, child: Child, record: Record | None) -> bool:
        """True when ``address`` already had its notices for today; the first refusal of
        the day is audited (`notice_capped`), the rest are silent."""
        if self.per_day is None:
            return False
        now = utcnow()
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        address = address.lower()
        # This transaction's copies not yet flushed are counted here, and the table holds
        # the rest: no flush of everything pending just for this count (one per notice).
        pending = sum(1 for o in s.new if isinstance(o, Delivery) and o.recipient == address
                      and o.kind in ("notice", "receipt")
                      and (o.created_at is None or o.created_at >= day))
        if pending >= self.per_day:
            sent = pending
        else:
            # Counted no further than the cap: whether it is reached is all that matters.
            todays = (select(Delivery.id).where(
                Delivery.recipient == address, Delivery.kind.in_(("notice", "receipt")),
                Delivery.created_at >= day).limit(self.per_day - pending).subquery())
            with s.no_autoflush:
                sent = pending + (s.scalar(select(func.count()).select_from(todays)) or 0)
        if sent < self.per_day:
            return False
        capped = [address in json.loads(r or "[]") for r in s.scalars(
            select(AuditEvent.recipients).where(
                AuditEvent.action == "notice_capped", AuditEvent.at >= day))]
        # ...and this transaction's own, not yet in the table.
        capped += [address in e.recipients for e in queued_events(s)
                   if e.action == "notice_capped" and e.at >= day]
        if not any(capped):
            record_event(s, action="notice_capped", actor="broker", actor_role="broker",
                         child=child.slug, record_id=record.id if record else None,
                         recipients=[address],
                         description={"limit": self.per_day, "day": day.date().isoformat(),
                                      "until": (day + dt.timedelta(days=1)).isoformat()})
        log.info("notice to an address over its daily cap not sent")
        return True

    def _queue(
        self,
        s: Session,
        kind: str,
        to: Person | str,
        data: bytes,
        record: Record | None,
        child: Child | None = None,
        *,
        message_id: str,
    ) -> None:
        person = to if isinstance(to, Person) else None
        reason = withheld(person)
        if reason is not None:
            # A member who must never receive plaintext and has no usable key gets nothing.
            assert person is not None
            record_event(s, action="mail_withheld", actor="broker", actor_role="broker",
                         child=(record.child.slug if record else child.slug if child else ""),
                         record_id=record.id if record else None, recipients=[person.email],
                         description={"kind": kind, "reason": reason})
            return
        sealed = protect(data, person, self.signer)
        enqueue(
            s, self.content, kind=kind, recipient=person.email if person else str(to),
            data=sealed.data, sign_on_send=sealed.sign_on_send, message_id=message_id,
            child_id=(record.child_id if record else child.id if child else None),
            record_id=record.id if record else None, person_id=person.id if person else None,
        )
