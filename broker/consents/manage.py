"""Consents on file (DESIGN.md section 6): filing, listing, revoking and renewing them.

The shell around the pure `broker.policy.consent`: it reads the child's team and the rules
from the database and the runtime, and writes the consent with its audit event in the
caller's transaction. Used by `broker consent` and by the pipeline and reply code.

- `add_consent` checks everything an operator can get wrong and raises `ConsentError` with
  every problem in words: the policy checks (`policy.consent.validate`), that the people
  and tags named are on the child's team, and that the right people signed (a guardian;
  the student too where the child's jurisdiction gives them a say for one of the
  categories; the student alone once of age, unless they delegated to the guardians).
- `revoke_consent` takes effect at once: every copy still queued under the consent is
  cancelled and the records waiting on them are settled (`broker.release.settle`); copies
  already delivered cannot be recalled, and the audit says how many. A renewal filed to
  continue it is revoked with it.
- `renew_consent` files a new consent with the same terms, starting the day after the old
  one ends; the old one is left to run out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit.log import record_event
from broker.db.models import Child, Consent, Delivery, Person, Record, utcnow
from broker.db.reads import reading
from broker.policy import consent as policy
from broker.policy.authority import age_on
from broker.policy.consent import ConsentTerms
from broker.policy.rules import TAG, Jurisdiction, Rules
from broker.records import states
from broker.release.settle import make_notifier, settle
from broker.review.notify import Notifier

if TYPE_CHECKING:
    from broker.runtime import Runtime

OPERATOR = "operator"
MEMBER_ROLES = ("provider", "school")
# What policy.consent.validate already refuses as "everyone": not reported twice.
EVERYONE = frozenset({"*", "all", "everyone", "tag:*", "tag:all", "tag:everyone"})
PDF_MAGIC = b"%PDF-"
CANCELLED_REASON = "consent revoked"


class ConsentError(Exception):
    """A consent that cannot be filed, revoked or renewed; `problems` says every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class RevokeResult:
    consent: int
    # Delivery ids of the queued copies that were stopped.
    cancelled: list[int]
    # Copies already sent under the consent: they cannot be recalled.
    delivered: int
    # Records that ended `stopped` (nothing of them was sent).
    stopped: list[int] = field(default_factory=list)
    # Renewals of the consent, revoked with it (their copies are counted above).
    also_revoked: list[int] = field(default_factory=list)


# -- reading ------------------------------------------------------------------------------


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _list(text: str | None) -> list[str]:
    value = json.loads(text or "[]")
    return [str(v) for v in value] if isinstance(value, list) else []


def terms_of(row: Consent) -> ConsentTerms:
    return ConsentTerms(
        id=row.id,
        disclosers=tuple(_list(row.disclosers)),
        recipients=tuple(_list(row.recipients)),
        categories=tuple(_list(row.categories)),
        purpose=row.purpose,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        mode=row.mode,
        status=row.status,
    )


def active_for_child(s: Session, child_id: int, day: dt.date) -> list[ConsentTerms]:
    """The consents of this child in force on `day` (not revoked, inside their dates)."""
    with reading(s, Consent, Child):
        rows = s.scalars(
            select(Consent)
            .where(Consent.child_id == child_id, Consent.status == "active",
                   Consent.valid_from <= day, Consent.valid_until >= day)
            .order_by(Consent.id)
        ).all()
    return [terms_of(r) for r in rows]


def status_on(row: Consent, day: dt.date) -> str:
    """What a person reads: active, revoked, expired or not yet valid (on `day`)."""
    if row.status == "revoked":
        return "revoked"
    if day < row.valid_from:
        return "not yet valid"
    if day > row.valid_until:
        return "expired"
    return "active"


def signers_of(row: Consent) -> list[str]:
    return _list(row.signed_by)


# -- checking -----------------------------------------------------------------------------


def _clean(entries: Sequence[str] | None) -> list[str]:
    """Lower case, trimmed, each once, in the order given."""
    out: list[str] = []
    for entry in entries or ():
        e = str(entry).strip().lower()
        if e and e not in out:
            out.append(e)
    return out


def jurisdiction_of(rules: Rules, child: Child) -> tuple[Jurisdiction | None, str | None]:
    """The child's jurisdiction (the team file's, else the rules' default), or a problem."""
    jid = child.jurisdiction or rules.default_jurisdiction
    if not jid:
        return None, None
    found = rules.jurisdictions.get(jid)
    if found is None:
        return None, (f"{child.slug}'s jurisdiction {jid!r} has no rules file "
                      f"(rules/jurisdictions/{jid}.toml)")
    return found, None


def _check(
    s: Session,
    rt: Runtime,
    child: Child,
    *,
    disclosers: list[str],
    recipients: list[str],
    categories: list[str],
    purpose: str,
    valid_from: dt.date,
    valid_until: dt.date | None,
    signers: list[str],
    mode: str,
    on: dt.date,
) -> list[str]:
    rules = rt.rules
    juris, problem = jurisdiction_of(rules, child)
    problems = [problem] if problem else []
    problems += policy.validate(
        disclosers=disclosers,
        recipients=recipients,
        categories=categories,
        purpose=purpose,
        valid_from=valid_from,
        valid_until=valid_until,
        mode=mode,
        known_categories=rules.categories,
        sensitive_categories=[n for n, c in rules.categories.items() if c.sensitive],
        no_standing_consent=([c for c in categories if not juris.rule(c).standing_consent]
                             if juris else []),
        requires_expiry=bool(juris and juris.consent_requires_expiry),
    )
    if valid_until is not None and valid_from <= valid_until < on:
        problems.append(f"valid until {valid_until} is already past")

    people = s.scalars(select(Person).where(Person.child_id == child.id)
                       .order_by(Person.id)).all()
    by_email = {p.email: p for p in people}
    members = [p for p in people if p.active and p.role in MEMBER_ROLES]
    team_tags = sorted({t for p in members for t in _list(p.tags)})
    for entry in dict.fromkeys(disclosers + recipients):
        if entry in EVERYONE:
            continue  # validate said it
        if entry.startswith(policy.TAG_PREFIX):
            tag = entry[len(policy.TAG_PREFIX):]
            if not TAG.match(tag):
                problems.append(f"{entry!r} is not a tag: write tag:NAME (lower-case letters, "
                                "digits, - and _)")
            elif tag not in team_tags:
                problems.append(f"no active member of {child.slug}'s team carries tag {tag!r} "
                                f"(tags in use: {', '.join(team_tags) or 'none'})")
            continue
        person = by_email.get(entry)
        if person is None:
            problems.append(f"{entry} is not a member of {child.slug}'s team")
        elif not person.active:
            problems.append(f"{entry} is no longer on {child.slug}'s team (deactivated)")
        elif person.role not in MEMBER_ROLES:
            problems.append(f"{entry} is {child.slug}'s {person.role}, not a provider or "
                            "school member: a consent names who discloses and who receives")

    guardians = [p for p in people if p.active and p.role == "guardian"]
    student = next((p for p in people if p.active and p.role == "student"), None)
    for address in signers:
        person = by_email.get(address)
        if person is None or not person.active or person.role not in ("guardian", "student"):
            problems.append(f"{address} cannot sign for {child.slug}: only the child's "
                            "guardians (and the student) sign a consent")
    guardian_signed = any(g.email in signers for g in guardians)
    age = age_on(child.birthdate, on) if child.birthdate else None
    of_age = juris is not None and age is not None and age >= juris.majority_age
    if of_age and not child.delegated and student is not None:
        assert juris is not None and age is not None
        if student.email not in signers:
            problems.append(f"the student is {age}, of age under {juris.name}, and decides "
                            f"alone: the student must sign (--signed-by {student.email})")
        return problems
    if not guardian_signed:
        listing = ", ".join(g.email for g in guardians) or "none on the team"
        problems.append(f"at least one of {child.slug}'s guardians must sign "
                        f"(--signed-by ADDRESS; guardians: {listing})")
    if of_age or juris is None or age is None:
        return problems
    needed = [c for c in categories
              if (juris.rule(c).co_consent_age is not None
                  and juris.rule(c).co_consent_age <= age < juris.majority_age)]
    if needed:
        cats = ", ".join(needed)
        if student is None:
            problems.append(f"{juris.name} requires the child's own consent for {cats} (the "
                            f"child is {age}), but the team file has no [student] address: "
                            "add one and have the student sign")
        elif student.email not in signers:
            problems.append(f"{juris.name} requires the child's own consent for {cats} (the "
                            f"child is {age}): the student must sign too "
                            f"(--signed-by {student.email})")
    return problems


def _form(rt: Runtime, s: Session, form: bytes | None) -> tuple[str | None, str | None]:
    if form is None:
        return None, None
    return rt.content.put(form, s), hashlib.sha256(form).hexdigest()


def _form_problem(form: bytes | None) -> list[str]:
    if form is not None and not bytes(form).startswith(PDF_MAGIC):
        return ["the signed form must be a PDF file (it does not start with %PDF-)"]
    return []


def _child(s: Session, slug: str) -> Child:
    child = s.scalar(select(Child).where(Child.slug == slug))
    if child is None:
        known = ", ".join(s.scalars(select(Child.slug).order_by(Child.slug))) or "none yet"
        raise ConsentError([f"no child {slug!r} (known: {known})"])
    return child


def _terms_audit(row: Consent) -> dict:
    return {
        "consent": row.id,
        "disclosers": _list(row.disclosers),
        "recipients": _list(row.recipients),
        "categories": _list(row.categories),
        "purpose": row.purpose,
        "valid_from": row.valid_from.isoformat(),
        "valid_until": row.valid_until.isoformat(),
        "signed_by": _list(row.signed_by),
        "mode": row.mode,
        "form_sha256": row.form_sha256,
    }


# -- changing -----------------------------------------------------------------------------


def add_consent(
    s: Session,
    rt: Runtime,
    *,
    child_slug: str,
    disclosers: Sequence[str],
    recipients: Sequence[str],
    categories: Sequence[str],
    purpose: str,
    valid_from: dt.date | None = None,
    valid_until: dt.date | None = None,
    signed_by: Sequence[str],
    mode: str = "review",
    form: bytes | None = None,
    actor: str = OPERATOR,
) -> Consent:
    """Files a consent (audited `consent_added`); ConsentError lists every problem."""
    child = _child(s, child_slug)
    on = today()
    start = valid_from or on
    juris, _ = jurisdiction_of(rt.rules, child)
    requires_expiry = bool(juris and juris.consent_requires_expiry)
    until = valid_until
    if until is None and not requires_expiry:
        until = policy.default_until(start)
    cats = [str(c).strip() for c in dict.fromkeys(categories) if str(c).strip()]
    signers = _clean(signed_by)
    mode = mode.strip().lower()
    problems = _check(s, rt, child, disclosers=_clean(disclosers),
                      recipients=_clean(recipients), categories=cats, purpose=purpose,
                      valid_from=start, valid_until=until, signers=signers, mode=mode, on=on)
    problems += _form_problem(form)
    if problems:
        raise ConsentError(problems)
    assert until is not None
    form_ref, form_sha = _form(rt, s, form)
    row = Consent(
        child_id=child.id,
        disclosers=json.dumps(_clean(disclosers)),
        recipients=json.dumps(_clean(recipients)),
        categories=json.dumps(cats),
        purpose=purpose.strip(),
        valid_from=start,
        valid_until=until,
        signed_by=json.dumps(signers),
        mode=mode,
        form_ref=form_ref,
        form_sha256=form_sha,
        status="active",
        created_by=actor,
    )
    s.add(row)
    s.flush()
    record_event(s, action="consent_added", actor=actor, actor_role="operator",
                 child=child.slug, description=_terms_audit(row))
    return row


def revoke_consent(
    s: Session,
    rt: Runtime,
    consent: Consent,
    *,
    actor: str,
    actor_role: str,
    reason: str = "",
) -> RevokeResult:
    """Revokes at once: queued copies under it are cancelled and their records settled.

    Copies already sent cannot be recalled; their number is in the result and the audit.
    A renewal of this consent (filed to continue it) is revoked with it: a family that
    withdraws a consent must not find it back in force when the renewal starts."""
    s.flush()
    # Locked (PostgreSQL): two revocations of one consent cannot both go through.
    s.refresh(consent, with_for_update=True)
    if consent.status == "revoked":
        when = consent.revoked_at.date().isoformat() if consent.revoked_at else "earlier"
        raise ConsentError([f"consent #{consent.id} was already revoked ({when}, by "
                            f"{consent.revoked_by or 'unknown'})"])
    cancelled: list[Delivery] = []
    delivered = 0
    also: list[int] = []
    current: Consent | None = consent
    because: int | None = None
    while current is not None:
        queued, sent = _revoke_one(s, current, actor=actor, actor_role=actor_role,
                                   reason=reason, because=because)
        cancelled += queued
        delivered += sent
        if current is not consent:
            also.append(current.id)
        because = current.id
        current = s.scalar(select(Consent)
                           .where(Consent.renews_id == current.id, Consent.status == "active")
                           .order_by(Consent.id).limit(1).with_for_update())
    stopped: list[int] = []
    notifier: Notifier | None = None
    for record_id in sorted({d.record_id for d in cancelled if d.record_id is not None}):
        record = s.get(Record, record_id)
        if record is None or record.state != states.RELEASING:
            continue
        notifier = notifier or make_notifier(rt)
        settle(s, rt, notifier, record)
        if record.state == states.STOPPED:
            stopped.append(record.id)
    return RevokeResult(consent=consent.id, cancelled=[d.id for d in cancelled],
                        delivered=delivered, stopped=stopped, also_revoked=also)


def _revoke_one(
    s: Session,
    consent: Consent,
    *,
    actor: str,
    actor_role: str,
    reason: str,
    because: int | None,
) -> tuple[list[Delivery], int]:
    """Marks one consent revoked and cancels its queued copies, audited; returns the
    cancelled copies and how many copies had already been sent under it."""
    slug = consent.child.slug
    consent.status = "revoked"
    consent.revoked_at = utcnow()
    consent.revoked_by = actor
    # Locked too: a sender finishing one of these copies now waits, then sees it cancelled
    # (and records that it left anyway), or it is already sent and not counted here.
    queued = list(s.scalars(
        select(Delivery)
        .where(Delivery.consent_id == consent.id, Delivery.state == "queued")
        .order_by(Delivery.id)
        .with_for_update()
    ))
    for d in queued:
        d.state = "cancelled"
    s.flush()
    sent = list(s.scalars(
        select(Delivery.id)
        .where(Delivery.consent_id == consent.id, Delivery.state == "sent")
        .order_by(Delivery.id)
    ))
    description = {"consent": consent.id, "cancelled": len(queued),
                   "already_delivered": len(sent), "not_recalled": sent, "reason": reason}
    if because is not None:
        description["renews_revoked"] = because
    record_event(s, action="consent_revoked", actor=actor, actor_role=actor_role, child=slug,
                 description=description)
    for d in queued:
        record_event(
            s, action="delivery_cancelled", actor=actor, actor_role=actor_role, child=slug,
            record_id=d.record_id, recipients=[d.recipient],
            description={"delivery": d.id, "consent": consent.id, "reason": CANCELLED_REASON},
        )
    return queued, len(sent)


def renew_consent(
    s: Session,
    rt: Runtime,
    consent: Consent,
    *,
    valid_until: dt.date | None = None,
    actor: str = OPERATOR,
    signed_by: Sequence[str] | None = None,
    form: bytes | None = None,
) -> Consent:
    """A new consent on the same terms from the day after this one ends (or today, if it
    has ended), a year by default; audited `consent_renewed`. The old one runs out as it
    would have. `signed_by` and `form` record a newly signed form (default: the same
    signatures, no form: the old form stays with the old consent)."""
    if consent.status == "revoked":
        raise ConsentError([f"consent #{consent.id} was revoked: it cannot be renewed; file "
                            "a new one (broker consent add)"])
    later = s.scalar(select(Consent).where(Consent.renews_id == consent.id)
                     .order_by(Consent.id))
    if later is not None:
        raise ConsentError([f"consent #{consent.id} was already renewed by #{later.id}"
                            + ("" if later.status == "revoked" else f"; renew #{later.id}")])
    child = consent.child
    on = today()
    start = max(consent.valid_until + dt.timedelta(days=1), on)
    juris, _ = jurisdiction_of(rt.rules, child)
    until = valid_until
    if until is None and not (juris and juris.consent_requires_expiry):
        until = policy.default_until(start)
    old = terms_of(consent)
    signers = _clean(signed_by) if signed_by else _list(consent.signed_by)
    problems = _check(s, rt, child, disclosers=list(old.disclosers),
                      recipients=list(old.recipients), categories=list(old.categories),
                      purpose=old.purpose, valid_from=start, valid_until=until,
                      signers=signers, mode=old.mode, on=on)
    problems += _form_problem(form)
    if problems:
        raise ConsentError(problems)
    assert until is not None
    form_ref, form_sha = _form(rt, s, form)
    row = Consent(
        child_id=consent.child_id,
        disclosers=consent.disclosers,
        recipients=consent.recipients,
        categories=consent.categories,
        purpose=consent.purpose,
        valid_from=start,
        valid_until=until,
        signed_by=json.dumps(signers),
        mode=consent.mode,
        form_ref=form_ref,
        form_sha256=form_sha,
        status="active",
        created_by=actor,
        renews_id=consent.id,
    )
    s.add(row)
    s.flush()
    record_event(s, action="consent_renewed", actor=actor, actor_role="operator",
                 child=child.slug, description={**_terms_audit(row), "renews": consent.id})
    return row
