"""The scheduler: what is due (pure, plain data) and what a run sends (both databases):
hold reminders on the configured days and never after expiry, consent renewal and expiry
notices, coming-of-age notices; each exactly once across restarts and across processes.
Time is driven by `now=`, never by sleeping."""

from __future__ import annotations

import datetime as dt
import email
import json
import threading
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from sqlalchemy import func, select

from broker.audit.log import verify_log
from broker.db.models import AuditEvent, Child, Consent, Delivery, Person, Record, SentReminder
from broker.policy.authority import age_on
from broker.records import states
from broker.runtime import Runtime, open_vault
from broker.schedule import ChildInfo, ConsentInfo, Due, HeldRecord, due, majority_date, texts
from broker.schedule.run import run_schedule
from tests.harness import DOMAIN, GUARDIAN, World, report

UTC = dt.UTC
T0 = dt.datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
DAY = dt.timedelta(days=1)


def held(rid: int = 1, received: dt.datetime = T0, lifetime: float | None = 14,
         state: str = states.AWAITING_REVIEW, child: int = 1) -> HeldRecord:
    expires = received + dt.timedelta(days=lifetime) if lifetime is not None else None
    return HeldRecord(rid, child, state, received, expires)


def keys(items: list[Due]) -> list[str]:
    return [d.key for d in items]


# --- hold reminders (pure) ---------------------------------------------------------------


def test_no_reminder_before_the_first_day() -> None:
    assert due(now=T0 + 3 * DAY - dt.timedelta(seconds=1), records=[held()],
               reminder_days=(3, 7, 21)) == []


def test_reminder_exactly_on_the_day() -> None:
    items = due(now=T0 + 3 * DAY, records=[held()], reminder_days=(3, 7, 21))
    assert items == [Due(key="hold:1:day3", kind="hold", child_id=1, record_id=1, day=3)]


def test_only_the_latest_day_reached_is_due() -> None:
    # A broker down across days 3 and 7 sends one reminder (day 7), not two at once.
    assert keys(due(now=T0 + 8 * DAY, records=[held()], reminder_days=(3, 7, 21))) == [
        "hold:1:day7"]
    assert keys(due(now=T0 + 5 * DAY, records=[held()], reminder_days=(3, 7, 21))) == [
        "hold:1:day3"]


def test_no_reminder_once_the_hold_has_expired() -> None:
    record = held(lifetime=14)
    assert due(now=T0 + 21 * DAY, records=[record], reminder_days=(3, 7, 21)) == []
    # The very moment of expiry already counts as expired.
    assert due(now=T0 + 14 * DAY, records=[record], reminder_days=(3, 7, 21)) == []
    assert keys(due(now=T0 + 14 * DAY - dt.timedelta(seconds=1), records=[record],
                    reminder_days=(3, 7, 21))) == ["hold:1:day7"]


def test_a_reminder_day_past_the_lifetime_is_never_sent() -> None:
    record = held(lifetime=5)
    assert keys(due(now=T0 + 4 * DAY, records=[record], reminder_days=(3, 7))) == [
        "hold:1:day3"]
    assert due(now=T0 + 7 * DAY, records=[record], reminder_days=(3, 7)) == []


@pytest.mark.parametrize("state", [states.APPROVED, states.RELEASING, states.RELEASED,
                                   states.DENIED, states.EXPIRED, states.QUARANTINED,
                                   states.RECEIVED, states.STOPPED])
def test_no_reminder_for_a_record_no_longer_held(state: str) -> None:
    assert due(now=T0 + 4 * DAY, records=[held(state=state)], reminder_days=(3,)) == []


def test_held_state_counts_as_open() -> None:
    assert keys(due(now=T0 + 4 * DAY, records=[held(state=states.HELD)],
                    reminder_days=(3,))) == ["hold:1:day3"]


def test_no_reminder_days_no_reminders() -> None:
    assert due(now=T0 + 10 * DAY, records=[held()], reminder_days=()) == []


def test_a_hold_without_expiry_is_still_reminded() -> None:
    assert keys(due(now=T0 + 30 * DAY, records=[held(lifetime=None)],
                    reminder_days=(3, 7, 21))) == ["hold:1:day21"]


def test_naive_times_are_utc() -> None:
    naive = HeldRecord(1, 1, states.AWAITING_REVIEW, T0.replace(tzinfo=None), None)
    now = (T0 + 3 * DAY).replace(tzinfo=None)
    assert keys(due(now=now, records=[naive], reminder_days=(3,))) == ["hold:1:day3"]
    # Another zone: the same instant.
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert keys(due(now=(T0 + 3 * DAY).astimezone(plus2), records=[held()],
                    reminder_days=(3,))) == ["hold:1:day3"]


def test_several_records_each_on_its_own_clock() -> None:
    records = [held(2, received=T0 - 5 * DAY), held(1, received=T0), held(3, T0 - 30 * DAY)]
    assert keys(due(now=T0 + 3 * DAY, records=records, reminder_days=(3, 7))) == [
        "hold:1:day3", "hold:2:day7"]


# --- consents (pure) ---------------------------------------------------------------------

END = dt.date(2026, 6, 30)


def consent(cid: int = 4, until: dt.date = END, status: str = "active",
            renews: int | None = None, child: int = 1) -> ConsentInfo:
    return ConsentInfo(cid, child, status, until, renews)


def at(day: dt.date, hour: int = 12) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def test_renewal_notice_starts_exactly_30_days_before_the_last_day() -> None:
    assert due(now=at(END - 31 * DAY), consents=[consent()]) == []
    items = due(now=at(END - 30 * DAY, hour=0), consents=[consent()])
    assert items == [Due(key="consent-renewal:4:2026-06-30", kind="consent-renewal",
                         child_id=1, consent_id=4, date=END)]


def test_renewal_notice_due_through_the_last_day_then_expired() -> None:
    assert keys(due(now=at(END, hour=23), consents=[consent()])) == [
        "consent-renewal:4:2026-06-30"]
    items = due(now=at(END + DAY, hour=0), consents=[consent()])
    assert items == [Due(key="consent-expired:4:2026-06-30", kind="consent-expired",
                         child_id=1, consent_id=4, date=END)]
    # Long after: still expired (the key makes it once).
    assert keys(due(now=at(END + 400 * DAY), consents=[consent()])) == [
        "consent-expired:4:2026-06-30"]


def test_a_renewed_consent_gets_no_renewal_notice() -> None:
    old, new = consent(4), consent(9, until=END + 365 * DAY, renews=4)
    assert due(now=at(END - 10 * DAY), consents=[old, new]) == []
    # Its end is still due (audited), marked as renewed.
    items = due(now=at(END + DAY), consents=[old, new])
    assert items == [Due(key="consent-expired:4:2026-06-30", kind="consent-expired",
                         child_id=1, consent_id=4, date=END, renewed_by=9)]


def test_a_revoked_renewal_does_not_count() -> None:
    old, new = consent(4), consent(9, until=END + 365 * DAY, status="revoked", renews=4)
    assert keys(due(now=at(END - 10 * DAY), consents=[old, new])) == [
        "consent-renewal:4:2026-06-30"]


def test_a_revoked_consent_is_never_due() -> None:
    c = consent(status="revoked")
    assert due(now=at(END - DAY), consents=[c]) == []
    assert due(now=at(END + DAY), consents=[c]) == []


def test_the_renewal_itself_is_reminded_in_its_own_last_month() -> None:
    old, new = consent(4), consent(9, until=END + 365 * DAY, renews=4)
    assert keys(due(now=at(END + 340 * DAY), consents=[old, new])) == [
        "consent-expired:4:2026-06-30", "consent-renewal:9:2027-06-30"]


def test_a_new_valid_until_is_a_new_occasion() -> None:
    a = keys(due(now=at(END - DAY), consents=[consent(until=END)]))
    b = keys(due(now=at(END + 5 * DAY), consents=[consent(until=END + 10 * DAY)]))
    assert a != b


# --- coming of age (pure) ----------------------------------------------------------------

BORN = dt.date(2009, 9, 10)  # 17 on 2026-09-10, 18 on 2027-09-10


def kid(birthdate: dt.date | None = BORN, majority: int | None = 18,
        notice: int | None = 17, cid: int = 1) -> ChildInfo:
    return ChildInfo(cid, birthdate, majority, notice)


def test_majority_notice_from_january_of_the_notice_year() -> None:
    assert due(now=at(dt.date(2025, 12, 31), 23), children=[kid()]) == []
    items = due(now=at(dt.date(2026, 1, 1), 0), children=[kid()])
    assert items == [Due(key="majority-notice:1:2026", kind="majority-notice", child_id=1,
                         date=dt.date(2027, 9, 10))]
    # Before the 17th birthday, on it, and after it: the same occasion.
    for day in (dt.date(2026, 9, 9), dt.date(2026, 9, 10), dt.date(2026, 12, 31)):
        assert keys(due(now=at(day), children=[kid()])) == ["majority-notice:1:2026"]


def test_majority_notice_until_the_day_before_majority() -> None:
    # A child the broker learns of after that year is still told, once.
    assert keys(due(now=at(dt.date(2027, 9, 9)), children=[kid()])) == [
        "majority-notice:1:2026"]


def test_majority_on_the_birthday_and_for_30_days() -> None:
    items = due(now=at(dt.date(2027, 9, 10), 0), children=[kid()])
    assert items == [Due(key="majority:1:2027-09-10", kind="majority", child_id=1,
                         date=dt.date(2027, 9, 10))]
    assert keys(due(now=at(dt.date(2027, 10, 10), 23), children=[kid()])) == [
        "majority:1:2027-09-10"]
    assert due(now=at(dt.date(2027, 10, 11), 0), children=[kid()]) == []


def test_no_notice_for_someone_who_came_of_age_long_ago() -> None:
    assert due(now=at(dt.date(2026, 5, 1)), children=[kid(dt.date(1990, 1, 1))]) == []
    assert due(now=at(dt.date(2026, 5, 1)), children=[kid(dt.date(2008, 3, 1))]) == []


def test_no_birthdate_or_no_majority_rule_no_notice() -> None:
    assert due(now=at(dt.date(2027, 9, 10)), children=[kid(None)]) == []
    assert due(now=at(dt.date(2027, 9, 10)), children=[kid(majority=None)]) == []


def test_no_notice_age_only_the_majority_notice() -> None:
    assert due(now=at(dt.date(2026, 5, 1)), children=[kid(notice=None)]) == []
    assert keys(due(now=at(dt.date(2027, 9, 10)), children=[kid(notice=None)])) == [
        "majority:1:2027-09-10"]


def test_other_majority_ages() -> None:
    child = kid(majority=21, notice=20)
    assert keys(due(now=at(dt.date(2029, 2, 1)), children=[child])) == [
        "majority-notice:1:2029"]
    assert keys(due(now=at(dt.date(2030, 9, 10)), children=[child])) == [
        "majority:1:2030-09-10"]


def test_leap_day_birthday_comes_of_age_on_1_march_in_a_common_year() -> None:
    leap = dt.date(2008, 2, 29)
    assert majority_date(leap, 18) == dt.date(2026, 3, 1)
    assert majority_date(leap, 16) == dt.date(2024, 2, 29)  # 2024 is a leap year
    assert keys(due(now=at(dt.date(2026, 2, 28), 23), children=[kid(leap)])) == [
        "majority-notice:1:2025"]
    assert keys(due(now=at(dt.date(2026, 3, 1), 0), children=[kid(leap)])) == [
        "majority:1:2026-03-01"]


def test_majority_date_agrees_with_age_on() -> None:
    start = dt.date(2000, 1, 1)
    for i in range(0, 3 * 366, 7):
        born = start + dt.timedelta(days=i)
        for age in (16, 17, 18, 21):
            day = majority_date(born, age)
            assert age_on(born, day) == age
            assert age_on(born, day - DAY) == age - 1
    leap = dt.date(2004, 2, 29)
    for age in range(1, 30):
        day = majority_date(leap, age)
        assert age_on(leap, day) == age and age_on(leap, day - DAY) == age - 1


def test_everything_together_in_a_stable_order() -> None:
    now = at(dt.date(2026, 6, 20))
    args = {
        "now": now,
        "records": [held(5, received=now - 4 * DAY), held(2, received=now - 8 * DAY)],
        "reminder_days": (3, 7),
        "consents": [consent(8, until=dt.date(2026, 7, 1)), consent(3, until=dt.date(2026, 6, 1))],
        "children": [kid(cid=2), kid(dt.date(2008, 6, 19), cid=1)],
    }
    first = due(**args)
    assert keys(first) == ["hold:2:day7", "hold:5:day3", "consent-expired:3:2026-06-01",
                           "consent-renewal:8:2026-07-01", "majority:1:2026-06-19",
                           "majority-notice:2:2026"]
    assert due(**args) == first


# --- texts -------------------------------------------------------------------------------


def test_texts_fit_76_columns_and_name_what_they_must() -> None:
    view = texts.ConsentView(
        id=4, purpose="Coordinating occupational therapy goals between the clinic and the "
        "school for the whole of the school year", disclosers=("Dr. Lee <lee@clinic.example>",
                                                               "everyone tagged therapy"),
        recipients=("Mr Ortiz <ortiz@school.example>",), categories=("ot_progress",),
        valid_from=dt.date(2025, 7, 1), valid_until=END)
    outs = {
        "reminder": texts.render_reminder(
            child_name="Sam Rivera", record_id=12, subject="OT progress report",
            sender="lee@clinic.example", received_at=T0, expires_at=T0 + 14 * DAY, days=3,
            person_name="Dana Rivera"),
        "renewal": texts.render_consent_renewal(child_name="Sam Rivera", consent=view),
        "expired": texts.render_consent_expired(child_name="Sam Rivera", consent=view),
        "notice": texts.render_majority_notice(
            child_name="Sam Rivera", majority_date=dt.date(2027, 9, 10), majority_age=18,
            jurisdiction="United States (federal)"),
        "reached": texts.render_majority_reached(
            child_name="Sam Rivera", majority_date=dt.date(2027, 9, 10), majority_age=18,
            jurisdiction="Illinois", to_student=True),
    }
    for name, text in outs.items():
        assert all(len(line) <= 76 for line in text.splitlines()), name
    assert "Record 12" in outs["reminder"] and "Decide by: Mon 16 Mar 2026" in outs["reminder"]
    assert "lee@clinic.example" in outs["reminder"] and "Received:  Mon 2 Mar 2026" in (
        outs["reminder"])
    for name in ("renewal", "expired"):
        assert "Consent #4" in outs[name] and "broker consent renew 4" in outs[name]
        assert "Tue 30 Jun 2026" in outs[name] and "ot_progress" in outs[name]
        assert "everyone tagged therapy" in outs[name] and "ortiz@school.example" in outs[name]
    assert "Sam turns 18 on Fri 10 Sep 2027" in outs["notice"]
    assert "broker team delegate" in outs["notice"]
    assert "You turned 18 on Fri 10 Sep 2027" in outs["reached"]
    with pytest.raises(ValueError):
        texts.render_reminder(child_name="S", record_id=1, subject="", sender="", days=3,
                              received_at=T0, expires_at=T0, answer="maybe")  # type: ignore


# --- a real broker ------------------------------------------------------------------------

PROVIDER = "lee@clinic.example"
# Records made directly in the database are held from a few minutes ago: each run also
# expires holds on the real clock (expire_due), so a record must not be old in real time.
HELD_AT = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
GUARDIAN2 = "alex@home.example"
STUDENT = "sam.student@home.example"
TEAM_TWO = """
[child]
slug = "sam"
name = "Sam Rivera"
birthdate = "{birthdate}"
jurisdiction = "{jurisdiction}"

[[guardians]]
name = "Dana Rivera"
email = "dana@home.example"

[[guardians]]
name = "Alex Rivera"
email = "alex@home.example"

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
"""


def _team(birthdate: str = "2014-03-02", jurisdiction: str = "us-federal",
          student: bool = True) -> str:
    text = TEAM_TWO.format(birthdate=birthdate, jurisdiction=jurisdiction)
    if student:
        text += f'\n[student]\nname = "Sam Rivera"\nemail = "{STUDENT}"\n'
    return text


def _home(tmp_path: Path, db_url: str, team: str) -> World:
    """A home and a database with this team, no broker running: runs are driven here.
    Its content key is registered, so sealed columns can be written directly."""
    world = World(tmp_path / "home", db_url, team=team)
    open_vault(world.settings)
    return world


@pytest.fixture
def home(tmp_path: Path, db_url: str) -> Iterator[World]:
    world = _home(tmp_path, db_url, _team(student=False))
    yield world
    world.db.dispose()


def _open(world: World) -> Runtime:
    return Runtime.open(world.settings)


def _run(world: World, now: dt.datetime) -> int:
    """One scheduler run in a fresh runtime: every run is a restart."""
    rt = _open(world)
    try:
        return run_schedule(rt, now=now)
    finally:
        rt.close()


def _notices(world: World, to: str | None = None) -> list[EmailMessage]:
    """The queued notices (kind "notice"), as parsed messages, oldest first."""
    rt = _open(world)
    try:
        with rt.db.session() as s:
            q = select(Delivery).where(Delivery.kind == "notice").order_by(Delivery.id)
            if to is not None:
                q = q.where(Delivery.recipient == to)
            out = []
            for d in s.scalars(q):
                msg = email.message_from_bytes(rt.content.get(d.content_ref, s),
                                               policy=policy.default)
                assert isinstance(msg, EmailMessage)
                out.append(msg)
            return out
    finally:
        rt.close()


def _text(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("plain",))
    return body.get_content() if body is not None else ""


def _child(world: World) -> Child:
    with world.db.session() as s:
        child = s.scalar(select(Child).where(Child.slug == "sam"))
        assert child is not None
        return child


def _record(world: World, received: dt.datetime, state: str = states.AWAITING_REVIEW,
            lifetime: float = 14) -> int:
    child = _child(world)
    with world.db.session() as s:
        r = Record(child_id=child.id, state=state, sender_email=PROVIDER,
                   subject="OT progress report", raw_ref="none", raw_sha256="0" * 64,
                   received_at=received, expires_at=received + dt.timedelta(days=lifetime))
        s.add(r)
        s.flush()
        return r.id


def _consent(world: World, until: dt.date, renews: int | None = None,
             status: str = "active", signed_by: tuple[str, ...] = (GUARDIAN,)) -> int:
    child = _child(world)
    with world.db.session() as s:
        c = Consent(child_id=child.id, disclosers=json.dumps([PROVIDER]),
                    recipients=json.dumps(["tag:ot", "park@school.example"]),
                    categories=json.dumps(["ot_progress"]), purpose="OT coordination",
                    valid_from=until - dt.timedelta(days=364), valid_until=until,
                    signed_by=json.dumps(list(signed_by)), mode="review", status=status,
                    renews_id=renews)
        s.add(c)
        s.flush()
        return c.id


def _audit(world: World, action: str) -> list[AuditEvent]:
    with world.db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)
                              .order_by(AuditEvent.seq)))


def _sent_keys(world: World) -> list[str]:
    with world.db.session() as s:
        return sorted(s.scalars(select(SentReminder.key)))


def _assert_chain(world: World) -> None:
    with world.db.session() as s:
        assert verify_log(s).ok


def test_hold_reminder_story_over_smtp(tmp_path: Path, db_url: str) -> None:
    """A record held; the scheduler at day 3, then again after a restart: one reminder per
    guardian, threaded on the review request; replying to it decides the record."""
    world = World(tmp_path / "home", db_url, team=_team(student=False)).start()
    try:
        world.send(report(), PROVIDER, f"sam@{DOMAIN}")
        review = world.review()
        review2 = world.review(to=GUARDIAN2)
        record = world.wait_state(states.AWAITING_REVIEW)
        assert record.expires_at is not None
        day3 = record.received_at + 3 * DAY + dt.timedelta(minutes=1)

        assert world.service is not None
        assert run_schedule(world.service.rt, now=day3) >= 1
        assert _run(world, day3) == 0  # a restart: nothing new

        reminder = world.notice("Reminder, review needed")
        reminder2 = world.notice("Reminder, review needed", to=GUARDIAN2)
        world.settle(0.5)
        assert len(world.to(GUARDIAN, "Reminder")) == 1
        assert len(world.to(GUARDIAN2, "Reminder")) == 1
        assert world.all_to(["park@school.example", "ortiz@school.example"]) == []
        assert [str(m.msg["Subject"]) for m in world.all_to([PROVIDER])] == [
            "Received and held for review: OT progress report"]
        for got, req in ((reminder, review), (reminder2, review2)):
            msg = got.msg
            assert str(msg["In-Reply-To"]) == str(req.msg["Message-ID"])
            assert str(req.msg["Message-ID"]) in str(msg["References"])
            assert str(msg["Reply-To"]) == str(req.msg["Reply-To"])
            assert f"#{record.id}]" in str(msg["Subject"])
            text = got.text()
            assert f"Record {record.id}" in text and PROVIDER in text
            assert "Decide by:" in text and "family conflict" not in text
        events = world.audit("reminder_sent")
        assert len(events) == 1 and events[0].record_id == record.id
        assert sorted(json.loads(events[0].recipients)) == sorted([GUARDIAN, GUARDIAN2])
        assert "OT progress" not in events[0].description

        # Day 7: the next reminder, once; once the hold has run out: none.
        day7 = record.received_at + 7 * DAY
        assert _run(world, day7) == 1
        assert _run(world, day7 + DAY) == 0
        assert _run(world, record.received_at + 20 * DAY) == 0  # next one on day 21
        world.wait_for(lambda m: GUARDIAN in m.rcpt_tos
                       and "Reminder" in str(m.msg["Subject"]), count=2)
        assert _sent_keys(world) == [f"hold:{record.id}:day3", f"hold:{record.id}:day7"]

        # A reply to the reminder, sent to the list address (no review address at all):
        # its References carry the review request's Message-ID, which finds the record.
        answer = EmailMessage()
        answer["From"] = f"Dana Rivera <{GUARDIAN}>"
        answer["To"] = f"sam@{DOMAIN}"
        answer["Subject"] = "Re: " + str(reminder.msg["Subject"])
        answer["In-Reply-To"] = str(reminder.msg["Message-ID"])
        answer["References"] = (f"{reminder.msg['References']} "
                                f"{reminder.msg['Message-ID']}")
        answer["Message-ID"] = email.utils.make_msgid(domain="home.example")
        answer.set_content("APPROVE\n")
        world.send(answer, GUARDIAN, f"sam@{DOMAIN}")
        world.wait_state(states.RELEASED, timeout=20)
        assert _run(world, record.received_at + 8 * DAY) == 0
        _assert_chain(world)
    finally:
        world.stop()


def test_reminder_references_the_newest_live_request(home: World) -> None:
    """Deliveries decide what a reminder points at: the person's newest review/preview
    whose token is live; otherwise it says the request was replaced or never sent."""
    from broker.mail import compose as mc
    from broker.review import tokens

    rid = _record(home, HELD_AT)
    with home.db.session() as s:
        record = s.get(Record, rid)
        assert record is not None
        old = tokens.issue(s, record, HELD_AT + 14 * DAY)
        dana = s.scalar(select(Person).where(Person.email == GUARDIAN))
        alex = s.scalar(select(Person).where(Person.email == GUARDIAN2))
        assert dana is not None and alex is not None
        for seq, person in enumerate((dana, alex)):
            s.add(Delivery(kind="review", child_id=record.child_id, record_id=rid,
                           person_id=person.id, recipient=person.email, content_ref="x",
                           message_id=mc.review_message_id(old, DOMAIN, seq), sha256="0",
                           state="sent"))
        new = tokens.issue(s, record, HELD_AT + 14 * DAY)  # a preview for Dana only
        s.add(Delivery(kind="preview", child_id=record.child_id, record_id=rid,
                       person_id=dana.id, recipient=dana.email, content_ref="x",
                       message_id=mc.review_message_id(new, DOMAIN, 1), sha256="0",
                       state="sent"))
    assert _run(home, HELD_AT + 3 * DAY) == 1
    to_dana, = _notices(home, GUARDIAN)
    to_alex, = _notices(home, GUARDIAN2)
    assert str(to_dana["In-Reply-To"]) == mc.review_message_id(new, DOMAIN, 1)
    assert str(to_dana["Reply-To"]) == mc.review_address(new, DOMAIN)
    assert "reply to this reminder" in _text(to_dana)
    # Alex's request was superseded: threaded on it, but no review address to answer.
    assert str(to_alex["In-Reply-To"]) == mc.review_message_id(old, DOMAIN, 1)
    assert to_alex["Reply-To"] is None
    assert "replaced by a newer" in _text(to_alex)
    assert json.loads(_audit(home, "reminder_sent")[0].description)["answers"] == {
        "reply": 1, "replaced": 1}


def test_reminders_once_across_restarts_and_days(home: World) -> None:
    rid = _record(home, HELD_AT)
    assert _run(home, HELD_AT + 2 * DAY) == 0
    assert _run(home, HELD_AT + 3 * DAY) == 1
    for _ in range(3):
        assert _run(home, HELD_AT + 3 * DAY + dt.timedelta(hours=5)) == 0
    assert len(_notices(home, GUARDIAN)) == 1 and len(_notices(home, GUARDIAN2)) == 1
    msg = _notices(home, GUARDIAN)[0]
    assert f"[Sam's records #{rid}] Reminder, review needed: OT progress report" == str(
        msg["Subject"])
    assert "No review request for this record was sent to you" in _text(msg)
    assert _run(home, HELD_AT + 13 * DAY) == 1  # day 7 (a broker down on day 7 still sends it)
    # Day 21 is past the 14-day hold: no reminder; the hold expires instead (1), and each
    # guardian is told it expired.
    assert _run(home, HELD_AT + 22 * DAY) == 1
    notices = _notices(home)
    assert len(notices) == 6
    assert sum("Expired, not shared" in str(m["Subject"]) for m in notices) == 2
    assert len(_audit(home, "reminder_sent")) == 2
    _assert_chain(home)


def test_reminders_skip_decided_records(home: World) -> None:
    _record(home, HELD_AT, state=states.DENIED)
    _record(home, HELD_AT, state=states.RELEASED)
    assert _run(home, HELD_AT + 3 * DAY) == 0
    assert _notices(home) == []


def test_two_processes_send_each_reminder_once(home: World) -> None:
    for i in range(5):
        _record(home, HELD_AT + dt.timedelta(minutes=i))
    runtimes = [_open(home) for _ in range(4)]
    counts: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(runtimes))

    def go(rt: Runtime) -> None:
        try:
            barrier.wait()
            counts.append(run_schedule(rt, now=HELD_AT + 4 * DAY))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(rt,)) for rt in runtimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for rt in runtimes:
        rt.close()
    assert errors == []
    assert sum(counts) == 5
    assert len(_notices(home, GUARDIAN)) == 5 and len(_notices(home, GUARDIAN2)) == 5
    assert len(_audit(home, "reminder_sent")) == 5
    _assert_chain(home)


def test_a_key_already_taken_is_skipped_alone(home: World,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A unique violation (another process's key) undoes only that occasion."""
    from broker.schedule import run

    first, second = _record(home, HELD_AT), _record(home, HELD_AT)
    with home.db.session() as s:
        s.add(SentReminder(key=f"hold:{first}:day3"))
    real = run.pending

    def stale(s, rules, now):  # what a process that read before the other committed sees
        items = real(s, rules, now)
        return [Due(key=f"hold:{first}:day3", kind="hold", child_id=items[0].child_id,
                    record_id=first, day=3), *items]

    monkeypatch.setattr(run, "pending", stale)
    assert _run(home, HELD_AT + 3 * DAY) == 1
    events = _audit(home, "reminder_sent")
    assert [e.record_id for e in events] == [second]
    with home.db.session() as s:
        assert s.scalar(select(func.count(Delivery.id)).where(
            Delivery.record_id == first)) == 0


def test_consent_renewal_notice_once(home: World) -> None:
    today = dt.date(2026, 6, 1)
    cid = _consent(home, today + 29 * DAY)
    assert _run(home, at(today)) == 1
    assert _run(home, at(today)) == 0
    assert _run(home, at(today + 10 * DAY)) == 0
    msgs = _notices(home, GUARDIAN)
    assert len(msgs) == 1 and len(_notices(home, GUARDIAN2)) == 1
    assert _notices(home, STUDENT) == []  # no student on this team
    msg = msgs[0]
    assert str(msg["Subject"]).startswith("[Sam's records] Consent ends soon: #")
    text = _text(msg)
    assert f"Consent #{cid}" in text and f"broker consent renew {cid}" in text
    assert "OT coordination" in text and "everyone tagged ot" in text
    assert "Dr. Lee <lee@clinic.example>" in text and "ot_progress" in text
    assert "Tue 30 Jun 2026" in text
    events = _audit(home, "consent_renewal_notice")
    assert len(events) == 1
    assert json.loads(events[0].description)["consent"] == cid
    assert "OT coordination" not in events[0].description


def test_no_renewal_notice_for_a_renewed_consent(home: World) -> None:
    today = dt.date(2026, 6, 1)
    old = _consent(home, today + 20 * DAY)
    _consent(home, today + 385 * DAY, renews=old)
    assert _run(home, at(today)) == 0
    assert _notices(home) == []


def test_consent_expired_audited_once_and_told(home: World) -> None:
    today = dt.date(2026, 6, 1)
    cid = _consent(home, today - DAY)
    assert _run(home, at(today)) == 1
    assert _run(home, at(today + 3 * DAY)) == 0
    events = _audit(home, "consent_expired")
    assert len(events) == 1
    assert json.loads(events[0].description) == {
        "key": f"consent-expired:{cid}:2026-05-31", "consent": cid, "valid_until": "2026-05-31"}
    msgs = _notices(home, GUARDIAN)
    assert len(msgs) == 1 and "Consent ended" in str(msgs[0]["Subject"])
    assert "has ended" in _text(msgs[0])


def test_a_renewed_consent_ends_in_the_audit_only(home: World) -> None:
    today = dt.date(2026, 6, 1)
    old = _consent(home, today - DAY)
    new = _consent(home, today + 364 * DAY, renews=old)
    assert _run(home, at(today)) == 1
    events = _audit(home, "consent_expired")
    assert len(events) == 1 and json.loads(events[0].description)["renewed_by"] == new
    assert json.loads(events[0].recipients) == []
    assert _notices(home) == []


def test_a_revoked_consent_is_left_alone(home: World) -> None:
    _consent(home, dt.date(2026, 6, 1), status="revoked")
    assert _run(home, at(dt.date(2026, 6, 20))) == 0
    assert _run(home, at(dt.date(2026, 5, 20))) == 0
    assert _audit(home, "consent_expired") == []


def test_consent_signed_by_the_student_tells_the_student(tmp_path: Path, db_url: str) -> None:
    world = _home(tmp_path, db_url, _team("2009-09-10"))
    try:
        _consent(world, dt.date(2026, 6, 20), signed_by=(GUARDIAN, STUDENT))
        _consent(world, dt.date(2026, 6, 25))  # signed by a guardian alone
        # Two consent notices, and the coming-of-age notice (Sam turns 17 this year).
        assert _run(world, at(dt.date(2026, 6, 1))) == 3
        told = [m for m in _notices(world, STUDENT) if "Consent" in str(m["Subject"])]
        assert len(told) == 1 and "Hello Sam Rivera" in _text(told[0])
        assert len([m for m in _notices(world, GUARDIAN)
                    if "Consent" in str(m["Subject"])]) == 2
    finally:
        world.db.dispose()


def test_majority_notice_in_the_year_the_student_turns_17(tmp_path: Path,
                                                         db_url: str) -> None:
    world = _home(tmp_path, db_url, _team("2009-09-10"))
    try:
        now = at(dt.date(2026, 2, 1))
        assert _run(world, now) == 1
        assert _run(world, now + 100 * DAY) == 0
        assert _run(world, at(dt.date(2027, 3, 1))) == 0
        for to in (GUARDIAN, GUARDIAN2, STUDENT):
            msgs = _notices(world, to)
            assert len(msgs) == 1, to
            assert str(msgs[0]["Subject"]) == (
                "[Sam's records] Coming of age: Sam decides alone from Fri 10 Sep 2027")
        assert "You turn 18 on Fri 10 Sep 2027" in _text(_notices(world, STUDENT)[0])
        guardian_text = _text(_notices(world, GUARDIAN)[0])
        assert "Sam turns 18 on Fri 10 Sep 2027" in guardian_text
        assert "ordinary members of the team" in guardian_text
        assert "broker team delegate" in guardian_text
        events = _audit(world, "majority_notice")
        assert len(events) == 1
        assert json.loads(events[0].description) == {"jurisdiction": "us-federal",
                                                     "majority_age": 18}
        assert "2009" not in events[0].description and "2027" not in events[0].description
    finally:
        world.db.dispose()


def test_majority_reached_on_the_18th_birthday(tmp_path: Path, db_url: str) -> None:
    world = _home(tmp_path, db_url, _team("2008-03-14"))
    try:
        assert _run(world, at(dt.date(2026, 3, 13), 23)) == 1  # still the notice
        assert _audit(world, "majority_reached") == []
        assert _run(world, at(dt.date(2026, 3, 14), 0)) == 1
        assert _run(world, at(dt.date(2026, 3, 20))) == 0
        assert _run(world, at(dt.date(2026, 4, 20))) == 0
        assert len(_audit(world, "majority_reached")) == 1
        assert len(_audit(world, "majority_notice")) == 1
        reached = [m for m in _notices(world, STUDENT) if "Of age" in str(m["Subject"])]
        assert len(reached) == 1
        assert "You turned 18 on Sat 14 Mar 2026" in _text(reached[0])
        assert len([m for m in _notices(world, GUARDIAN)
                    if "Of age" in str(m["Subject"])]) == 1
        _assert_chain(world)
    finally:
        world.db.dispose()


def test_adult_long_before_gets_nothing(tmp_path: Path, db_url: str) -> None:
    world = _home(tmp_path, db_url, _team("2000-01-01"))
    try:
        assert _run(world, at(dt.date(2026, 6, 1))) == 0
        assert _notices(world) == []
    finally:
        world.db.dispose()


def test_of_age_student_alone_gets_hold_reminders_unless_delegated(tmp_path: Path,
                                                             db_url: str) -> None:
    world = _home(tmp_path, db_url, _team("2000-01-01"))
    try:
        _record(world, HELD_AT)
        assert _run(world, HELD_AT + 3 * DAY) == 1
        # Of age: the student decides alone; the guardians hear nothing of the record.
        assert len(_notices(world, STUDENT)) == 1
        assert _notices(world, GUARDIAN) == []
        with world.db.session() as s:
            child = s.scalar(select(Child).where(Child.slug == "sam"))
            assert child is not None
            child.delegated = True
        _record(world, HELD_AT)
        assert _run(world, HELD_AT + 3 * DAY) == 1
        # Delegated back: the guardians decide; the new record's reminder goes to them
        # (the first record's day-3 reminder went to the student, once).
        assert len(_notices(world, STUDENT)) == 1
        assert len(_notices(world, GUARDIAN)) == 1
    finally:
        world.db.dispose()


def test_minor_student_gets_no_hold_reminder(tmp_path: Path, db_url: str) -> None:
    world = _home(tmp_path, db_url, _team("2014-03-02"))
    try:
        _record(world, HELD_AT)
        assert _run(world, HELD_AT + 3 * DAY) == 1
        assert _notices(world, STUDENT) == []
    finally:
        world.db.dispose()
