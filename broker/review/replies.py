"""A guardian's reply: matched by token, checked (who, which token, authenticated),
read into commands, and turned into a decision. Runs inside the pipeline's
transaction for the inbound message.

Every outcome is audited. Nothing here releases unless a live token of the record,
the From address of one of that child's guardians, reply authentication and an
APPROVE that parsed cleanly all agree.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import parseaddr

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit.log import queued_events, record_event
from broker.consents.manage import revoke_consent
from broker.content.codec import (
    document_from_bytes,
    draft_from_bytes,
    draft_to_bytes,
)
from broker.crypto.outbound import withheld
from broker.db.models import (
    Approval,
    AuditEvent,
    Consent,
    Delivery,
    Inbound,
    Person,
    Record,
    Token,
    utcnow,
)
from broker.mail import compose as mc
from broker.mail.autoreply import classify_automatic
from broker.mail.document import Document, Draft
from broker.mail.reply import extract_reply_from_message
from broker.policy.authority import Authority, Decider
from broker.policy.context import active_people, authority_for, evaluation_of, record_audience
from broker.policy.recipients import default_recipients
from broker.policy.rules import Rules
from broker.records import states
from broker.records.transitions import transition
from broker.redact.text import RedactionError, apply_draft
from broker.release.approve import draft_counts, release
from broker.review import render, tokens
from broker.review.authenticate import authenticate_reply
from broker.review.commands import Help, ParseResult, Revoke, parse_commands
from broker.review.decisions import (
    Invalid,
    Preview,
    Refuse,
    Release,
    ShowHelp,
    Team,
    TeamMember,
    apply_commands,
)
from broker.review.notify import Notifier, as_shown, guardians
from broker.runtime import Runtime

log = logging.getLogger(__name__)


def handle_reply(
    s: Session,
    rt: Runtime,
    notifier: Notifier,
    inbound: Inbound,
    msg: EmailMessage,
    mail_from: str,
    candidate_tokens: list[str],
) -> None:
    from_addr = parseaddr(str(msg.get("From", "")))[1].strip().lower()
    subject = " ".join(str(msg.get("Subject", "")).split())

    def audit(action: str, record: Record | None, **desc: object) -> None:
        record_event(
            s, action=action, actor=from_addr or "<>", actor_role=role, child=(
                record.child.slug if record else ""),
            record_id=record.id if record else None,
            # No subject (content; the audit can never be re-encrypted): the inbound id.
            description={"inbound": inbound.id, **desc},
        )

    role = "unknown"
    automatic = classify_automatic(msg, mail_from)
    found = [(c, t) for c in candidate_tokens if (t := tokens.find(s, c)) is not None]
    rows = [t for _, t in found]
    records = {t.record_id for t in rows}
    record = s.get(Record, rows[0].record_id) if len(records) == 1 else None

    if automatic:
        inbound.outcome = f"automatic reply ignored: {automatic}"
        audit("reply_ignored", record, reason=f"automatic: {automatic}")
        return
    if len(records) > 1:
        inbound.outcome = "refused: tokens of different records"
        audit("reply_refused", None, reason="tokens of different records in one reply")
        return
    if record is None:
        inbound.outcome = "refused: no known token"
        audit("reply_refused", None, reason="unknown_token")
        _tell_stranger_guardian(s, notifier, from_addr, subject)
        return
    inbound.child_id = record.child_id
    inbound.record_id = record.id
    token_text, token = found[0]
    child = record.child

    guardian = next((p for p in active_people(s, child) if p.email == from_addr
                     and p.role in ("guardian", "student")), None)
    if guardian is None:
        inbound.outcome = "refused: not a guardian of this child"
        audit("reply_refused", record, reason="not_guardian", sender=from_addr)
        for g in record_audience(s, rt.rules, record):
            notifier.notice(s, child, g, "refused", render.render_refused(
                child_name=child.name, record_id=record.id, reason="not_guardian",
                from_addr=from_addr or "(no address)", subject=subject,
                received_at=inbound.received_at), subject=record.subject, record=record)
        return
    role = guardian.role
    ev = evaluation_of(record)
    # Who decides is evaluated now, at the decision, never at intake (birthdays).
    authority = authority_for(s, rt.rules, child, ev.categories if ev else ())
    if authority.decider(from_addr) is None and token.purpose != "fyi":
        inbound.outcome = "refused: not one of the people who decide this record"
        audit("reply_refused", record, reason="not_decider", sender=from_addr)
        notifier.notice(s, child, guardian, "refused", render.render_refused(
            child_name=child.name, record_id=record.id, reason="not_decider",
            from_addr=from_addr, subject=subject, received_at=inbound.received_at,
            detail="; ".join(authority.reasons)), subject=record.subject, record=record)
        return

    stale = _stale(token, record)
    if stale:
        inbound.outcome = f"refused: token {stale}"
        audit("reply_refused", record, reason=stale)
        notifier.notice(s, child, guardian, "refused", render.render_refused(
            child_name=child.name, record_id=record.id, reason=stale, from_addr=from_addr,
            subject=subject, received_at=inbound.received_at), subject=record.subject,
            record=record)
        return

    # Signatures are over the bytes as received: read them back from the content store
    # rather than re-serialising the parsed message.
    auth = authenticate_reply(msg, guardian, rt.settings, raw=rt.content.get(inbound.raw_ref, s),
                              peer=inbound.peer)
    if not auth.ok:
        inbound.outcome = f"refused: authentication failed ({auth.detail})"
        # At most one such notice per record per hour: a forger retrying must not turn
        # the broker into a mail cannon aimed at the guardians. Every attempt is audited.
        quiet = _auth_failure_noticed_recently(s, record)
        audit("reply_refused", record, reason="auth_failed", method=auth.method,
              detail=auth.detail, guardians_notified=not quiet)
        if quiet:
            return
        for g in record_audience(s, rt.rules, record):
            notifier.notice(s, child, g, "refused", render.render_refused(
                child_name=child.name, record_id=record.id, reason="auth_failed",
                from_addr=from_addr, subject=subject, received_at=inbound.received_at,
                detail=auth.detail), subject=record.subject, record=record)
        return

    # pgp mode: commands are read only from what the guardian's key signed.
    reply = extract_reply_from_message(auth.message if auth.message is not None else msg)
    parsed = parse_commands(reply.text)
    # Help and "not understood" answers keep the same live token, so the guardian can
    # simply answer them with the commands.
    review_to = mc.review_address(token_text, rt.settings.domain)
    if parsed.problems:
        inbound.outcome = "not understood; nothing changed"
        # A count: each parse problem quotes a line of the reply (content, never audited).
        audit("reply_not_understood", record, problems=len(parsed.problems),
              auth=auth.method)
        notifier.notice(s, child, guardian, "not_understood", render.render_not_understood(
            child_name=child.name, record_id=record.id, problems=tuple(parsed.problems)),
            subject=record.subject, record=record, reply_to=review_to)
        return

    if token.purpose == "fyi":
        _answer_fyi(s, rt, notifier, inbound, record, guardian, parsed, auth.method, audit)
        return

    doc = document_from_bytes(rt.content.get(record.doc_ref or "", s),
                              get_blob=lambda ref: rt.content.get(ref, s))
    draft = (draft_from_bytes(rt.content.get(record.draft_ref, s)) if record.draft_ref
             else Draft())
    team_people = active_people(s, child)
    team = Team(members=tuple(
        TeamMember(email=p.email, name=p.name, role=p.role,
                   tags=tuple(json.loads(p.tags or "[]")))
        for p in team_people if p.role in ("provider", "school")
    ), sender=record.sender_email)
    decision = apply_commands(doc, draft, parsed.commands, team)

    if isinstance(decision, ShowHelp):
        inbound.outcome = "help sent"
        audit("help_sent", record, auth=auth.method)
        notifier.notice(s, child, guardian, "help",
                        render.render_help(child_name=child.name, record_id=record.id),
                        subject=record.subject, record=record, reply_to=review_to)
    elif isinstance(decision, Invalid):
        inbound.outcome = "not understood; nothing changed"
        audit("reply_not_understood", record, problems=list(decision.problems),
              auth=auth.method)
        notifier.notice(s, child, guardian, "not_understood", render.render_not_understood(
            child_name=child.name, record_id=record.id, problems=tuple(decision.problems)),
            subject=record.subject, record=record, reply_to=review_to)
    elif isinstance(decision, Refuse):
        if authority.can_veto(from_addr):
            _deny(s, rt.rules, notifier, record, guardian, auth.method)
            inbound.outcome = "denied"
        else:
            _note_decision(s, record, guardian, "deny", auth.method)
            inbound.outcome = "refusal recorded; the release still waits for this person"
            audit("refusal_recorded", record, auth=auth.method, version=record.version)
            notifier.notice(s, child, guardian, "status", render.render_status(
                child_name=child.name, record_id=record.id, lines=(
                    "Your refusal is recorded. Nothing is sent without your approval, so "
                    "this record stays unshared unless you reply APPROVE later.",)),
                subject=record.subject, record=record, reply_to=review_to)
    elif isinstance(decision, Preview | Release):
        try:
            if isinstance(decision, Preview):
                _preview(s, rt, notifier, record, doc, decision, guardian, team_people,
                         auth.method, authority)
                inbound.outcome = f"preview v{record.version} sent"
            else:
                inbound.outcome = _approve(s, rt, notifier, record, doc, decision.draft,
                                           guardian, team_people, token, auth.method,
                                           authority, review_to)
        except RedactionError:
            # The redactor could not prove a phrase gone from what would be sent: refuse
            # to preview or release rather than risk it. Nothing has changed yet.
            problem = ("A phrase you asked to remove could not be removed safely from "
                       "everything that would be sent. Nothing was changed: remove the "
                       "paragraphs (REDACT 2) or leave the attachment out (DROP A1) instead.")
            inbound.outcome = "not understood; redaction could not be verified"
            audit("reply_not_understood", record, problems=["redaction not verifiable"],
                  auth=auth.method)
            notifier.notice(s, child, guardian, "not_understood", render.render_not_understood(
                child_name=child.name, record_id=record.id, problems=(problem,)),
                subject=record.subject, record=record, reply_to=review_to)
    else:  # pragma: no cover - apply_commands returns only the types above
        raise TypeError(f"unexpected decision {decision!r}")


AUTH_FAILED_NOTICE_INTERVAL = dt.timedelta(hours=1)


def _auth_failure_noticed_recently(s: Session, record: Record) -> bool:
    """True when the guardians were told of a failed authentication on this record
    within the last AUTH_FAILED_NOTICE_INTERVAL (from the audit log)."""
    since = utcnow() - AUTH_FAILED_NOTICE_INTERVAL
    rows = s.scalars(select(AuditEvent.description).where(
        AuditEvent.record_id == record.id, AuditEvent.action == "reply_refused",
        AuditEvent.at >= since))
    descriptions: list[dict] = []
    for text in rows:
        try:
            descriptions.append(json.loads(text or "{}"))
        except ValueError:
            continue
    # ...and this transaction's own refusals, not yet in the table.
    descriptions += [e.description for e in queued_events(s) if e.record_id == record.id
                     and e.action == "reply_refused" and e.at >= since]
    for desc in descriptions:
        if desc.get("reason") == "auth_failed" and desc.get("guardians_notified", True):
            return True
    return False


def _stale(token: Token, record: Record) -> str | None:
    if token.status == "used":
        return "used"
    if token.status == "superseded":
        return "superseded"
    if token.status != "live" or token.expires_at <= utcnow():
        return "expired"
    if token.purpose == "fyi":
        return None  # answers a record already released: only REVOKE means anything
    if record.state not in states.OPEN:
        return "used"
    return None


def _tell_stranger_guardian(s: Session, notifier: Notifier, from_addr: str, subject: str) -> None:
    """Only a registered guardian is ever answered about an unknown token."""
    if not from_addr:
        return
    person = s.scalar(select(Person).where(Person.email == from_addr, Person.role == "guardian",
                                           Person.active.is_(True)).limit(1))
    if person is None:
        return
    notifier.notice(s, person.child, person, "refused", render.render_refused(
        child_name=person.child.name, record_id=None, reason="unknown_token",
        from_addr=from_addr, subject=subject, received_at=utcnow()), subject=subject)


def _recipients(record: Record, draft: Draft, team_people: list[Person]) -> list[Person]:
    members = [p for p in team_people if p.role in ("provider", "school")]
    if draft.recipients is not None:
        wanted = {e.lower() for e in draft.recipients}
        return [p for p in members if p.email in wanted]
    ev = evaluation_of(record)
    if ev is not None:
        suggested = set(ev.recipients)
        return [p for p in members if p.email in suggested]
    sender_role = next((p.role for p in team_people if p.id == record.sender_id), "")
    chosen = default_recipients(sender_role, members)
    return [p for p in chosen if p.email != record.sender_email]


def _deny(s: Session, rules: Rules, notifier: Notifier, record: Record, guardian: Person,
          auth: str) -> None:
    tokens.close_all(s, record, "used")
    record.decided_at = utcnow()
    record.decided_by = guardian.email
    transition(s, record, states.DENIED, actor=guardian.email, actor_role=guardian.role,
               description={"auth": auth})
    for g in record_audience(s, rules, record):
        notifier.notice(s, record.child, g, "decided_denied", render.render_decided(
            child_name=record.child.name, record_id=record.id, subject=record.subject,
            decision="denied", decided_by=guardian.name or guardian.email,
            decided_at=record.decided_at), subject=record.subject, record=record)


def _preview(
    s: Session, rt: Runtime, notifier: Notifier, record: Record, doc: Document,
    decision: Preview, guardian: Person, team_people: list[Person], auth: str,
    authority: Authority,
) -> None:
    content = apply_draft(doc, decision.draft)
    recipients = _recipients(record, decision.draft, team_people)
    record.draft_ref = rt.content.put(draft_to_bytes(decision.draft), s)
    record.version += 1
    token = tokens.issue(s, record, record.expires_at or utcnow())
    # When several people must approve, all of them see (and approve) the new version:
    # the new token replaces the one in their review request.
    shown_to = [guardian]
    if len(authority.deciders) > 1 and _needs_several(authority):
        by_id = {p.id: p for p in team_people}
        shown_to += [by_id[d.person_id] for d in authority.deciders
                     if d.person_id in by_id and d.person_id != guardian.id]
    for seq, person in enumerate(shown_to):
        notifier.preview(s, record, content, token, recipients, person,
                         decision.also_approved and person.id == guardian.id, seq=seq)
    transition(s, record, states.AWAITING_REVIEW, actor=guardian.email, actor_role=guardian.role,
               action="preview", recipients=[p.email for p in shown_to],
               # Counts only: the change list quotes removed phrases, filenames and notes.
               description={"version": record.version,
                            **draft_counts(decision.draft), "auth": auth})


def _needs_several(authority: Authority) -> bool:
    return len(authority.groups) > 1 or any(g.need == "all" for g in authority.groups)


def _note_decision(s: Session, record: Record, person: Person, decision: str, auth: str) -> None:
    """One decider's word on the current version (approvals table)."""
    row = s.scalar(select(Approval).where(Approval.record_id == record.id,
                                          Approval.version == record.version,
                                          Approval.person_id == person.id))
    if row is None:
        s.add(Approval(record_id=record.id, version=record.version, person_id=person.id,
                       decision=decision, auth=auth[:80], at=utcnow()))
    else:
        row.decision, row.auth, row.at = decision, auth[:80], utcnow()
    s.flush()


def _approvals(s: Session, record: Record) -> list[tuple[Approval, Person]]:
    return list(s.execute(
        select(Approval, Person).join(Person, Person.id == Approval.person_id)
        .where(Approval.record_id == record.id, Approval.version == record.version,
               Approval.decision == "approve").order_by(Approval.at, Approval.id)).all())


def _approve(
    s: Session, rt: Runtime, notifier: Notifier, record: Record, doc: Document, draft: Draft,
    guardian: Person, team_people: list[Person], token: Token, auth: str,
    authority: Authority, review_to: str,
) -> str:
    if token.version != record.version:
        # Approving an older version than the newest preview would release something the
        # parent has since changed; the token check above makes this unreachable.
        raise AssertionError("approval of a superseded version")
    child = record.child
    recipients = _recipients(record, draft, team_people)
    if not recipients:
        notifier.notice(s, child, guardian, "not_understood",
                        render.render_not_understood(
                            child_name=child.name, record_id=record.id,
                            problems=("There is nobody to release this to. Reply with "
                                      "TO and the team members who should get it.",)),
                        subject=record.subject, record=record)
        record_event(s, action="reply_not_understood", actor=guardian.email,
                     actor_role=guardian.role, child=child.slug, record_id=record.id,
                     description={"problems": ["no recipients"]})
        return "not released: no recipients"
    blocked = [(p, why) for p in recipients if (why := withheld(p))]
    if blocked:
        # A member who must never receive plaintext has no usable key: releasing to the
        # others only would send something other than what was approved, so nothing is
        # released; the token stays live so the guardian can answer with TO (or the
        # operator fixes the key and the guardian approves again).
        names = [f"{p.name} <{p.email}> {why}" for p, why in blocked]
        notifier.notice(s, child, guardian, "not_understood",
                        render.render_not_understood(
                            child_name=child.name, record_id=record.id,
                            problems=tuple(f"Not released: {n}, so they cannot be sent this "
                                           "record. Reply with TO and the other team members, "
                                           "or ask the operator to fix the key, then APPROVE."
                                           for n in names)),
                        subject=record.subject, record=record)
        record_event(s, action="reply_not_understood", actor=guardian.email,
                     actor_role=guardian.role, child=child.slug, record_id=record.id,
                     recipients=[p.email for p, _ in blocked],
                     description={"problems": ["recipient requires encryption, no usable key"],
                                  "blocked": [f"{p.email} {why}" for p, why in blocked]})
        return "not released: a recipient requires encryption and has no usable key"
    if authority.blocked:
        notifier.notice(s, child, guardian, "not_understood", render.render_not_understood(
            child_name=child.name, record_id=record.id, problems=(
                f"Not released: {authority.blocked}. Ask the operator to add the student's "
                "address to the team file; nothing is sent until the student can answer.",)),
            subject=record.subject, record=record)
        record_event(s, action="reply_not_understood", actor=guardian.email,
                     actor_role=guardian.role, child=child.slug, record_id=record.id,
                     description={"problems": ["co-consent required, no student address"]})
        return "not released: co-consent required and no student address"

    _note_decision(s, record, guardian, "approve", auth)
    approved = _approvals(s, record)
    waiting = authority.waiting_for({p.email for _, p in approved})
    if waiting:
        missing = authority.missing({p.email for _, p in approved})
        record_event(s, action="approval_recorded", actor=guardian.email,
                     actor_role=guardian.role, child=child.slug, record_id=record.id,
                     description={"version": record.version, "auth": auth,
                                  "waiting_for": [d.email for d in missing]})
        _ask_missing(s, rt, notifier, record, doc, draft, team_people, missing)
        notifier.notice(s, child, guardian, "status", render.render_status(
            child_name=child.name, record_id=record.id, lines=(
                "Your approval is recorded. Nothing is sent yet: it also waits for "
                + ", ".join(f"{d.name or d.email} ({d.role})" for d in missing) + ".",)),
            subject=record.subject, record=record, reply_to=review_to)
        return "approval recorded; waiting for " + ", ".join(d.email for d in missing)

    approvers = [{"email": p.email, "name": p.name, "role": p.role, "auth": a.auth,
                  "at": a.at.isoformat()} for a, p in approved]
    release(s, rt, notifier, record, doc, draft, recipients, approvers=approvers,
            actor=guardian.email, actor_role=guardian.role, auth=auth)
    names = ", ".join(a["name"] or a["email"] for a in approvers)
    for g in record_audience(s, rt.rules, record):
        notifier.notice(s, child, g, "decided_released", render.render_decided(
            child_name=child.name, record_id=record.id, subject=record.subject,
            decision="released", decided_by=names, decided_at=record.decided_at,
            recipients=as_shown(recipients)), subject=record.subject, record=record)
    return f"approved; {len(recipients)} copies queued"


def _ask_missing(s: Session, rt: Runtime, notifier: Notifier, record: Record, doc: Document,
                 draft: Draft, team_people: list[Person], missing: list[Decider]) -> None:
    """Send the current version to deciders who have not been sent it yet (a student who
    gained a say after the record arrived): a fresh token, so everyone answers the same."""
    asked = set(s.scalars(select(Delivery.person_id).where(
        Delivery.record_id == record.id, Delivery.kind.in_(("review", "preview")))))
    by_id = {p.id: p for p in team_people}
    new = [by_id[d.person_id] for d in missing
           if d.person_id not in asked and d.person_id in by_id]
    if not new:
        return
    content = apply_draft(doc, draft)
    recipients = _recipients(record, draft, team_people)
    token = tokens.issue(s, record, record.expires_at or utcnow())
    # issue() superseded the token the others hold: they get the same version again.
    everyone = [by_id[p] for p in asked if p in by_id] + new
    for seq, person in enumerate(everyone):
        notifier.preview(s, record, content, token, recipients, person, False,
                         seq=100 + seq)
    record_event(s, action="review_requested", actor="broker", actor_role="broker",
                 child=record.child.slug, record_id=record.id,
                 recipients=[p.email for p in everyone],
                 description={"version": record.version, "reason": "a new decider",
                              "new": [p.email for p in new]})


def _answer_fyi(s: Session, rt: Runtime, notifier: Notifier, inbound: Inbound, record: Record,
                person: Person, parsed: ParseResult, auth: str,
                audit: Callable[..., None]) -> None:
    """The answer to the FYI copy of an automatic release: REVOKE (or HELP)."""
    child = record.child
    consent_id = s.scalar(select(Delivery.consent_id).where(
        Delivery.record_id == record.id, Delivery.kind == "release",
        Delivery.consent_id.is_not(None)).limit(1))
    consent = s.get(Consent, consent_id) if consent_id else None
    kinds = {type(c) for c in parsed.commands}
    if kinds == {Help}:
        inbound.outcome = "help sent"
        audit("help_sent", record, auth=auth)
        notifier.notice(s, child, person, "help",
                        render.render_help(child_name=child.name, record_id=record.id),
                        subject=record.subject, record=record)
        return
    if kinds != {Revoke} or consent is None or person.role != "guardian":
        inbound.outcome = "not understood; nothing changed"
        audit("reply_not_understood", record, problems=["fyi answer without REVOKE"], auth=auth)
        notifier.notice(s, child, person, "not_understood", render.render_not_understood(
            child_name=child.name, record_id=record.id, problems=(
                "This record was already shared under a consent on file; it cannot be "
                "approved or denied any more. To stop the consent it went out under, reply "
                "with the single word REVOKE (guardians only).",)),
            subject=record.subject, record=record)
        return
    if consent.status == "revoked":
        inbound.outcome = "consent already revoked"
        audit("reply_ignored", record, reason="consent already revoked", consent=consent.id)
        return
    result = revoke_consent(s, rt, consent, actor=person.email, actor_role="guardian",
                            reason="revoked by reply to an automatic-release copy")
    tokens.close_all(s, record, "used")
    inbound.outcome = f"consent {consent.id} revoked"
    for g in guardians(s, child):
        notifier.notice(s, child, g, "status", render.render_status(
            child_name=child.name, record_id=record.id, lines=(
                f"Consent #{consent.id} ({consent.purpose}) is revoked, by "
                f"{person.name or person.email}. {len(result.cancelled)} queued "
                f"cop{'y' if len(result.cancelled) == 1 else 'ies'} stopped; "
                f"{result.delivered} already delivered cannot be recalled. New records "
                "are held for your review.",)),
            subject=record.subject, record=record)
