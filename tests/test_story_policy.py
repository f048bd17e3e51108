"""Stories of the policy (rules/, consents on file, several people with a say), end to end:
real SMTP in and out, a real database, the shipped rules.

The team: a clinic OT and a therapist (providers), the school OT, a case manager, a teacher
and a counselor (school), two guardians, and the student.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from broker.cli.main import cli
from broker.consents.manage import add_consent
from broker.db.models import Approval, Consent, Delivery, Record
from broker.runtime import Runtime
from tests.harness import DOMAIN, World, reply_to, report

DANA = "dana@home.example"
CHRIS = "chris@home.example"
STUDENT = "sam.r@student.example"
CLINIC_OT = "lee@clinic.example"
THERAPIST = "kim@therapy.example"
SCHOOL_OT = "ortiz@school.example"
CASE_MANAGER = "park@school.example"
TEACHER = "jones@school.example"
COUNSELOR = "ng@school.example"
SCHOOL = (SCHOOL_OT, CASE_MANAGER, TEACHER, COUNSELOR)


def born(years_ago: int, days: int = 0) -> str:
    today = dt.datetime.now(dt.UTC).date()
    try:
        day = today.replace(year=today.year - years_ago)
    except ValueError:  # 29 February
        day = today.replace(year=today.year - years_ago, day=28)
    return (day - dt.timedelta(days=days)).isoformat()


def team(*, birthdate: str = born(9), jurisdiction: str = "us-federal",
         approval: str = "any", student: bool = False) -> str:
    return f"""
[child]
slug = "sam"
name = "Sam Rivera"
birthdate = "{birthdate}"
jurisdiction = "{jurisdiction}"
approval = "{approval}"

[[guardians]]
name = "Dana Rivera"
email = "{DANA}"

[[guardians]]
name = "Chris Rivera"
email = "{CHRIS}"
""" + (f"""
[student]
name = "Sam"
email = "{STUDENT}"
""" if student else "") + f"""
[[members]]
name = "Dr. Lee"
email = "{CLINIC_OT}"
role = "provider"
tags = ["ot"]

[[members]]
name = "Dr. Kim"
email = "{THERAPIST}"
role = "provider"
tags = ["therapy"]

[[members]]
name = "Mr Ortiz"
email = "{SCHOOL_OT}"
role = "school"
tags = ["ot"]

[[members]]
name = "Ms Park"
email = "{CASE_MANAGER}"
role = "school"
tags = ["case-manager"]

[[members]]
name = "Mrs Jones"
email = "{TEACHER}"
role = "school"
tags = ["teacher"]

[[members]]
name = "Mr Ng"
email = "{COUNSELOR}"
role = "school"
tags = ["counselor"]
"""


OT_NOTE = ("Sam's fine motor skills improved; handwriting is neater.\n\n"
           "We practised grip with a pencil topper.")


@pytest.fixture
def make_world(tmp_path: Path, db_url: str) -> Iterator:
    worlds: list[World] = []

    def make(team_text: str | None = None, **settings: object) -> World:
        w = World(tmp_path / f"home{len(worlds)}", db_url, team=team_text or team(),
                  **settings).start()
        worlds.append(w)
        return w

    yield make
    for w in worlds:
        w.stop()


def consent(world: World, **terms: object) -> int:
    rt = Runtime.open(world.settings)
    try:
        with rt.db.session() as s:
            row = add_consent(s, rt, child_slug="sam", **{"signed_by": [DANA], **terms})
            return row.id
    finally:
        rt.close()


def section(text: str, start: str, end: str) -> str:
    text = text.replace("\r\n", "\n")
    return text[text.index(start):text.index(end, text.index(start))]


def approve(world: World, review, sender: str = DANA, text: str = "APPROVE") -> None:
    world.send(reply_to(review, text, sender=sender), sender, str(review.msg["Reply-To"]))


def copies(world: World, *addresses: str, count: int | None = None) -> dict[str, str]:
    """The text each address received as a release copy (Subject without the [#] tag)."""
    want = set(addresses)
    found = world.wait_for(lambda m: m.rcpt_tos[0] in want
                           and not str(m.msg["Subject"]).startswith("["),
                           count=count or len(addresses))
    return {m.rcpt_tos[0]: m.text() for m in found}


# -- routing and "held because" ------------------------------------------------------------


def test_ot_note_is_routed_to_ot_and_case_manager_only(make_world) -> None:
    """clinic OT sends a progress note -> the review says why it was held and suggests the
    school OT and the case manager, not the teacher -> APPROVE -> only those two get it,
    each copy saying it is a parent-directed disclosure."""
    world = make_world()
    world.send(report("Progress", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    review = world.review()
    text = review.text().replace("\r\n", "\n")
    goes_to = section(text, "If you approve, it goes to:", "Held because:")
    assert SCHOOL_OT in goes_to and CASE_MANAGER in goes_to
    assert TEACHER not in goes_to and COUNSELOR not in goes_to
    held = section(text, "Held because:", "=== Message text")
    assert "sender tag ot -> category ot_progress" in held
    assert "routing: ot_progress -> ot, case-manager" in held
    assert "no consent on file covers this; approving sends it as a parent-directed" in (
        " ".join(goes_to.split()))
    # Both guardians get the review request (approval = "any": either may decide).
    world.review(to=CHRIS)

    approve(world, review)
    got = copies(world, SCHOOL_OT, CASE_MANAGER)
    for body in got.values():
        assert "handwriting is neater" in body
        assert "parent-directed disclosure" in " ".join(body.split())
    world.wait_state("released")
    assert world.to(TEACHER) == [] and world.to(COUNSELOR) == []
    approved = json.loads(world.audit("approved")[0].description)
    assert approved["categories"] == ["ot_progress"]
    assert approved["basis"] == {SCHOOL_OT: "parent-directed", CASE_MANAGER: "parent-directed"}
    assert [a["email"] for a in approved["approvers"]] == [DANA]
    assert approved["approvers"][0]["auth"] == "token"


def test_school_to_provider_has_its_own_routing(make_world) -> None:
    """school OT writes to the clinic: the clinic OT is suggested, not the therapist."""
    world = make_world()
    world.send(report("From school OT", OT_NOTE, sender=SCHOOL_OT), SCHOOL_OT, f"sam@{DOMAIN}")
    text = world.review().text().replace("\r\n", "\n")
    goes_to = section(text, "If you approve, it goes to:", "Held because:")
    assert CLINIC_OT in goes_to
    assert THERAPIST not in goes_to and CASE_MANAGER not in goes_to


def test_always_redacted_and_suggested_patterns(make_world) -> None:
    """A social security number never leaves; a phone number is only pointed out."""
    world = make_world()
    body = (OT_NOTE + "\n\nInsurance on file: SSN 123-45-6789.\n\n"
            "Call the clinic at (312) 555-0147 with questions.")
    world.send(report("Progress", body, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    review = world.review()
    text = " ".join(review.text().split())
    assert "always removed before anyone gets it: 1 x us ssn" in text
    assert 'REDACT "(312) 555-0147"' in text
    approve(world, review)
    got = copies(world, SCHOOL_OT, CASE_MANAGER)
    for body_text in got.values():
        assert "123-45-6789" not in body_text
        assert "555-0147" in body_text  # suggested only: the parent did not ask
    assert json.loads(world.audit("approved")[0].description)["always_redacted"] == {"us_ssn": 1}


def test_substance_use_release_carries_the_part2_notice(make_world) -> None:
    """A substance-use record (42 CFR part 2): the review says the notice will be attached;
    the parent sends it to the counselor only (TO, preview, APPROVE); the copy carries it."""
    world = make_world()
    world.send(report("Screening", "The alcohol screening was negative.", sender=THERAPIST),
               THERAPIST, f"sam@{DOMAIN}")
    review = world.review()
    text = " ".join(review.text().split())
    assert "word 'alcohol' in the body -> substance_use" in text
    assert "42 CFR part 2 prohibits unauthorized use or disclosure" in text
    approve(world, review, text=f"TO {COUNSELOR}")
    preview = world.notice("Preview, please confirm")
    approve(world, preview)
    body = copies(world, COUNSELOR)[COUNSELOR]
    assert ("42 CFR part 2 prohibits unauthorized use or disclosure of these records."
            in " ".join(body.split()))
    world.wait_state("released")
    assert world.to(CASE_MANAGER) == []


# -- consents on file ---------------------------------------------------------------------


def test_review_consent_is_named_as_the_basis(make_world) -> None:
    """A consent on file (mode review) covers the school OT only: the review request says so
    per recipient; after APPROVE each copy and the audit carry its own basis."""
    world = make_world()
    cid = consent(world, disclosers=[CLINIC_OT], recipients=["tag:ot"],
                  categories=["ot_progress"], purpose="coordinate OT goals")
    world.send(report("Progress", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    review = world.review()
    cover = " ".join(section(review.text(), "Consent on file:", "Held because:").split())
    assert f"Mr Ortiz: consent #{cid} (coordinate OT goals" in cover
    assert "Ms Park: no consent on file covers this" in cover
    approve(world, review)
    got = copies(world, SCHOOL_OT, CASE_MANAGER)
    assert f"consent #{cid} (coordinate OT goals" in " ".join(got[SCHOOL_OT].split())
    assert "parent-directed disclosure" in " ".join(got[CASE_MANAGER].split())
    approved = json.loads(world.audit("approved")[0].description)
    assert approved["basis"] == {SCHOOL_OT: f"consent:{cid}", CASE_MANAGER: "parent-directed"}
    with world.db.session() as s:
        rows = {d.recipient: d.consent_id for d in s.scalars(
            select(Delivery).where(Delivery.kind == "release"))}
    assert rows == {SCHOOL_OT: cid, CASE_MANAGER: None}


def test_auto_consent_releases_at_once_and_revoke_by_reply_stops_it(make_world) -> None:
    """An automatic consent covers OT notes to the OT and case manager: the next note goes
    out without waiting, the guardians get an FYI copy; Dana replies REVOKE -> the consent
    is revoked, and the next note is held for review again."""
    world = make_world()
    cid = consent(world, disclosers=["tag:ot"], recipients=["tag:ot", "tag:case-manager"],
                  categories=["ot_progress"], purpose="weekly OT updates", mode="auto")
    world.send(report("Week 1", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    got = copies(world, SCHOOL_OT, CASE_MANAGER)
    assert all(f"consent #{cid}" in " ".join(b.split()) for b in got.values())
    fyi = world.notice("Shared under your consent")
    assert "REVOKE" in fyi.text() and "handwriting is neater" in fyi.text()
    world.notice("Shared under your consent", to=CHRIS)
    assert [m for m in world.to(DANA) if "Review needed" in str(m.msg["Subject"])] == []
    record = world.wait_state("released")
    approved = json.loads(world.audit("approved", record_id=record.id)[0].description)
    assert approved["automatic"] is True and approved["approvers"] == []

    approve(world, fyi, text="REVOKE")
    world.wait_audit("consent_revoked")
    with world.db.session() as s:
        assert s.get(Consent, cid).status == "revoked"
    world.notice("Update")  # the guardians are told what the revocation did

    world.send(report("Week 2", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    world.review()
    assert len([m for m in world.to(SCHOOL_OT)]) == 1  # only the first week's copy


def test_sensitive_record_is_never_auto_released(make_world) -> None:
    """Under an automatic OT consent, a note that also speaks of anxiety is held."""
    world = make_world()
    consent(world, disclosers=["tag:ot"], recipients=["tag:ot", "tag:case-manager"],
            categories=["ot_progress"], purpose="weekly OT updates", mode="auto")
    world.send(report("Week 1", OT_NOTE + "\n\nSam's anxiety was high this week.",
                      sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    review = world.review()
    held = " ".join(section(review.text(), "Held because:", "=== Message text").split())
    assert "mental_health is sensitive and always waits for the parent" in held
    assert world.to(SCHOOL_OT) == []


def test_consent_cli_then_release(make_world) -> None:
    """The operator files a consent with `broker consent add`; the next release uses it."""
    world = make_world()
    result = CliRunner().invoke(cli, [
        "consent", "add", "--home", str(world.home), "--child", "sam", "--from", CLINIC_OT,
        "--to", "tag:ot", "--category", "ot_progress", "--purpose", "OT coordination",
        "--signed-by", DANA, "--json"])
    assert result.exit_code == 0, result.output
    cid = json.loads(result.output)["id"]
    world.send(report("Progress", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    approve(world, world.review())
    got = copies(world, SCHOOL_OT, CASE_MANAGER)
    assert f"consent #{cid}" in " ".join(got[SCHOOL_OT].split())


# -- several people with a say --------------------------------------------------------------


def test_approval_all_waits_for_every_guardian(make_world) -> None:
    """approval = "all": Dana's APPROVE is recorded but sends nothing; Chris's releases."""
    world = make_world(team(approval="all"))
    world.send(report("Progress", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    review_dana = world.review()
    review_chris = world.review(to=CHRIS)
    assert "every one of Dana Rivera, Chris Rivera must reply APPROVE" in " ".join(
        review_dana.text().split())
    approve(world, review_dana)
    status = world.notice("Update")
    assert "waits for Chris Rivera" in " ".join(status.text().split())
    world.settle(0.5)
    assert world.to(SCHOOL_OT) == []
    assert world.record().state == "awaiting_review"

    approve(world, review_chris, sender=CHRIS)
    copies(world, SCHOOL_OT, CASE_MANAGER)
    approved = json.loads(world.audit("approved")[0].description)
    assert [a["email"] for a in approved["approvers"]] == [DANA, CHRIS]
    # Both see the outcome.
    world.notice("Released")
    world.notice("Released", to=CHRIS)


def test_approval_all_one_deny_is_final(make_world) -> None:
    world = make_world(team(approval="all"))
    world.send(report("Progress", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    approve(world, world.review())
    world.notice("Update")
    approve(world, world.review(to=CHRIS), sender=CHRIS, text="DENY")
    world.wait_state("denied")
    assert world.to(SCHOOL_OT) == []


def test_illinois_student_co_consent_and_veto(make_world) -> None:
    """A 13-year-old in Illinois: the therapist's mental-health note goes to the student
    too; Dana's APPROVE waits for Sam; Sam's DENY vetoes it."""
    world = make_world(team(birthdate=born(13, 30), jurisdiction="us-il", student=True))
    world.send(report("Session", "Sam's anxiety is easing with the new routine.",
                      sender=THERAPIST), THERAPIST, f"sam@{DOMAIN}")
    review = world.review()
    student_review = world.review(to=STUDENT)
    held = " ".join(review.text().split())
    assert "the child is 13; from 12 Illinois requires the child's consent too" in held
    assert "Sam (the student) must reply APPROVE too; their DENY is final" in held
    goes_to = section(review.text(), "If you approve, it goes to:", "Consent on file:")
    assert COUNSELOR in goes_to and CASE_MANAGER in goes_to and SCHOOL_OT not in goes_to

    approve(world, review)
    assert "waits for Sam (student)" in " ".join(world.notice("Update").text().split())
    approve(world, student_review, sender=STUDENT, text="DENY")
    world.wait_state("denied")
    world.settle(0.3)
    assert world.all_to(list(SCHOOL)) == []
    with world.db.session() as s:
        assert s.scalars(select(Approval.decision)).all() == ["approve"]


def test_illinois_student_and_guardian_both_approve(make_world) -> None:
    world = make_world(team(birthdate=born(13, 30), jurisdiction="us-il", student=True))
    world.send(report("Session", "Sam's anxiety is easing with the new routine.",
                      sender=THERAPIST), THERAPIST, f"sam@{DOMAIN}")
    review, student_review = world.review(), world.review(to=STUDENT)
    approve(world, student_review, sender=STUDENT)
    world.notice("Update", to=STUDENT)
    approve(world, review)
    copies(world, COUNSELOR, CASE_MANAGER)
    approved = json.loads(world.audit("approved")[0].description)
    assert {a["role"] for a in approved["approvers"]} == {"student", "guardian"}


def test_of_age_student_decides_alone(make_world) -> None:
    """At 18 the review goes to the student only; a guardian's reply is refused; the
    student's APPROVE releases. After `broker team delegate`, the guardians decide again."""
    world = make_world(team(birthdate=born(18, 3), student=True))
    world.send(report("Progress", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    student_review = world.review(to=STUDENT)
    assert [m for m in world.to(DANA) if "Review needed" in str(m.msg["Subject"])] == []
    # A guardian who answers a review request anyway (here: the student's, forwarded).
    forged = reply_to(student_review, "APPROVE", sender=DANA)
    world.send(forged, DANA, str(student_review.msg["Reply-To"]))
    refused = world.notice("Reply refused")
    assert "does not decide this record today" in " ".join(refused.text().split())
    approve(world, student_review, sender=STUDENT)
    copies(world, SCHOOL_OT, CASE_MANAGER)

    result = CliRunner().invoke(cli, ["team", "delegate", "sam", "--home", str(world.home),
                                      "--requested-by", STUDENT])
    assert result.exit_code == 0, result.output
    world.send(report("Next", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    world.review()  # to Dana again
    assert world.audit("decisions_delegated")


def test_co_consent_without_a_student_address_blocks_release(make_world) -> None:
    world = make_world(team(birthdate=born(13), jurisdiction="us-il"))
    world.send(report("Session", "Sam's anxiety is easing.", sender=THERAPIST),
               THERAPIST, f"sam@{DOMAIN}")
    review = world.review()
    assert "has no [student] address" in " ".join(review.text().split())
    approve(world, review)
    notice = world.notice("Not understood")
    assert "Not released" in notice.text()
    world.settle(0.3)
    assert world.all_to(list(SCHOOL)) == []


# -- the operator's view ----------------------------------------------------------------


def test_rules_explain_shows_what_matched(make_world) -> None:
    world = make_world()
    world.send(report("Progress", OT_NOTE, sender=CLINIC_OT), CLINIC_OT, f"sam@{DOMAIN}")
    world.review()
    record_id = world.record().id
    result = CliRunner().invoke(cli, ["rules", "explain", str(record_id), "--home",
                                      str(world.home)])
    assert result.exit_code == 0, result.output
    assert "sender tag ot -> category ot_progress" in result.output
    assert "routing: ot_progress -> ot, case-manager" in result.output
    assert "parent-directed" in result.output
    data = json.loads(CliRunner().invoke(cli, ["rules", "explain", str(record_id), "--json",
                                               "--home", str(world.home)]).output)
    assert data["categories"] == ["ot_progress"]
    assert {r["email"] for r in data["recipients"]} == {SCHOOL_OT, CASE_MANAGER}
    missing = CliRunner().invoke(cli, ["rules", "explain", "999", "--home", str(world.home)])
    assert missing.exit_code == 1 and "no record 999" in missing.output


def test_policy_is_sealed_at_rest(make_world) -> None:
    """The stored evaluation quotes the message (matched words, suggestions): sealed."""
    world = make_world()
    world.send(report("Progress", OT_NOTE + "\n\nCall (312) 555-0147.", sender=CLINIC_OT),
               CLINIC_OT, f"sam@{DOMAIN}")
    world.review()
    with world.db.engine.connect() as c:
        raw = c.exec_driver_sql("SELECT policy FROM records").scalar_one()
    assert "555-0147" not in raw and "ot_progress" not in raw
    with world.db.session() as s:
        assert "555-0147" in s.scalars(select(Record.policy)).one()
