"""The plain data the pure policy functions need, read from the database (the thin shell
around broker.policy.evaluate and broker.policy.authority)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

from sqlalchemy import event, select
from sqlalchemy.orm import Session, SessionTransaction

from broker.db.models import Child, Person, Record
from broker.db.reads import reading
from broker.policy.authority import Authority, Decider, authority
from broker.policy.evaluate import Evaluation, Member, jurisdiction_of
from broker.policy.rules import Jurisdiction, Rules


def tags_of(p: Person) -> tuple[str, ...]:
    return tuple(json.loads(p.tags or "[]"))


def member(p: Person) -> Member:
    return Member(p.id, p.email, p.name, p.role, tags_of(p))


def team_members(people: Sequence[Person]) -> list[Member]:
    return [member(p) for p in people if p.active and p.role in ("provider", "school")]


# Session.info key: the active people read per child in the current transaction.
_PEOPLE = "broker.active_people"


def active_people(s: Session, child: Child) -> list[Person]:
    """The child's active people, by id. Read once per transaction (a message's savepoint):
    taking one decision in asks for them four or five times (policy, authority, audience,
    guardians), and only a team's apply changes them, whose flush clears what was read."""
    cache: dict[int, list[Person]] = s.info.setdefault(_PEOPLE, {})
    people = cache.get(child.id)
    if people is None:
        with reading(s, Person, Child):
            people = cache[child.id] = list(s.scalars(
                select(Person).where(Person.child_id == child.id, Person.active.is_(True))
                .order_by(Person.id)))
    return list(people)


@event.listens_for(Session, "after_flush")
def _people_changed(session: Session, _context: object) -> None:
    if any(isinstance(o, Person) for o in (*session.new, *session.dirty, *session.deleted)):
        session.info.pop(_PEOPLE, None)


@event.listens_for(Session, "after_transaction_end")
def _transaction_ended(session: Session, transaction: SessionTransaction) -> None:
    # A transaction or a savepoint; not the inner "subtransaction" every flush makes.
    if transaction.parent is None or transaction.nested:
        session.info.pop(_PEOPLE, None)


def decider(p: Person) -> Decider:
    return Decider(p.id, p.email, p.name, p.role)


def jurisdiction(rules: Rules, child: Child) -> Jurisdiction:
    j = jurisdiction_of(rules, child.jurisdiction)
    if j is None:  # the rules loader makes sure the default exists; a stale name falls back
        j = jurisdiction_of(rules, None)
    assert j is not None, "rules without a default jurisdiction"
    return j


def authority_for(s: Session, rules: Rules, child: Child, categories: Sequence[str],
                  day: dt.date | None = None) -> Authority:
    """Who decides this child's record of these categories, on `day` (today by default)."""
    people = active_people(s, child)
    student = next((p for p in people if p.role == "student"), None)
    return authority(
        guardians=[decider(p) for p in people if p.role == "guardian"],
        student=decider(student) if student else None,
        birthdate=child.birthdate,
        jurisdiction=jurisdiction(rules, child),
        categories=categories,
        approval=child.approval or "any",
        delegated=bool(child.delegated),
        day=day or dt.datetime.now(dt.UTC).date(),
    )


def evaluation_of(record: Record) -> Evaluation | None:
    """The stored evaluation, or None for records held before the policy existed."""
    data = json.loads(record.policy or "{}")
    return Evaluation.from_json(data) if data else None


def audience(s: Session, rules: Rules, child: Child, categories: Sequence[str] = (),
             day: dt.date | None = None) -> list[Person]:
    """Who hears about a record (its outcome, its expiry, a refused reply, a failed
    delivery): the people who decide it today. From the age of majority that is the student
    alone (the guardians are ordinary team members and learn nothing of it), unless the
    student has delegated back; the guardians are always told of their own records before."""
    deciders = authority_for(s, rules, child, categories, day).deciders
    by_id = {p.id: p for p in active_people(s, child)}
    return [by_id[d.person_id] for d in deciders if d.person_id in by_id]


def record_audience(s: Session, rules: Rules, record: Record,
                    day: dt.date | None = None) -> list[Person]:
    ev = evaluation_of(record)
    return audience(s, rules, record.child, ev.categories if ev else (), day)
