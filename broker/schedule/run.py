"""One run of the scheduler: expire due holds, then send whatever `due.due` says has come
and `sent_reminders` does not yet hold.

Each occasion's key is inserted in a savepoint of the same transaction as its notices and
its audit event: all of them commit together or not at all, and a key another run already
holds (a unique violation) skips that occasion alone. Runs in several processes on one
PostgreSQL are serialised by the audit head lock, taken before anything is decided, so
they never deadlock on each other's keys; SQLite's write lock does the same there.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.audit.log import record_event
from broker.crypto.keys import broker_private_key
from broker.db.models import (
    Approval,
    AuditHead,
    Child,
    Consent,
    Delivery,
    Person,
    Record,
    SentReminder,
    utcnow,
)
from broker.mail import compose as mc
from broker.policy.context import record_audience
from broker.policy.evaluate import jurisdiction_of
from broker.policy.rules import Rules
from broker.records import states
from broker.records.expiry import expire_due
from broker.review import tokens
from broker.review.notify import Notifier, guardians
from broker.runtime import Runtime
from broker.schedule import texts
from broker.schedule.due import ChildInfo, ConsentInfo, Due, HeldRecord, due

log = logging.getLogger(__name__)

# The audit action of each kind of occasion.
ACTIONS = {
    "hold": "reminder_sent",
    "consent-renewal": "consent_renewal_notice",
    "consent-expired": "consent_expired",
    "majority-notice": "majority_notice",
    "majority": "majority_reached",
}
KEY_BATCH = 500
ACTOR = "broker"


def run_schedule(rt: Runtime, now: dt.datetime | None = None) -> int:
    """Expire due holds (`expire_due`) and send every reminder and
    notice due by `now` (default: the real clock) that was not sent before. Returns how
    many holds expired plus how many occasions were handled (0: nothing to do)."""
    now = _aware(now or utcnow())
    done = expire_due(rt, now=now)
    # Mostly there is nothing to do: find that out without taking the write lock.
    with rt.db.read_session() as s:
        if not pending(s, rt.rules, now):
            return done
    notifier = Notifier(rt.content, rt.settings.domain,
                        signer=broker_private_key(rt.settings.home))
    with rt.db.session() as s:
        # One scheduler at a time: another process's run commits (or rolls back) before
        # this one looks, so it sees that run's keys instead of waiting on them. What is
        # sent is decided from what this session reads after the lock.
        s.execute(select(AuditHead.id).where(AuditHead.id == 1).with_for_update())
        handled = 0
        for item in pending(s, rt.rules, now):
            if not _claim(s, item.key):
                continue
            _ACT[item.kind](s, rt, notifier, item, now)
            handled += 1
    if handled:
        log.info("scheduler: %d reminder(s)/notice(s) handled", handled)
    return done + handled


def pending(s: Session, rules: Rules, now: dt.datetime) -> list[Due]:
    """What is due by `now` and not yet in sent_reminders, from the database as it is."""
    records = [HeldRecord(*row) for row in s.execute(
        select(Record.id, Record.child_id, Record.state, Record.received_at, Record.expires_at)
        .where(Record.state.in_(states.OPEN)).order_by(Record.id))]
    consents = [ConsentInfo(*row) for row in s.execute(
        select(Consent.id, Consent.child_id, Consent.status, Consent.valid_until,
               Consent.renews_id).where(Consent.status == "active").order_by(Consent.id))]
    children = []
    for cid, birthdate, jid in s.execute(
            select(Child.id, Child.birthdate, Child.jurisdiction)
            .where(Child.birthdate.is_not(None)).order_by(Child.id)):
        juris = jurisdiction_of(rules, jid)
        if juris is not None:
            children.append(ChildInfo(cid, birthdate, juris.majority_age,
                                      juris.majority_notice_age))
    items = due(now=now, records=records, reminder_days=rules.hold.reminder_days,
                consents=consents, children=children)
    sent = _sent_keys(s, [d.key for d in items])
    return [d for d in items if d.key not in sent]


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _sent_keys(s: Session, keys: list[str]) -> set[str]:
    out: set[str] = set()
    for i in range(0, len(keys), KEY_BATCH):
        chunk = keys[i:i + KEY_BATCH]
        out.update(s.scalars(select(SentReminder.key).where(SentReminder.key.in_(chunk))))
    return out


def _claim(s: Session, key: str) -> bool:
    """Insert the key; False when it is already there (sent by another run)."""
    try:
        with s.begin_nested():
            s.add(SentReminder(key=key, at=utcnow()))
    except IntegrityError:
        return False
    return True


# -- who is told --------------------------------------------------------------------------


def _student(s: Session, child: Child) -> Person | None:
    return s.scalar(select(Person).where(Person.child_id == child.id,
                                         Person.role == "student", Person.active.is_(True))
                    .order_by(Person.id).limit(1))


def _with(people: list[Person], extra: Iterable[Person | None]) -> list[Person]:
    out = list(people)
    for p in extra:
        if p is not None and all(p.id != q.id for q in out):
            out.append(p)
    return out


def _review_reference(s: Session, record: Record, person: Person,
                      domain: str) -> tuple[str | None, str | None]:
    """(Message-ID of the review request or newest preview sent to this person for this
    record, its token if that token is still live). No new token is ever issued: one
    would supersede the one in the request the person holds."""
    message_ids = s.scalars(
        select(Delivery.message_id)
        .where(Delivery.record_id == record.id, Delivery.person_id == person.id,
               Delivery.kind.in_(("review", "preview")))
        .order_by(Delivery.id.desc())).all()
    for message_id in message_ids:
        for token in mc.tokens_from_references([message_id], domain):
            row = tokens.find(s, token)
            if (row is not None and row.record_id == record.id and row.status == "live"
                    and row.purpose == "review"):
                return message_id, token
    return (message_ids[0] if message_ids else None), None


# -- the occasions ------------------------------------------------------------------------


def _hold(s: Session, rt: Runtime, notifier: Notifier, item: Due, now: dt.datetime) -> None:
    record = s.get(Record, item.record_id)
    assert record is not None and item.day is not None
    child = record.child
    # Whoever decides the record today and has not yet approved its current version.
    approved = set(s.scalars(select(Approval.person_id).where(
        Approval.record_id == record.id, Approval.version == record.version,
        Approval.decision == "approve")))
    people = [p for p in record_audience(s, rt.rules, record, now.date())
              if p.id not in approved]
    domain = rt.settings.domain
    answers: dict[str, int] = {}
    for person in people:
        ref, token = _review_reference(s, record, person, domain)
        answer: texts.Answer = "reply" if token else "replaced" if ref else "none"
        answers[answer] = answers.get(answer, 0) + 1
        text = texts.render_reminder(
            child_name=child.name, record_id=record.id, subject=record.subject,
            sender=record.sender_email, received_at=record.received_at,
            expires_at=record.expires_at or now, days=item.day, answer=answer,
            person_name=person.name)
        notifier.notice(
            s, child, person, "reminder", text, subject=record.subject, record=record,
            # Replies find the record by the request's Message-ID in References, and
            # by its review address where the token is still live.
            reply_to=mc.review_address(token, domain) if token else None,
            in_reply_to=ref, references=(ref,) if ref else (),
        )
    record_event(s, action=ACTIONS["hold"], actor=ACTOR, actor_role="broker",
                 child=child.slug, record_id=record.id,
                 recipients=[p.email for p in people],
                 description={"key": item.key, "day": item.day, "answers": answers})


def _consent_view(s: Session, consent: Consent) -> texts.ConsentView:
    team = {p.email: p for p in s.scalars(select(Person).where(
        Person.child_id == consent.child_id))}

    def shown(entry: str) -> str:
        if entry.lower().startswith("tag:"):
            return f"everyone tagged {entry[4:]}"
        person = team.get(entry.lower())
        return f"{person.name} <{person.email}>" if person and person.name else entry

    return texts.ConsentView(
        id=consent.id, purpose=consent.purpose,
        disclosers=tuple(shown(e) for e in _list(consent.disclosers)),
        recipients=tuple(shown(e) for e in _list(consent.recipients)),
        categories=tuple(_list(consent.categories)),
        valid_from=consent.valid_from, valid_until=consent.valid_until, mode=consent.mode,
    )


def _list(text: str | None) -> list[str]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _consent(s: Session, rt: Runtime, notifier: Notifier, item: Due, now: dt.datetime) -> None:
    consent = s.get(Consent, item.consent_id)
    assert consent is not None
    child = consent.child
    student = _student(s, child)
    signers = {e.lower() for e in _list(consent.signed_by)}
    people = _with(guardians(s, child),
                   [student if student is not None and student.email in signers else None])
    expired = item.kind == "consent-expired"
    # An expired consent that was renewed: the renewal carries on, so nobody is told;
    # the end is audited all the same.
    told = [] if item.renewed_by is not None else people
    view = _consent_view(s, consent)
    render = texts.render_consent_expired if expired else texts.render_consent_renewal
    kind = "consent_expired" if expired else "consent_renewal"
    title = (f"#{consent.id} {consent.purpose}, last day "
             f"{'was ' if expired else ''}{texts.format_day(consent.valid_until)}")
    for person in told:
        notifier.notice(s, child, person, kind,
                        render(child_name=child.name, consent=view, person_name=person.name),
                        subject=title)
    description: dict[str, object] = {"key": item.key, "consent": consent.id,
                                      "valid_until": consent.valid_until.isoformat()}
    if item.renewed_by is not None:
        description["renewed_by"] = item.renewed_by
    record_event(s, action=ACTIONS[item.kind], actor=ACTOR, actor_role="broker",
                 child=child.slug, recipients=[p.email for p in told],
                 description=description)


def _majority(s: Session, rt: Runtime, notifier: Notifier, item: Due, now: dt.datetime) -> None:
    child = s.get(Child, item.child_id)
    juris = jurisdiction_of(rt.rules, child.jurisdiction) if child is not None else None
    assert child is not None and juris is not None and item.date is not None
    people = _with(guardians(s, child), [_student(s, child)])
    reached = item.kind == "majority"
    render = texts.render_majority_reached if reached else texts.render_majority_notice
    kind = "majority_reached" if reached else "majority_notice"
    title = f"{mc.first_name(child.name)} decides alone from {texts.format_day(item.date)}"
    for person in people:
        notifier.notice(s, child, person, kind, render(
            child_name=child.name, majority_date=item.date, majority_age=juris.majority_age,
            jurisdiction=juris.name, to_student=person.role == "student",
            person_name=person.name, slug=child.slug,
            student_email=next((p.email for p in people if p.role == "student"), "")),
            subject=title)
    # No date in the audit: with the age it would tell the birthdate, and the audit is
    # append-only.
    record_event(s, action=ACTIONS[item.kind], actor=ACTOR, actor_role="broker",
                 child=child.slug, recipients=[p.email for p in people],
                 description={"jurisdiction": juris.id, "majority_age": juris.majority_age})


_ACT = {
    "hold": _hold,
    "consent-renewal": _consent,
    "consent-expired": _consent,
    "majority-notice": _majority,
    "majority": _majority,
}
