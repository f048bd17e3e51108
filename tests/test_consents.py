"""Consents on file (broker.consents.manage): filing one checks it against the team and the
rules and says every problem in words; revoking stops every copy still queued under it at
once (what was delivered stays delivered, and the audit says so); renewing files the same
terms for another year. Runs on SQLite and PostgreSQL (db_url)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.config import load, render_config
from broker.consents import (
    ConsentError,
    active_for_child,
    add_consent,
    renew_consent,
    revoke_consent,
    terms_of,
)
from broker.db.models import (
    AuditEvent,
    Child,
    Consent,
    ContentBlob,
    Delivery,
    Person,
    Record,
    utcnow,
)
from broker.policy.consent import Party, covering, default_until
from broker.records import states
from broker.records.transitions import transition
from broker.release.sender import Claimed, OutboxSender, Outcome
from broker.release.settle import make_notifier, settle
from broker.runtime import Runtime, open_vault
from broker.team.apply import apply_team
from broker.team.spec import parse_team

TODAY = dt.datetime.now(dt.UTC).date()


def born(years: int) -> dt.date:
    """A birthday making the child `years` old today (and for the next month)."""
    day = TODAY - dt.timedelta(days=40)
    return day.replace(year=day.year - years, day=min(day.day, 28))


# Sam: Illinois (consents need an expiry date; mental health needs the child's consent
# from 12), 13 years old, with a student address.
SAM = f"""
[child]
slug = "sam"
name = "Sam Rivera"
birthdate = "{born(13).isoformat()}"
jurisdiction = "us-il"

[[guardians]]
name = "Dana Rivera"
email = "dana@home.example"

[[guardians]]
name = "Chris Rivera"
email = "chris@home.example"

[student]
name = "Sam Rivera"
email = "sam@kids.example"

[[members]]
name = "Dr. Lee"
email = "lee@clinic.example"
role = "provider"
tags = ["therapy"]

[[members]]
name = "Ms Park"
email = "park@school.example"
role = "school"
tags = ["teacher"]

[[members]]
name = "Mr Ortiz"
email = "ortiz@school.example"
role = "school"
tags = ["ot"]

[[members]]
name = "Ms Gone"
email = "gone@school.example"
role = "school"
"""

# Alex: no jurisdiction in the team file (the rules' default, us-federal), 10 years old.
ALEX = f"""
[child]
slug = "alex"
name = "Alex Kim"
birthdate = "{born(10).isoformat()}"

[[guardians]]
name = "Pat Kim"
email = "pat@home.example"

[[members]]
name = "Kim Speech"
email = "kim@speech.example"
role = "provider"
tags = ["speech"]

[[members]]
name = "Mr Ortiz"
email = "ortiz@school.example"
role = "school"
tags = ["ot"]

[[members]]
name = "Ms Park"
email = "park@school.example"
role = "school"
tags = ["teacher"]
"""

# Jo: 19, us-federal: of age, decides alone unless delegated.
JO = f"""
[child]
slug = "jo"
name = "Jo Park"
birthdate = "{born(19).isoformat()}"

[[guardians]]
name = "Lou Park"
email = "lou@home.example"

[student]
name = "Jo Park"
email = "jo@uni.example"

[[members]]
name = "Dr. Lee"
email = "lee@clinic.example"
role = "provider"
tags = ["therapy"]

[[members]]
name = "Ms Park"
email = "park@school.example"
role = "school"
"""


def make_home(root: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A broker home on the test's database with three children's teams applied."""
    home = root / "home"
    home.mkdir()
    (home / "broker.toml").write_text(
        render_config(domain="records.example", listen="127.0.0.1:2525",
                      relay="127.0.0.1:2526", auth="token"),
        encoding="utf-8",
    )
    monkeypatch.setenv("BROKER_DATABASE_URL", db_url)
    monkeypatch.delenv("BROKER_HOME", raising=False)
    settings = load(home)
    open_vault(settings)
    rt = Runtime.open(settings)
    try:
        with rt.db.session() as s:
            for team in (SAM, ALEX, JO):
                apply_team(s, parse_team(team))
            # Ms Gone left Sam's team (the team file no longer names her).
            gone = s.scalar(select(Person).where(Person.email == "gone@school.example"))
            assert gone is not None
            gone.active = False
    finally:
        rt.close()
    return home


@pytest.fixture
def rt(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    home = make_home(tmp_path, db_url, monkeypatch)
    runtime = Runtime.open(load(home))
    yield runtime
    runtime.close()


def events(rt: Runtime, action: str) -> list[tuple[AuditEvent, dict]]:
    with rt.db.session() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == action)
                         .order_by(AuditEvent.seq)).all()
        return [(r, json.loads(r.description)) for r in rows]


def ot_consent(rt: Runtime, **over: object) -> Consent:
    """Alex's speech therapist may tell the OT teacher about OT progress (us-federal)."""
    args: dict = dict(child_slug="alex", disclosers=["kim@speech.example"],
                      recipients=["tag:ot"], categories=["ot_progress"],
                      purpose="classroom supports", signed_by=["pat@home.example"])
    args.update(over)
    with rt.db.session() as s:
        return add_consent(s, rt, **args)


def problems_of(rt: Runtime, **over: object) -> list[str]:
    with pytest.raises(ConsentError) as info, rt.db.session() as s:
        args: dict = dict(child_slug="alex", disclosers=["kim@speech.example"],
                          recipients=["tag:ot"], categories=["ot_progress"],
                          purpose="classroom supports", signed_by=["pat@home.example"])
        args.update(over)
        add_consent(s, rt, **args)
    assert info.value.problems, "a ConsentError always says why"
    return info.value.problems


def one(problems: list[str], *parts: str) -> str:
    """The one problem containing every part (fails with the whole list otherwise)."""
    found = [p for p in problems if all(part in p for part in parts)]
    assert len(found) == 1, problems
    return found[0]


# -- filing -------------------------------------------------------------------------------


def test_add_files_the_consent_and_audits_it(rt: Runtime) -> None:
    row = ot_consent(rt, disclosers=["  KIM@speech.example "], recipients=["tag:ot",
                     "park@school.example", "tag:ot"], mode="auto")
    with rt.db.session() as s:
        stored = s.get(Consent, row.id)
        assert stored is not None
        assert json.loads(stored.disclosers) == ["kim@speech.example"]
        assert json.loads(stored.recipients) == ["tag:ot", "park@school.example"]
        assert json.loads(stored.categories) == ["ot_progress"]
        assert json.loads(stored.signed_by) == ["pat@home.example"]
        assert stored.valid_from == TODAY
        assert stored.valid_until == default_until(TODAY)  # a year by default
        assert stored.mode == "auto" and stored.status == "active"
        assert stored.form_ref is None and stored.renews_id is None
        assert stored.created_by == "operator"
        alex = s.scalar(select(Child).where(Child.slug == "alex"))
        assert alex is not None
        active = active_for_child(s, alex.id, TODAY)
        assert [t.id for t in active] == [row.id]
        assert active_for_child(s, alex.id, TODAY - dt.timedelta(days=1)) == []
        assert active_for_child(s, alex.id, default_until(TODAY) + dt.timedelta(days=1)) == []
        terms = terms_of(stored)

    assert terms.disclosers == ("kim@speech.example",)
    assert terms.recipients == ("tag:ot", "park@school.example")
    ortiz = Party("ortiz@school.example", ("ot",))
    kim = Party("kim@speech.example", ("speech",))
    assert covering([terms], sender=kim, recipient=ortiz, categories=["ot_progress"],
                    day=TODAY) == terms
    assert covering([terms], sender=kim, recipient=ortiz, categories=["evaluation"],
                    day=TODAY) is None

    [(event, desc)] = events(rt, "consent_added")
    assert event.child == "alex" and event.actor == "operator"
    assert event.actor_role == "operator"
    assert desc == {
        "consent": row.id, "disclosers": ["kim@speech.example"],
        "recipients": ["tag:ot", "park@school.example"], "categories": ["ot_progress"],
        "purpose": "classroom supports", "valid_from": TODAY.isoformat(),
        "valid_until": default_until(TODAY).isoformat(), "signed_by": ["pat@home.example"],
        "mode": "auto", "form_sha256": None,
    }


def test_explicit_dates_are_kept(rt: Runtime) -> None:
    start, end = TODAY + dt.timedelta(days=3), TODAY + dt.timedelta(days=90)
    row = ot_consent(rt, valid_from=start, valid_until=end)
    assert (row.valid_from, row.valid_until) == (start, end)
    with rt.db.session() as s:
        assert active_for_child(s, row.child_id, TODAY) == []  # not yet valid
        assert [t.id for t in active_for_child(s, row.child_id, end)] == [row.id]


def test_sensitive_category_cannot_be_automatic(rt: Runtime) -> None:
    problems = problems_of(rt, categories=["mental_health"], mode="auto")
    one(problems, "mental_health is sensitive", "mode review")
    # The same in review mode is fine: every record stays held for the parent.
    row = ot_consent(rt, categories=["mental_health"], mode="review")
    assert row.mode == "review"


def test_psychotherapy_notes_never_under_a_standing_consent(rt: Runtime) -> None:
    problems = problems_of(rt, categories=["psychotherapy_notes", "ot_progress"])
    one(problems, "psychotherapy_notes", "never released under a standing consent")


def test_unknown_category_lists_the_known_ones(rt: Runtime) -> None:
    one(problems_of(rt, categories=["gossip"]), "unknown category 'gossip'", "ot_progress")


def test_unknown_tag_is_refused(rt: Runtime) -> None:
    problems = problems_of(rt, recipients=["tag:nurse"])
    one(problems, "no active member of alex's team carries tag 'nurse'", "ot, speech, teacher")
    one(problems_of(rt, recipients=["tag:Bad Tag!"]), "is not a tag")


def test_people_must_be_active_providers_or_school_members(rt: Runtime) -> None:
    one(problems_of(rt, recipients=["stranger@example.net"]),
        "stranger@example.net is not a member of alex's team")
    one(problems_of(rt, disclosers=["lee@clinic.example"]),  # Sam's provider, not Alex's
        "lee@clinic.example is not a member of alex's team")
    one(problems_of(rt, recipients=["pat@home.example"]),
        "pat@home.example is alex's guardian, not a provider or school member")
    one(problems_of(rt, child_slug="sam", recipients=["gone@school.example"],
                    disclosers=["lee@clinic.example"], signed_by=["dana@home.example"],
                    valid_until=TODAY + dt.timedelta(days=30)),
        "gone@school.example is no longer on sam's team")


def test_everyone_is_refused_once(rt: Runtime) -> None:
    problems = problems_of(rt, recipients=["everyone"])
    one(problems, "'everyone'", "never covers everyone")
    assert not [p for p in problems if "not a member" in p], problems
    one(problems_of(rt, recipients=[]), "name at least one recipient")
    one(problems_of(rt, recipients=["tag:all"]), "never covers everyone")


def test_a_guardian_must_sign(rt: Runtime) -> None:
    one(problems_of(rt, signed_by=[]), "at least one of alex's guardians must sign",
        "pat@home.example")
    problems = problems_of(rt, signed_by=["kim@speech.example"])
    one(problems, "kim@speech.example cannot sign for alex")
    one(problems, "at least one of alex's guardians must sign")


def test_illinois_needs_an_expiry_date(rt: Runtime) -> None:
    problems = problems_of(rt, child_slug="sam", disclosers=["lee@clinic.example"],
                           recipients=["tag:teacher"], categories=["ot_progress"],
                           signed_by=["dana@home.example"])
    one(problems, "requires a calendar expiry date", "--until")
    row = ot_consent(rt, child_slug="sam", disclosers=["lee@clinic.example"],
                     recipients=["tag:teacher"], signed_by=["dana@home.example"],
                     valid_until=TODAY + dt.timedelta(days=180))
    assert row.valid_until == TODAY + dt.timedelta(days=180)


def test_student_co_consent_for_mental_health_in_illinois(rt: Runtime) -> None:
    args = dict(child_slug="sam", disclosers=["lee@clinic.example"],
                recipients=["park@school.example"], categories=["mental_health"],
                valid_until=TODAY + dt.timedelta(days=180))
    problems = problems_of(rt, signed_by=["dana@home.example"], **args)
    one(problems, "Illinois requires the child's own consent for mental_health",
        "the child is 13", "--signed-by sam@kids.example")
    # The student alone is not enough either: a guardian signs too.
    one(problems_of(rt, signed_by=["sam@kids.example"], **args),
        "at least one of sam's guardians must sign")
    row = ot_consent(rt, signed_by=["dana@home.example", "SAM@kids.example"], **args)
    assert json.loads(row.signed_by) == ["dana@home.example", "sam@kids.example"]
    # OT progress needs no co-consent at 13.
    ot_consent(rt, child_slug="sam", disclosers=["lee@clinic.example"],
               recipients=["park@school.example"], categories=["ot_progress"],
               valid_until=TODAY + dt.timedelta(days=180), signed_by=["chris@home.example"])


def test_a_student_of_age_signs_for_themselves(rt: Runtime) -> None:
    args = dict(child_slug="jo", disclosers=["lee@clinic.example"],
                recipients=["park@school.example"], categories=["evaluation"])
    one(problems_of(rt, signed_by=["lou@home.example"], **args),
        "the student is 19", "the student must sign (--signed-by jo@uni.example)")
    assert ot_consent(rt, signed_by=["jo@uni.example"], **args).id
    # Once they delegated back to the guardians, a guardian's signature is what counts.
    with rt.db.session() as s:
        jo = s.scalar(select(Child).where(Child.slug == "jo"))
        assert jo is not None
        jo.delegated = True
    assert ot_consent(rt, signed_by=["lou@home.example"], **args).id
    one(problems_of(rt, signed_by=["jo@uni.example"], **args),
        "at least one of jo's guardians must sign")


def test_every_problem_at_once_and_nothing_written(rt: Runtime) -> None:
    problems = problems_of(rt, disclosers=[], recipients=["tag:nurse"],
                           categories=["mental_health"], purpose=" ", mode="auto",
                           signed_by=[], form=b"not a pdf",
                           valid_from=TODAY, valid_until=TODAY - dt.timedelta(days=1))
    for part in ("name at least one discloser", "tag 'nurse'", "purpose is required",
                 "mental_health is sensitive", "before valid from", "guardians must sign",
                 "must be a PDF"):
        one(problems, part)
    with rt.db.session() as s:
        assert s.scalars(select(Consent)).all() == []
    assert events(rt, "consent_added") == []


def test_unknown_child_and_past_dates(rt: Runtime) -> None:
    one(problems_of(rt, child_slug="nobody"), "no child 'nobody'", "alex, jo, sam")
    one(problems_of(rt, valid_from=TODAY - dt.timedelta(days=30),
                    valid_until=TODAY - dt.timedelta(days=1)), "already past")


def test_signed_form_is_stored_encrypted(rt: Runtime, tmp_path: Path) -> None:
    marker = b"SIGNED-RELEASE-FORM-" + os.urandom(8).hex().encode()
    small = b"%PDF-1.7\n" + marker + b"\n%%EOF\n"
    large = b"%PDF-1.7\n" + marker + os.urandom(1024 * 1024 + 10) + b"\n%%EOF\n"  # a file
    rows = [ot_consent(rt, form=small), ot_consent(rt, form=large, purpose="second")]
    for row, form in zip(rows, (small, large), strict=True):
        assert row.form_sha256 == hashlib.sha256(form).hexdigest()
        assert row.form_ref is not None and row.form_ref != row.form_sha256
        with rt.db.session() as s:
            assert rt.content.get(row.form_ref, s) == form
    # Nowhere on disk in the clear: not in the home (content files), not in the SQLite
    # database or its WAL (both under tmp_path).
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), path
    with rt.db.session() as s:  # nor in the database's blobs (PostgreSQL too)
        for blob in s.scalars(select(ContentBlob.data)):
            assert marker.decode() not in blob
    [(_, desc)] = [e for e in events(rt, "consent_added") if e[1]["consent"] == rows[0].id]
    assert desc["form_sha256"] == rows[0].form_sha256


# -- revoking -----------------------------------------------------------------------------


def releasing_record(rt: Runtime, child: str = "alex", sender: str = "kim@speech.example",
                     ) -> int:
    """A record taken through the real life cycle into RELEASING."""
    with rt.db.session() as s:
        kid = s.scalar(select(Child).where(Child.slug == child))
        person = s.scalar(select(Person).where(Person.email == sender,
                                               Person.child_id == kid.id))
        assert kid is not None and person is not None
        record = Record(child_id=kid.id, state=states.RECEIVED, sender_email=sender,
                        sender_id=person.id, subject="OT progress", raw_ref="ab" * 32,
                        raw_sha256="ab" * 32, received_at=utcnow())
        s.add(record)
        s.flush()
        s.refresh(record)
        for state in (states.HELD, states.APPROVED, states.RELEASING):
            transition(s, record, state, actor="broker", actor_role="broker")
        return record.id


def copy(rt: Runtime, record_id: int, recipient: str, consent_id: int | None,
         state: str = "queued") -> int:
    with rt.db.session() as s:
        record = s.get(Record, record_id)
        assert record is not None
        data = f"To: {recipient}\r\nSubject: OT progress\r\n\r\nbody\r\n".encode()
        d = Delivery(kind="release", child_id=record.child_id, record_id=record_id,
                     recipient=recipient, message_id=f"<{record_id}.{recipient}@x>",
                     content_ref=rt.content.put(data, s),
                     sha256=hashlib.sha256(data).hexdigest(), consent_id=consent_id,
                     state=state, sent_at=utcnow() if state == "sent" else None,
                     dedupe_key=f"release:{record_id}:{recipient}")
        s.add(d)
        s.flush()
        return d.id


def state_of(rt: Runtime, model: type, row_id: int) -> str:
    with rt.db.session() as s:
        row = s.get(model, row_id)
        assert row is not None
        return row.state


def test_revoke_stops_queued_copies_and_says_what_was_delivered(rt: Runtime) -> None:
    rt.settings = dataclasses.replace(rt.settings, notify_sender_on_release=True)
    consent = ot_consent(rt, recipients=["tag:ot", "tag:teacher"], mode="auto")
    other = ot_consent(rt, purpose="another consent", mode="auto")
    partly = releasing_record(rt)  # one copy already delivered, one still queued
    p_sent = copy(rt, partly, "ortiz@school.example", consent.id, "sent")
    p_queued = copy(rt, partly, "park@school.example", consent.id)
    waiting = releasing_record(rt)  # nothing sent yet
    w1 = copy(rt, waiting, "ortiz@school.example", consent.id)
    w2 = copy(rt, waiting, "park@school.example", consent.id)
    untouched = releasing_record(rt)  # a parent-directed copy and another consent's
    u_parent = copy(rt, untouched, "park@school.example", None)
    u_other = copy(rt, untouched, "ortiz@school.example", other.id)

    with rt.db.session() as s:
        row = s.get(Consent, consent.id)
        assert row is not None
        result = revoke_consent(s, rt, row, actor="dana@home.example", actor_role="guardian",
                                reason="changed our minds")
    assert sorted(result.cancelled) == sorted([p_queued, w1, w2])
    assert result.delivered == 1
    assert result.stopped == [waiting]

    for d in (p_queued, w1, w2):
        assert state_of(rt, Delivery, d) == "cancelled"
    assert state_of(rt, Delivery, p_sent) == "sent"  # cannot be recalled
    assert state_of(rt, Delivery, u_parent) == "queued"
    assert state_of(rt, Delivery, u_other) == "queued"
    assert state_of(rt, Record, waiting) == states.STOPPED
    assert state_of(rt, Record, partly) == states.RELEASED  # one copy did go out
    assert state_of(rt, Record, untouched) == states.RELEASING

    with rt.db.session() as s:
        row = s.get(Consent, consent.id)
        assert row is not None
        assert row.status == "revoked" and row.revoked_by == "dana@home.example"
        assert row.revoked_at is not None
        assert [t.id for t in active_for_child(s, row.child_id, TODAY)] == [other.id]
        # The sender of the partly released record is told it was forwarded (when the
        # home asks for it, as ever).
        notices = s.scalars(select(Delivery).where(Delivery.kind != "release",
                                                   Delivery.record_id == partly)).all()
        assert [n.recipient for n in notices] == ["kim@speech.example"]
        assert s.scalars(select(Delivery).where(Delivery.kind != "release",
                                                Delivery.record_id == waiting)).all() == []

    [(revoked, desc)] = events(rt, "consent_revoked")
    assert (revoked.actor, revoked.actor_role, revoked.child) == (
        "dana@home.example", "guardian", "alex")
    assert desc == {"consent": consent.id, "cancelled": 3, "already_delivered": 1,
                    "not_recalled": [p_sent], "reason": "changed our minds"}
    cancelled = events(rt, "delivery_cancelled")
    assert sorted((e.record_id, json.loads(e.recipients)[0], d["delivery"])
                  for e, d in cancelled) == sorted([
        (partly, "park@school.example", p_queued), (waiting, "ortiz@school.example", w1),
        (waiting, "park@school.example", w2)])
    assert all(d["consent"] == consent.id and d["reason"] == "consent revoked"
               for _, d in cancelled)
    [(stopped, sdesc)] = events(rt, "stopped")
    assert stopped.record_id == waiting
    assert sdesc["from"] == "releasing" and sdesc["cancelled"] == 2
    [(released, _)] = events(rt, "released")
    assert released.record_id == partly

    with pytest.raises(ConsentError, match="already revoked"), rt.db.session() as s:
        row = s.get(Consent, consent.id)
        assert row is not None
        revoke_consent(s, rt, row, actor="operator", actor_role="operator")
    assert len(events(rt, "consent_revoked")) == 1


def test_revoke_with_nothing_queued(rt: Runtime) -> None:
    consent = ot_consent(rt)
    with rt.db.session() as s:
        row = s.get(Consent, consent.id)
        assert row is not None
        result = revoke_consent(s, rt, row, actor="operator", actor_role="operator")
    assert (result.cancelled, result.delivered, result.stopped) == ([], 0, [])
    [(_, desc)] = events(rt, "consent_revoked")
    assert desc["cancelled"] == 0 and desc["already_delivered"] == 0


# -- the outbox and settling --------------------------------------------------------------


def claimed(rt: Runtime, delivery_id: int) -> Claimed:
    with rt.db.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        return Claimed(d.id, d.recipient, d.content_ref, 1, d.created_at)


def test_a_copy_that_left_while_being_revoked_is_recorded_as_sent(rt: Runtime) -> None:
    consent = ot_consent(rt, mode="auto")
    rid = releasing_record(rt)
    d = copy(rt, rid, "ortiz@school.example", consent.id)
    item = claimed(rt, d)  # the sender has it in hand...
    with rt.db.session() as s:  # ... when the guardian revokes
        row = s.get(Consent, consent.id)
        assert row is not None
        assert revoke_consent(s, rt, row, actor="operator", actor_role="operator").cancelled \
            == [d]
    assert state_of(rt, Record, rid) == states.STOPPED
    # The relay had already taken it: the truth is recorded.
    OutboxSender(rt)._record([Outcome(item, "sent")])
    assert state_of(rt, Delivery, d) == "sent"
    [(event, desc)] = events(rt, "delivered")
    assert event.record_id == rid and desc["after_revocation"] is True
    assert desc["delivery"] == d


def test_a_permanent_failure_of_a_cancelled_copy_keeps_it_cancelled(rt: Runtime) -> None:
    consent = ot_consent(rt, mode="auto")
    rid = releasing_record(rt)
    d = copy(rt, rid, "ortiz@school.example", consent.id)
    item = claimed(rt, d)
    with rt.db.session() as s:
        row = s.get(Consent, consent.id)
        assert row is not None
        revoke_consent(s, rt, row, actor="operator", actor_role="operator")
    OutboxSender(rt)._record([Outcome(item, "permanent", "550 no such user")])
    assert state_of(rt, Delivery, d) == "cancelled"
    assert events(rt, "delivery_failed") == []


def test_sender_still_settles_released_and_failed(rt: Runtime) -> None:
    ok = releasing_record(rt)
    d_ok = copy(rt, ok, "ortiz@school.example", None)
    bad = releasing_record(rt)
    d_bad1 = copy(rt, bad, "ortiz@school.example", None)
    d_bad2 = copy(rt, bad, "park@school.example", None)
    sender = OutboxSender(rt)
    sender._record([Outcome(claimed(rt, d_ok), "sent")])
    assert state_of(rt, Record, ok) == states.RELEASED
    [(event, desc)] = events(rt, "delivered")
    assert "after_revocation" not in desc and event.record_id == ok
    sender._record([Outcome(claimed(rt, d_bad1), "permanent", "550 no such user")])
    assert state_of(rt, Record, bad) == states.RELEASING  # one copy still queued
    sender._record([Outcome(claimed(rt, d_bad2), "sent")])
    assert state_of(rt, Record, bad) == states.RELEASE_FAILED


def test_settle_failed_and_cancelled_is_release_failed(rt: Runtime) -> None:
    consent = ot_consent(rt, mode="auto")
    rid = releasing_record(rt)
    copy(rt, rid, "ortiz@school.example", consent.id, "failed")
    copy(rt, rid, "park@school.example", consent.id, "cancelled")
    with rt.db.session() as s:
        record = s.get(Record, rid)
        assert record is not None
        settle(s, rt, make_notifier(rt), record)
    assert state_of(rt, Record, rid) == states.RELEASE_FAILED


# -- renewing -----------------------------------------------------------------------------


def test_renew_files_the_same_terms_from_the_day_after(rt: Runtime) -> None:
    old = ot_consent(rt, recipients=["tag:ot", "park@school.example"],
                     valid_until=TODAY + dt.timedelta(days=20), form=b"%PDF-1.4 old form")
    with rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        new = renew_consent(s, rt, row)
    start = TODAY + dt.timedelta(days=21)
    assert (new.valid_from, new.valid_until) == (start, default_until(start))
    assert new.renews_id == old.id and new.status == "active"
    assert terms_of(new).recipients == ("tag:ot", "park@school.example")
    assert (new.disclosers, new.categories, new.purpose, new.mode, new.signed_by) == (
        old.disclosers, old.categories, old.purpose, old.mode, old.signed_by)
    assert new.form_ref is None  # the old form stays with the old consent
    with rt.db.session() as s:
        again = s.get(Consent, old.id)
        assert again is not None  # the old one is as it was: it simply runs out
        assert (again.status, again.valid_until) == ("active", TODAY + dt.timedelta(days=20))
        assert [t.id for t in active_for_child(s, old.child_id, TODAY)] == [old.id]
        assert [t.id for t in active_for_child(s, old.child_id, start)] == [new.id]
    [(event, desc)] = events(rt, "consent_renewed")
    assert event.child == "alex"
    assert desc["consent"] == new.id and desc["renews"] == old.id
    assert desc["valid_from"] == start.isoformat()

    with pytest.raises(ConsentError, match=f"already renewed by #{new.id}"), \
            rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        renew_consent(s, rt, row)


def test_renew_an_expired_consent_starts_today(rt: Runtime) -> None:
    old = ot_consent(rt)
    with rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        row.valid_from = TODAY - dt.timedelta(days=400)
        row.valid_until = TODAY - dt.timedelta(days=35)
    with rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        until = TODAY + dt.timedelta(days=60)
        new = renew_consent(s, rt, row, valid_until=until)
    assert (new.valid_from, new.valid_until) == (TODAY, until)


def test_renew_refuses_revoked_and_rechecks_the_rules(rt: Runtime) -> None:
    old = ot_consent(rt)
    with rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        revoke_consent(s, rt, row, actor="operator", actor_role="operator")
    with pytest.raises(ConsentError, match="was revoked"), rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        renew_consent(s, rt, row)

    il = ot_consent(rt, child_slug="sam", disclosers=["lee@clinic.example"],
                    recipients=["tag:teacher"], signed_by=["dana@home.example"],
                    valid_until=TODAY + dt.timedelta(days=10))
    with pytest.raises(ConsentError, match="--until"), rt.db.session() as s:
        row = s.get(Consent, il.id)
        assert row is not None
        renew_consent(s, rt, row)  # Illinois: the new expiry date must be given
    with rt.db.session() as s:
        row = s.get(Consent, il.id)
        assert row is not None
        new = renew_consent(s, rt, row, valid_until=TODAY + dt.timedelta(days=200),
                            signed_by=["chris@home.example"], form=b"%PDF-1.5 renewed")
    assert json.loads(new.signed_by) == ["chris@home.example"]
    assert new.form_sha256 == hashlib.sha256(b"%PDF-1.5 renewed").hexdigest()
    assert new.valid_from == TODAY + dt.timedelta(days=11)


def test_revoking_a_consent_revokes_its_renewal(rt: Runtime) -> None:
    old = ot_consent(rt, mode="auto", valid_until=TODAY + dt.timedelta(days=5))
    with rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        new = renew_consent(s, rt, row)
    rid = releasing_record(rt)
    d = copy(rt, rid, "ortiz@school.example", old.id)
    with rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        result = revoke_consent(s, rt, row, actor="dana@home.example", actor_role="guardian",
                                reason="no more")
    assert result.also_revoked == [new.id] and result.cancelled == [d]
    with rt.db.session() as s:
        assert {c.id: c.status for c in s.scalars(select(Consent))} == {
            old.id: "revoked", new.id: "revoked"}
        assert active_for_child(s, old.child_id, new.valid_from) == []
    revoked = {desc["consent"]: desc for _, desc in events(rt, "consent_revoked")}
    assert revoked[old.id]["cancelled"] == 1
    assert revoked[new.id]["renews_revoked"] == old.id
    assert revoked[new.id]["reason"] == "no more"


def test_revoking_a_renewal_leaves_the_consent_it_renews(rt: Runtime) -> None:
    old = ot_consent(rt, valid_until=TODAY + dt.timedelta(days=5))
    with rt.db.session() as s:
        row = s.get(Consent, old.id)
        assert row is not None
        new = renew_consent(s, rt, row)
    with rt.db.session() as s:
        row = s.get(Consent, new.id)
        assert row is not None
        assert revoke_consent(s, rt, row, actor="operator", actor_role="operator"
                              ).also_revoked == []
    with rt.db.session() as s:
        assert [t.id for t in active_for_child(s, old.child_id, TODAY)] == [old.id]
