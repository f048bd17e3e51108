"""The accounting of disclosures: the document a parent hands to a hearing officer.

One entry per released copy (a record, approved once, goes to one or more recipients): when
it went, to whom, who asked for it (the record's sender), what was sent, for what purpose
and on what basis (a consent on file or the parent's explicit approval of that record), who
approved it and how that reply was authenticated, what was removed first, the notice that
went with it and what became of the copy (sent, queued, failed, cancelled). Above them: the
child, the period, when it was made and whether the audit chain verifies.

`build_report` is pure: plain data in (the outbox copies with their opened summaries, the
"delivered" events joined to them by `queries.disclosures`, the records' approval and
delivery events, the team, the consents, the chain verdict), a `Report` out. `load_report`
is the thin part that asks the database. Fields written by newer versions (basis,
approvers, attachments_detail, notices, redactions ...) are read with defaults, so copies
released before they existed still render, from what the audit and the outbox did record.

What was sent (subjects, file names) is record content: it is only ever in the rendered
report the parent asked for, never in a log line.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit import queries
from broker.audit.log import verify_log
from broker.db.models import AuditHead, Child, Consent, Person, Record, utcnow

PARENT_DIRECTED = "parent-directed"
PARENT_DIRECTED_BASIS = "parent-directed: explicit approval of this record"
PARENT_DIRECTED_PURPOSE = "parent-directed disclosure"
UNSENT = ("queued", "failed", "cancelled")
RECORD_ACTIONS = ("approved", "delivery_failed", "delivery_cancelled")
# How a guardian's reply was authenticated (broker.review.authenticate methods).
AUTH_WORDS = {
    "token": "single-use reply token and the guardian's registered From address "
             "(no signature check)",
    "dkim": "DKIM signature verified by the broker",
    "authentication-results": "DKIM/DMARC pass reported by the trusted mail server",
    "pgp": "OpenPGP signature by the guardian's registered key",
}  # fmt: skip
# An approval event at most this long after its copy was queued is the one that queued it
# (the approval and the copies are written in one transaction).
_APPROVAL_SLACK = dt.timedelta(seconds=5)
# Cancellation reasons that only repeat what the report already says.
_PLAIN_REVOKED = frozenset({"consent revoked", "consent was revoked", "revoked", ""})


# -- the report -----------------------------------------------------------------------------


def when(at: dt.datetime | None) -> str:
    """Times shown to people: UTC to the minute, labelled, so no one guesses the zone."""
    return "" if at is None else at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso(at: dt.datetime | None) -> str:
    """Times for machines (CSV): ISO 8601 UTC to the second."""
    return "" if at is None else at.astimezone(dt.UTC).isoformat(timespec="seconds")


def human_size(size: int | None) -> str:
    if size is None:
        return ""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KB ({size:,} bytes)"
    return f"{size / (1024 * 1024):.1f} MB ({size:,} bytes)"


def words(name: str) -> str:
    """A rules name as people read it: substance_use -> substance use."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class Party:
    """Someone on the child's team as the report names them."""

    email: str
    name: str = ""
    role: str = ""
    tags: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """'Ms Park <park@school.example>'."""
        if self.name and self.email:
            return f"{self.name} <{self.email}>"
        return self.name or self.email or "(unknown)"

    @property
    def role_text(self) -> str:
        """'school (teacher, ot)'."""
        role = self.role or "not on the team"
        return f"{role} ({', '.join(self.tags)})" if self.tags else role


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str = ""
    size: int | None = None
    sha256: str = ""
    pages: int | None = None

    @property
    def facts(self) -> str:
        """'application/pdf, 12.0 KB (12,288 bytes), 3 pages' (what is known)."""
        parts = [self.content_type, human_size(self.size)]
        if self.pages is not None:
            parts.append(f"{self.pages} page" + ("" if self.pages == 1 else "s"))
        return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class Approver:
    email: str
    name: str = ""
    role: str = ""
    auth: str = ""
    at: dt.datetime | None = None

    @property
    def auth_text(self) -> str:
        if not self.auth:
            return "authentication not recorded"
        return "authenticated by " + AUTH_WORDS.get(self.auth, self.auth)

    @property
    def text(self) -> str:
        """'Dana Rivera <dana@home.example> (guardian), 2025-03-02 09:58 UTC, by DKIM ...'."""
        who = Party(self.email, self.name).text
        if self.role:
            who += f" ({self.role})"
        if self.at is not None:
            who += f", {when(self.at)}"
        return f"{who}; {self.auth_text}"


@dataclass(frozen=True)
class Redactions:
    paragraphs: tuple[str, ...] = ()  # the preview's paragraph numbers removed
    paragraph_count: int = 0
    phrases: int = 0
    attachments_dropped: tuple[str, ...] = ()  # attachment labels (A, B ...)
    attachment_count: int = 0
    always: tuple[tuple[str, int], ...] = ()  # (pattern name, count)

    @property
    def none(self) -> bool:
        return not (self.paragraph_count or self.phrases or self.attachment_count
                    or any(n for _, n in self.always))

    def lines(self) -> list[str]:
        """One line per kind of removal, or a single 'none'."""
        if self.none:
            return ["none"]
        out = []
        if self.paragraph_count:
            which = f" (paragraphs {', '.join(self.paragraphs)})" if self.paragraphs else ""
            out.append(f"{self.paragraph_count} paragraph"
                       f"{'' if self.paragraph_count == 1 else 's'} removed{which}")
        if self.phrases:
            out.append(f"{self.phrases} phrase{'' if self.phrases == 1 else 's'} redacted")
        if self.attachment_count:
            which = (f" ({', '.join(self.attachments_dropped)})"
                     if self.attachments_dropped else "")
            out.append(f"{self.attachment_count} attachment"
                       f"{'' if self.attachment_count == 1 else 's'} dropped{which}")
        for name, count in self.always:
            if count:
                out.append(f"always redacted: {words(name)} x {count}")
        return out

    @property
    def text(self) -> str:
        return "; ".join(self.lines())


@dataclass(frozen=True)
class Status:
    state: str  # sent | queued | failed | cancelled
    at: dt.datetime | None = None
    detail: str = ""  # the error, or why it was cancelled
    consent_id: int | None = None  # cancelled: the consent that was revoked

    @property
    def text(self) -> str:
        at = f" {when(self.at)}" if self.at else ""
        if self.state == "sent":
            return f"sent{at}"
        if self.state == "failed":
            return f"FAILED{at}: {self.detail or 'no error recorded'} (not delivered)"
        if self.state == "cancelled":
            consent = (f"consent #{self.consent_id} was revoked" if self.consent_id
                       else "its consent was revoked")
            why = f" ({self.detail})" if self.detail else ""
            return f"CANCELLED{at} before it was sent: {consent}{why}"
        if self.state == "queued":
            return "queued, not yet sent" + (f" (last attempt: {self.detail})"
                                             if self.detail else "")
        return self.state + (f": {self.detail}" if self.detail else "")


@dataclass(frozen=True)
class Disclosure:
    """One released copy to one recipient."""

    number: int
    date: dt.datetime
    date_kind: str  # "delivered" | "approved"
    record_id: int | None
    delivery_id: int | None
    audit_seq: int | None  # the "delivered" event, when it was delivered
    recipient: Party
    requested_by: Party  # the record's sender
    subject: str
    categories: tuple[str, ...]
    received_at: dt.datetime | None
    attachments: tuple[Attachment, ...]
    copy_sha256: str
    message_id: str
    purpose: str
    consent_id: int | None  # None: parent-directed
    approvers: tuple[Approver, ...]
    automatic: bool
    redactions: Redactions
    notices: tuple[str, ...]
    status: Status
    note: bool = False  # the parent's note went with it
    openpgp: str = ""

    @property
    def parent_directed(self) -> bool:
        return self.consent_id is None

    @property
    def basis_text(self) -> str:
        return PARENT_DIRECTED_BASIS if self.consent_id is None else f"consent #{self.consent_id}"

    @property
    def approval_lines(self) -> list[str]:
        if self.automatic:
            ref = f"consent #{self.consent_id}" if self.consent_id else "a consent on file"
            return [f"automatic under {ref} (no one was asked)"] + [
                a.text for a in self.approvers
            ]
        return [a.text for a in self.approvers] or ["not recorded"]

    @property
    def approval_text(self) -> str:
        return "; ".join(self.approval_lines)

    @property
    def document_type(self) -> str:
        return ", ".join(words(c) for c in self.categories) or "not classified"

    @property
    def sent(self) -> bool:
        return self.status.state == "sent"

    @property
    def reference(self) -> str:
        """'record #4, delivery #9, audit event seq 31': where to look it up."""
        parts = []
        if self.record_id is not None:
            parts.append(f"record #{self.record_id}")
        if self.delivery_id is not None:
            parts.append(f"delivery #{self.delivery_id}")
        if self.audit_seq is not None:
            parts.append(f"audit event seq {self.audit_seq}")
        return ", ".join(parts) or "-"


@dataclass(frozen=True)
class ChainResult:
    """`broker audit verify` over the whole log, as the report states it."""

    ok: bool
    checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str = ""

    @property
    def status(self) -> str:
        return "VERIFIED" if self.ok else "BROKEN"

    @property
    def text(self) -> str:
        if self.ok:
            return f"intact: all {self.checked} events verified, hash chain unbroken"
        return (f"broken at seq {self.first_bad_seq}: {self.reason} "
                f"({self.checked} events verified before it)")


@dataclass(frozen=True)
class Summary:
    copies: int
    releases: int  # records released (one approval, any number of recipients)
    recipients: int  # distinct addresses
    parent_directed: int
    consent_based: int
    automatic: int
    by_status: tuple[tuple[str, int], ...]

    @property
    def status_text(self) -> str:
        return ", ".join(f"{n} {state}" for state, n in self.by_status if n) or "none"

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines, the same in the HTML and the PDF."""
        def copies(n: int) -> str:
            return f"{n} cop{'y' if n == 1 else 'ies'}"

        consent = copies(self.consent_based) + (
            f", of which {self.automatic} automatic" if self.automatic else "")
        return [
            ("Copies", f"{self.copies} (one per record and recipient)"),
            ("Releases", f"{self.releases} record{'' if self.releases == 1 else 's'} "
                         "approved for release"),
            ("Recipients", f"{self.recipients} distinct "
                           f"address{'' if self.recipients == 1 else 'es'}"),
            ("Parent-directed", f"{copies(self.parent_directed)} (a guardian approved "
                                "that record)"),
            ("Under a consent", consent),
            ("Delivery status", self.status_text),
        ]


@dataclass(frozen=True)
class Report:
    child_slug: str
    child_name: str
    since: dt.date | None
    until: dt.date | None
    generated_at: dt.datetime
    chain: ChainResult
    disclosures: tuple[Disclosure, ...] = ()

    @property
    def period_text(self) -> str:
        if self.since and self.until:
            span = f"{self.since.isoformat()} to {self.until.isoformat()}"
        elif self.since:
            span = f"from {self.since.isoformat()} on"
        elif self.until:
            span = f"up to {self.until.isoformat()}"
        else:
            return "all disclosures on record"
        return f"{span} (whole UTC days, both included)"

    @property
    def summary(self) -> Summary:
        items = self.disclosures
        states = ("sent", "queued", "failed", "cancelled")
        counts = {s: sum(1 for d in items if d.status.state == s) for s in states}
        for d in items:
            if d.status.state not in counts:
                counts[d.status.state] = counts.get(d.status.state, 0) + 1
        return Summary(
            copies=len(items),
            releases=len({d.record_id if d.record_id is not None else f"#{d.number}"
                          for d in items}),
            recipients=len({d.recipient.email for d in items}),
            parent_directed=sum(1 for d in items if d.parent_directed),
            consent_based=sum(1 for d in items if not d.parent_directed),
            automatic=sum(1 for d in items if d.automatic),
            by_status=tuple(counts.items()),
        )


# -- plain data in --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordInfo:
    id: int
    sender_email: str = ""
    sender_id: int | None = None
    received_at: dt.datetime | None = None
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class PersonInfo:
    id: int | None
    email: str
    name: str = ""
    role: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConsentInfo:
    id: int
    purpose: str = ""
    status: str = "active"
    mode: str = "review"
    revoked_at: dt.datetime | None = None


@dataclass(frozen=True)
class Source:
    """One copy: the outbox row (None for events that named no delivery) and/or its
    "delivered" event (None while it has not been delivered)."""

    copy: queries.ReleaseCopy | None = None
    delivered: queries.Disclosure | None = None


@dataclass
class _Lookup:
    people_by_id: dict[int, PersonInfo] = field(default_factory=dict)
    people_by_email: dict[str, PersonInfo] = field(default_factory=dict)
    records: Mapping[int, RecordInfo] = field(default_factory=dict)
    consents: Mapping[int, ConsentInfo] = field(default_factory=dict)
    events: dict[int, list[queries.EventRow]] = field(default_factory=dict)  # by record
    revocations: dict[int, queries.EventRow] = field(default_factory=dict)  # by consent


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _strs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return tuple(str(v) for v in value if v not in (None, ""))
    return ()


def _parse_time(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, str) and value:
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return None


def parse_basis(value: Any) -> tuple[bool, int | None]:
    """'consent:3' -> (True, 3); 'parent-directed' -> (True, None); else (False, None)."""
    if not isinstance(value, str):
        return False, None
    text = value.strip().lower()
    if text == PARENT_DIRECTED:
        return True, None
    if text.startswith("consent:") and (cid := _int(text.split(":", 1)[1])) is not None:
        return True, cid
    return False, None


def _approval_for(events: Sequence[queries.EventRow], recipient: str,
                  queued_at: dt.datetime | None) -> queries.EventRow | None:
    """The approval that queued this copy: the last one naming the recipient that came
    before the copy (approval and copies are one transaction); else the last one before."""
    approvals = [e for e in events if e.action == "approved"]
    if not approvals:
        return None
    if queued_at is not None:
        before = [e for e in approvals if e.at <= queued_at + _APPROVAL_SLACK]
        approvals = before or approvals
    naming = [e for e in approvals if not e.recipients or recipient in e.recipients]
    return (naming or approvals)[-1]


def _for_delivery(events: Sequence[queries.EventRow], action: str,
                  delivery_id: int | None) -> queries.EventRow | None:
    if delivery_id is None:
        return None
    found = [e for e in events if e.action == action
             and _int(e.description.get("delivery")) == delivery_id]
    return found[-1] if found else None


def _attachments(details: Mapping[str, Any]) -> tuple[Attachment, ...]:
    detail = details.get("attachments_detail")
    if isinstance(detail, list) and detail:
        out = []
        for item in detail:
            if not isinstance(item, Mapping):
                continue
            out.append(Attachment(
                filename=str(item.get("filename") or "(no name)"),
                content_type=str(item.get("content_type") or ""),
                size=_int(item.get("size")),
                sha256=str(item.get("sha256") or ""),
                pages=_int(item.get("pages")),
            ))
        return tuple(out)
    return tuple(Attachment(filename=name) for name in _strs(details.get("attachments")))


def _redactions(details: Mapping[str, Any], approved: Mapping[str, Any]) -> Redactions:
    found: dict[str, Any] = dict(approved)
    summary = details.get("redactions")
    if isinstance(summary, Mapping):
        found.update({k: v for k, v in summary.items() if v is not None})

    def listed(value: Any) -> tuple[tuple[str, ...], int]:
        if isinstance(value, bool):
            return (), 0
        if isinstance(value, int):
            return (), value
        items = _strs(value)
        return items, len(items)

    paragraphs, paragraph_count = listed(found.get("paragraphs_removed"))
    dropped, dropped_count = listed(found.get("attachments_dropped"))
    phrases_value = found.get("phrases_removed")
    phrases = (len(phrases_value) if isinstance(phrases_value, list)
               else (_int(phrases_value) or 0))
    always_raw = found.get("always_redacted")
    always: list[tuple[str, int]] = []
    if isinstance(always_raw, Mapping):
        always = sorted((str(k), _int(v) or 0) for k, v in always_raw.items())
    return Redactions(paragraphs=paragraphs, paragraph_count=paragraph_count, phrases=phrases,
                      attachments_dropped=dropped, attachment_count=dropped_count,
                      always=tuple(always))


def _approvers(details: Mapping[str, Any], approved: queries.EventRow | None,
               look: _Lookup, automatic: bool) -> tuple[Approver, ...]:
    desc = approved.description if approved else {}
    listed: Any = None
    for source in (details, desc):
        if isinstance(source.get("approvers"), list):
            listed = source["approvers"]
            if listed:
                break
    if listed is not None or automatic:
        out = []
        for item in listed or ():
            if not isinstance(item, Mapping):
                continue
            email = str(item.get("email") or "").lower()
            person = look.people_by_email.get(email)
            out.append(Approver(
                email=email,
                name=str(item.get("name") or (person.name if person else "")),
                role=str(item.get("role") or (person.role if person else "")),
                auth=str(item.get("auth") or ""),
                at=_parse_time(item.get("at")) or (approved.at if approved else None),
            ))
        return tuple(out)
    # Released before approvers were recorded: the approving event's actor is the approver.
    if approved is not None and approved.actor_role in ("guardian", "student"):
        person = look.people_by_email.get(approved.actor.lower())
        name = person.name if person else ""
        if not name and details.get("released_by") == approved.actor:
            name = str(details.get("released_by_name") or "")
        return (Approver(email=approved.actor, name=name, role=approved.actor_role,
                         auth=str(desc.get("auth") or ""), at=approved.at),)
    released_by = str(details.get("released_by") or "")
    if "@" in released_by:
        person = look.people_by_email.get(released_by.lower())
        return (Approver(email=released_by,
                         name=str(details.get("released_by_name") or
                                  (person.name if person else "")),
                         role=person.role if person else ""),)
    return ()


def _party(email: str, name: str, look: _Lookup, person_id: int | None = None,
           role: str = "") -> Party:
    person = look.people_by_id.get(person_id) if person_id is not None else None
    if person is None and email:
        person = look.people_by_email.get(email.lower())
    return Party(
        email=email or (person.email if person else ""),
        name=name or (person.name if person else ""),
        role=role or (person.role if person else ""),
        tags=person.tags if person else (),
    )


def _status(copy: queries.ReleaseCopy | None, delivered: queries.Disclosure | None,
            events: Sequence[queries.EventRow], consent_id: int | None,
            look: _Lookup) -> Status:
    if delivered is not None:
        return Status("sent", (copy.sent_at if copy and copy.sent_at else delivered.at))
    assert copy is not None
    if copy.state == "sent":
        return Status("sent", copy.sent_at)
    if copy.state == "failed":
        failed = _for_delivery(events, "delivery_failed", copy.id)
        error = copy.last_error or (str(failed.description.get("error") or "") if failed else "")
        return Status("failed", failed.at if failed else None, error)
    if copy.state == "cancelled":
        event = _for_delivery(events, "delivery_cancelled", copy.id)
        desc = event.description if event else {}
        cid = _int(desc.get("consent")) or copy.consent_id or consent_id
        consent = look.consents.get(cid) if cid is not None else None
        revocation = look.revocations.get(cid) if cid is not None else None
        at = (event.at if event else revocation.at if revocation
              else consent.revoked_at if consent else None)
        why = []
        if revocation is not None:
            why.append(f"by {revocation.actor}")
            reason = str(revocation.description.get("reason") or "")
            if reason and reason.strip().lower() not in _PLAIN_REVOKED:
                why.append(reason)
        reason = str(desc.get("reason") or "")
        if reason and reason.strip().lower() not in _PLAIN_REVOKED and reason not in why:
            why.append(reason)
        return Status("cancelled", at, ": ".join(why), cid)
    return Status(copy.state, None, copy.last_error)


def _disclosure(number: int, src: Source, look: _Lookup) -> Disclosure:
    copy, delivered = src.copy, src.delivered
    details: dict[str, Any] = {}
    if copy is not None:
        details.update(copy.summary)
    if delivered is not None:
        details.update(delivered.details)
    record_id = (copy.record_id if copy is not None else None) or (
        delivered.record_id if delivered is not None else None)
    events = look.events.get(record_id, []) if record_id is not None else []
    record = look.records.get(record_id) if record_id is not None else None
    recipient_email = (copy.recipient if copy is not None else delivered.recipient
                       if delivered is not None else "")
    approved = _approval_for(events, recipient_email,
                             copy.created_at if copy is not None
                             else delivered.at if delivered is not None else None)
    adesc: Mapping[str, Any] = approved.description if approved else {}

    # Basis: what the copy says, what the approval says for this recipient, the outbox row.
    known, consent_id = parse_basis(details.get("basis"))
    if not known:
        per = adesc.get("basis")
        if isinstance(per, Mapping):
            known, consent_id = parse_basis(per.get(recipient_email))
    if not known:
        consent_id = (copy.consent_id if copy is not None else None) or _int(
            details.get("consent_id"))
    consent = look.consents.get(consent_id) if consent_id is not None else None
    purpose = str(details.get("purpose") or "") or (consent.purpose if consent else "")
    if not purpose:
        purpose = PARENT_DIRECTED_PURPOSE if consent_id is None else "not recorded"
    automatic = bool(details.get("automatic") or adesc.get("automatic"))

    sender_email = str(details.get("sender") or (record.sender_email if record else ""))
    requested_by = _party(sender_email, str(details.get("sender_name") or ""), look,
                          record.sender_id if record else None,
                          str(details.get("sender_role") or ""))
    recipient = _party(recipient_email, str(details.get("recipient_name") or ""), look,
                       copy.person_id if copy is not None else None)
    categories = (_strs(details.get("categories")) or _strs(adesc.get("categories"))
                  or (record.categories if record else ()))
    received_at = _parse_time(details.get("received_at")) or (
        record.received_at if record else None)
    notices = _strs(details.get("notices")) or _strs(adesc.get("notices"))
    status = _status(copy, delivered, events, consent_id, look)
    if delivered is not None:
        date, date_kind = status.at or delivered.at, "delivered"
    else:
        assert copy is not None
        date, date_kind = (approved.at if approved else copy.created_at), "approved"
    return Disclosure(
        number=number,
        date=date,
        date_kind=date_kind,
        record_id=record_id,
        delivery_id=copy.id if copy is not None else (
            delivered.delivery_id if delivered is not None else None),
        audit_seq=delivered.seq if delivered is not None else None,
        recipient=recipient,
        requested_by=requested_by,
        subject=str(details.get("subject") or ""),
        categories=categories,
        received_at=received_at,
        attachments=_attachments(details),
        copy_sha256=(copy.sha256 if copy is not None else "") or str(details.get("sha256") or ""),
        message_id=(copy.message_id if copy is not None else "") or str(
            details.get("message_id") or ""),
        purpose=purpose,
        consent_id=consent_id,
        approvers=_approvers(details, approved, look, automatic),
        automatic=automatic,
        redactions=_redactions(details, adesc),
        notices=notices,
        status=status,
        note=bool(adesc.get("note") or details.get("note") or (
            isinstance(details.get("redactions"), Mapping)
            and details["redactions"].get("note"))),
        openpgp=str(details.get("openpgp") or ""),
    )


def build_report(
    *,
    child_slug: str,
    child_name: str,
    since: dt.date | None,
    until: dt.date | None,
    generated_at: dt.datetime,
    chain: ChainResult,
    sources: Iterable[Source],
    people: Iterable[PersonInfo] = (),
    records: Mapping[int, RecordInfo] | None = None,
    consents: Mapping[int, ConsentInfo] | None = None,
    events: Iterable[queries.EventRow] = (),
) -> Report:
    """The report from plain data; the disclosures come out oldest first, numbered."""
    look = _Lookup(records=records or {}, consents=consents or {})
    for p in people:
        if p.id is not None:
            look.people_by_id[p.id] = p
        look.people_by_email.setdefault(p.email.lower(), p)
    for e in sorted(events, key=lambda e: e.seq):
        if e.action == "consent_revoked":
            if (cid := _int(e.description.get("consent"))) is not None:
                look.revocations[cid] = e
        elif e.record_id is not None:
            look.events.setdefault(e.record_id, []).append(e)
    built = [_disclosure(0, src, look) for src in sources]
    built.sort(key=lambda d: (d.date, d.record_id or 0, d.delivery_id or 0, d.audit_seq or 0))
    numbered = tuple(replace(d, number=i) for i, d in enumerate(built, start=1))
    return Report(child_slug=child_slug, child_name=child_name, since=since, until=until,
                  generated_at=generated_at, chain=chain, disclosures=numbered)


# -- the database ---------------------------------------------------------------------------


class UnknownChild(LookupError):
    def __init__(self, slug: str, known: Sequence[str]) -> None:
        self.slug = slug
        self.known = tuple(known)
        super().__init__(f"no child {slug!r} (known: {', '.join(known) or 'none yet'})")


def chain_result(s: Session) -> ChainResult:
    """Walks the whole log (as `broker audit verify` does) and reads the head."""
    verdict = verify_log(s)
    head = s.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
    return ChainResult(ok=verdict.ok, checked=verdict.checked, head_seq=head.seq,
                       head_hash=head.hash, first_bad_seq=verdict.first_bad_seq,
                       reason=verdict.reason)


def _categories(policy: str | None) -> tuple[str, ...]:
    try:
        data = json.loads(policy or "{}")
    except (TypeError, ValueError):
        return ()
    return _strs(data.get("categories")) if isinstance(data, dict) else ()


def _batched(ids: Iterable[int], size: int = queries.SUMMARY_BATCH) -> Iterable[list[int]]:
    unique = sorted(set(ids))
    for i in range(0, len(unique), size):
        yield unique[i : i + size]


def load_report(
    s: Session,
    child_slug: str,
    since: dt.date | None = None,
    until: dt.date | None = None,
    *,
    now: dt.datetime | None = None,
) -> Report:
    """Every release copy of this child dated in the period: delivered ones by their
    "delivered" event, the others (queued, failed, cancelled) by when they were queued."""
    child = s.execute(
        select(Child.id, Child.name).where(Child.slug == child_slug)
    ).one_or_none()
    if child is None:
        raise UnknownChild(child_slug, queries.child_slugs(s))
    delivered = queries.disclosures(s, child_slug, since, until)
    named = [d.delivery_id for d in delivered if d.delivery_id is not None]
    sent_copies = {c.id: c for c in queries.release_copies(s, ids=named)} if named else {}
    sources = [Source(copy=sent_copies.get(d.delivery_id or -1), delivered=d)
               for d in delivered]
    seen = set(named)
    sources += [
        Source(copy=c)
        for c in queries.release_copies(s, child_id=child.id, states=UNSENT,
                                        since=since, until=until)
        if c.id not in seen
    ]

    record_ids = {rid for src in sources
                  if (rid := (src.copy.record_id if src.copy else None)
                      or (src.delivered.record_id if src.delivered else None)) is not None}
    records: dict[int, RecordInfo] = {}
    for chunk in _batched(record_ids):
        for row in s.execute(
            select(Record.id, Record.sender_email, Record.sender_id, Record.received_at,
                   Record.policy).where(Record.id.in_(chunk))
        ):
            records[row.id] = RecordInfo(row.id, row.sender_email, row.sender_id,
                                         row.received_at, _categories(row.policy))
    events = queries.record_events(s, sorted(record_ids), RECORD_ACTIONS) if record_ids else []
    if any(src.copy is not None and src.copy.state == "cancelled" for src in sources):
        events += queries.child_actions(s, child_slug, ("consent_revoked",))

    people = [
        PersonInfo(p.id, p.email, p.name, p.role, _strs(_load_list(p.tags)))
        for p in s.execute(
            select(Person.id, Person.email, Person.name, Person.role, Person.tags)
            .where(Person.child_id == child.id).order_by(Person.id)
        )
    ]

    consent_ids: set[int] = set()
    for src in sources:
        if src.copy is not None and src.copy.consent_id is not None:
            consent_ids.add(src.copy.consent_id)
        for details in (src.copy.summary if src.copy else {},
                        src.delivered.details if src.delivered else {}):
            if (cid := parse_basis(details.get("basis"))[1]) is not None:
                consent_ids.add(cid)
            if (cid := _int(details.get("consent_id"))) is not None:
                consent_ids.add(cid)
    for e in events:
        if e.action == "delivery_cancelled" and (cid := _int(e.description.get("consent"))):
            consent_ids.add(cid)
        basis = e.description.get("basis")
        if isinstance(basis, Mapping):
            consent_ids.update(c for v in basis.values() if (c := parse_basis(v)[1]) is not None)
    consents: dict[int, ConsentInfo] = {}
    for chunk in _batched(consent_ids):
        for row in s.execute(
            select(Consent.id, Consent.purpose, Consent.status, Consent.mode,
                   Consent.revoked_at).where(Consent.id.in_(chunk))
        ):
            consents[row.id] = ConsentInfo(row.id, row.purpose, row.status, row.mode,
                                           row.revoked_at)

    return build_report(
        child_slug=child_slug,
        child_name=child.name,
        since=since,
        until=until,
        generated_at=now or utcnow(),
        chain=chain_result(s),
        sources=sources,
        people=people,
        records=records,
        consents=consents,
        events=events,
    )


def _load_list(text: str | None) -> list[Any]:
    try:
        value = json.loads(text or "[]")
    except (TypeError, ValueError):
        return []
    return value if isinstance(value, list) else []
