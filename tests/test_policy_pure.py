"""The pure policy core: who decides on a given day, and what the rules say about a record
(categories, routing, consent coverage, automatic release, patterns). Plain data in,
plain data out: no database, no mail."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.policy.authority import Decider, age_on, authority
from broker.policy.consent import ConsentTerms, Party, covering, default_until, validate
from broker.policy.evaluate import PARENT_DIRECTED, Member, evaluate
from broker.policy.rules import load_rules
from broker.runtime import SHIPPED_RULES

RULES = load_rules(SHIPPED_RULES)
DANA = Decider(1, "dana@home.example", "Dana", "guardian")
CHRIS = Decider(2, "chris@home.example", "Chris", "guardian")
SAM = Decider(3, "sam@student.example", "Sam", "student")
TODAY = dt.date(2026, 11, 23)

CLINIC_OT = Member(10, "lee@clinic.example", "Dr. Lee", "provider", ("ot",))
THERAPIST = Member(11, "kim@therapy.example", "Dr. Kim", "provider", ("therapy",))
SCHOOL_OT = Member(20, "ortiz@school.example", "Mr Ortiz", "school", ("ot",))
CASE = Member(21, "park@school.example", "Ms Park", "school", ("case-manager",))
TEACHER = Member(22, "jones@school.example", "Mrs Jones", "school", ("teacher",))
COUNSELOR = Member(23, "ng@school.example", "Mr Ng", "school", ("counselor",))
TEAM = (CLINIC_OT, THERAPIST, SCHOOL_OT, CASE, TEACHER, COUNSELOR)


def who(jurisdiction: str = "us-federal", *, birthdate: dt.date | None, categories=(),
        approval: str = "any", delegated: bool = False, student: Decider | None = SAM,
        day: dt.date = TODAY, guardians=(DANA, CHRIS)):
    return authority(guardians=list(guardians), student=student, birthdate=birthdate,
                     jurisdiction=RULES.jurisdictions[jurisdiction],
                     categories=list(categories), approval=approval, delegated=delegated,
                     day=day)


def years_before(day: dt.date, years: int) -> dt.date:
    return day.replace(year=day.year - years)


# -- who decides ------------------------------------------------------------------------------


def test_one_guardian_is_enough_by_default() -> None:
    a = who(birthdate=years_before(TODAY, 9))
    assert [g.need for g in a.groups] == ["one"]
    assert a.waiting_for({DANA.email}) == []
    assert a.can_veto(CHRIS.email) and not a.can_veto(SAM.email)


def test_approval_all_needs_every_guardian() -> None:
    a = who(birthdate=years_before(TODAY, 9), approval="all")
    assert [m.email for m in a.missing({DANA.email})] == [CHRIS.email]
    assert a.waiting_for({DANA.email, CHRIS.email}) == []
    # With one guardian "all" is simply that guardian.
    single = who(birthdate=years_before(TODAY, 9), approval="all", guardians=(DANA,))
    assert single.waiting_for({DANA.email}) == []


@pytest.mark.parametrize(("jurisdiction", "age", "has_say"), [
    ("us-il", 11, False), ("us-il", 12, True), ("us-il", 17, True),
    ("us-ca", 12, True), ("us-ca", 11, False),
    ("us-wa", 12, False), ("us-wa", 13, True),
    ("us-pa", 13, False), ("us-pa", 14, True),
    ("us-federal", 16, False),
])
def test_co_consent_ages_per_state(jurisdiction: str, age: int, has_say: bool) -> None:
    a = who(jurisdiction, birthdate=years_before(TODAY, age), categories=["mental_health"])
    assert (SAM in a.deciders) is has_say
    if has_say:
        assert a.missing({DANA.email}) == [SAM]
    # Other categories never need the child's consent before majority.
    assert SAM not in who(jurisdiction, birthdate=years_before(TODAY, age),
                          categories=["ot_progress"]).deciders


def test_illinois_child_may_veto_other_states_do_not_say_so() -> None:
    il = who("us-il", birthdate=years_before(TODAY, 13), categories=["mental_health"])
    assert il.can_veto(SAM.email)
    wa = who("us-wa", birthdate=years_before(TODAY, 13), categories=["mental_health"])
    assert SAM in wa.deciders and not wa.can_veto(SAM.email)


def test_birthdays_are_evaluated_on_the_day_of_the_decision() -> None:
    birthdate = dt.date(2014, 11, 24)
    eve = who("us-il", birthdate=birthdate, categories=["mental_health"], day=TODAY)
    birthday = who("us-il", birthdate=birthdate, categories=["mental_health"],
                   day=TODAY + dt.timedelta(days=1))
    assert SAM not in eve.deciders and SAM in birthday.deciders


def test_leap_day_birthday() -> None:
    birthdate = dt.date(2008, 2, 29)
    assert age_on(birthdate, dt.date(2026, 2, 28)) == 17
    assert age_on(birthdate, dt.date(2026, 3, 1)) == 18


def test_at_majority_the_student_decides_alone() -> None:
    a = who(birthdate=years_before(TODAY, 18))
    assert a.deciders == (SAM,)
    assert a.decider(DANA.email) is None
    assert "decides alone" in " ".join(a.reasons)


def test_delegation_hands_decisions_back_to_the_guardians() -> None:
    a = who(birthdate=years_before(TODAY, 19), delegated=True)
    assert SAM not in a.deciders and DANA in a.deciders


def test_of_age_without_student_address_guardians_continue() -> None:
    a = who(birthdate=years_before(TODAY, 18), student=None)
    assert a.deciders == (DANA, CHRIS)
    assert "no [student] address" in " ".join(a.reasons)


def test_co_consent_without_student_address_blocks() -> None:
    a = who("us-il", birthdate=years_before(TODAY, 13), categories=["mental_health"],
            student=None)
    assert a.blocked and "no [student] address" in a.blocked


@given(st.dates(min_value=dt.date(1990, 1, 1), max_value=dt.date(2030, 12, 31)),
       st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2040, 12, 31)))
def test_age_is_whole_years_since_birth(birthdate: dt.date, day: dt.date) -> None:
    age = age_on(birthdate, day)
    if day >= birthdate:
        assert age >= 0
        # The age-th birthday has passed and the next one has not.
        def birthday(n: int) -> dt.date:
            try:
                return birthdate.replace(year=birthdate.year + n)
            except ValueError:
                return dt.date(birthdate.year + n, 3, 1)
        assert birthday(age) <= day < birthday(age + 1)


# -- consents ---------------------------------------------------------------------------------


def terms(**kw) -> ConsentTerms:
    base = dict(id=1, disclosers=("lee@clinic.example",), recipients=("tag:ot",),
                categories=("ot_progress",), purpose="OT goals",
                valid_from=dt.date(2026, 1, 1), valid_until=dt.date(2026, 12, 31))
    return ConsentTerms(**{**base, **kw})


def test_coverage_needs_sender_recipient_every_category_and_the_date() -> None:
    c = terms()
    lee, ortiz = CLINIC_OT.party, SCHOOL_OT.party
    assert covering([c], sender=lee, recipient=ortiz, categories=["ot_progress"], day=TODAY)
    assert not covering([c], sender=lee, recipient=CASE.party, categories=["ot_progress"],
                        day=TODAY)
    assert not covering([c], sender=THERAPIST.party, recipient=ortiz,
                        categories=["ot_progress"], day=TODAY)
    assert not covering([c], sender=lee, recipient=ortiz,
                        categories=["ot_progress", "mental_health"], day=TODAY)
    assert not covering([c], sender=lee, recipient=ortiz, categories=[], day=TODAY)
    assert not covering([c], sender=lee, recipient=ortiz, categories=["ot_progress"],
                        day=dt.date(2027, 1, 1))
    assert not covering([terms(status="revoked")], sender=lee, recipient=ortiz,
                        categories=["ot_progress"], day=TODAY)
    assert not covering([terms(categories=("psychotherapy_notes",))], sender=lee,
                        recipient=ortiz, categories=["psychotherapy_notes"], day=TODAY,
                        no_standing_consent=["psychotherapy_notes"])
    assert covering([c], sender=Party("LEE@clinic.example"), recipient=Party("x@y", ("OT",)),
                    categories=["ot_progress"], day=TODAY)


def test_consent_validation_speaks_plainly() -> None:
    problems = validate(disclosers=["everyone"], recipients=[], categories=["mental_health",
                        "nope"], purpose=" ", valid_from=TODAY, valid_until=None,
                        mode="auto", known_categories=RULES.categories,
                        sensitive_categories=["mental_health"], requires_expiry=True)
    text = "\n".join(problems)
    assert "never covers everyone" in text
    assert "name at least one recipient" in text
    assert "unknown category 'nope'" in text
    assert "a purpose is required" in text
    assert "mental_health is sensitive" in text
    assert "calendar expiry date" in text


def test_default_validity_is_a_year() -> None:
    assert default_until(dt.date(2026, 3, 1)) == dt.date(2027, 2, 28)
    assert default_until(dt.date(2024, 2, 29)) == dt.date(2025, 2, 28)


# -- evaluation -------------------------------------------------------------------------------


def ev(sender: Member = CLINIC_OT, body: str = "Handwriting improved.", consents=(),
       subject: str = "Progress", jurisdiction: str = "us-federal", **kw):
    return evaluate(RULES, jurisdiction=jurisdiction, sender=sender, members=TEAM,
                    subject=subject, paragraphs=[body], attachment_names=[],
                    consents=list(consents), day=TODAY, **kw)


def test_evaluation_routes_and_explains() -> None:
    e = ev()
    assert e.categories == ("ot_progress",)
    assert e.recipients == (SCHOOL_OT.email, CASE.email)
    reasons = e.reasons()
    assert "sender tag ot -> category ot_progress" in reasons
    assert "routing: ot_progress -> ot, case-manager" in reasons
    assert all(c.label == PARENT_DIRECTED for c in e.coverage)


def test_no_category_suggests_the_other_side() -> None:
    plain = Member(12, "office@clinic.example", "Front desk", "provider", ())
    e = ev(sender=plain, body="Our office is closed on Monday.", subject="Closure")
    assert e.categories == ()
    assert set(e.recipients) == {SCHOOL_OT.email, CASE.email, TEACHER.email, COUNSELOR.email}
    assert "no category rule matched" in e.reasons()


def test_sensitive_categories_route_to_nobody_by_default() -> None:
    e = ev(sender=THERAPIST, body="Psychotherapy notes from Tuesday.")
    assert "psychotherapy_notes" in e.categories
    # mental_health (sender tag) routes to the counselor and case manager.
    assert e.recipients == (CASE.email, COUNSELOR.email)


def test_automatic_release_only_when_every_recipient_is_covered_and_nothing_sensitive() -> None:
    auto = terms(recipients=("tag:ot", "tag:case-manager"), mode="auto")
    assert ev(consents=[auto]).auto_consent == 1
    partial = terms(recipients=("tag:ot",), mode="auto")
    e = ev(consents=[partial])
    assert e.auto_consent is None and "park@school.example" in e.auto_reason
    sensitive = ev(body="Handwriting improved; anxiety was lower.", consents=[auto])
    assert sensitive.auto_consent is None and "mental_health is sensitive" in (
        sensitive.auto_reason)
    review_mode = ev(consents=[terms(recipients=("tag:ot", "tag:case-manager"))])
    assert review_mode.auto_consent is None
    assert ev(consents=[auto], guardians_only=False).auto_consent is None


def test_patterns_always_and_suggested() -> None:
    e = ev(body="SSN 123-45-6789. Call (312) 555-0147. DOB: 03/02/2014")
    assert e.always_redacted == {"us_ssn": 1}
    assert e.redact_phrases == ("123-45-6789",)
    assert {s["name"] for s in e.suggestions} >= {"phone", "date_of_birth"}


def test_release_notice_for_substance_use() -> None:
    e = ev(sender=THERAPIST, body="The alcohol screening was negative.")
    assert e.notices == ("42 CFR part 2 prohibits unauthorized use or disclosure of these "
                         "records.",)


def test_evaluation_round_trips_through_json() -> None:
    from broker.policy.evaluate import Evaluation

    e = ev(consents=[terms()])
    assert Evaluation.from_json(e.to_json()) == e


@given(st.lists(st.sampled_from(
    ["Handwriting", "fine  motor", "self-harm", "re-evaluation", "ANXIETY", "therapy",
     "speech therapy session", "pilot", "mg", "dosage.", "Ünïcode", "ß", "K", "sti",
     "x", "\n\n", "-", "substance\tuse", "İstanbul"]), max_size=12))
def test_token_precheck_never_changes_the_classification(parts: list[str]) -> None:
    """The fast pre-check (first token present) finds exactly what the plain regexes find."""
    from broker.policy.classify import classify

    text = " ".join(parts)
    fast = classify(RULES, subject="", paragraphs_text=text)
    slow = [(c.name, w) for c in RULES.categories.values()
            for w, rx in c.word_patterns if rx.search(text)]
    assert [(m.category, m.evidence) for m in fast if m.kind == "body"] == slow
