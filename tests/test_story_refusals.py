"""Stories where the broker must say no, over real SMTP: auto-replies, replies from the
wrong people, replayed / superseded / foreign / expired tokens, and mail that is
quarantined instead of held. In every one nothing reaches the school."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit.log import verify_log
from tests.harness import (
    DOMAIN,
    GUARDIAN,
    SCHOOL,
    Received,
    World,
    every_text,
    reply_to,
    report,
)

PROVIDER = "lee@clinic.example"

TEAM_ALEX = """
[child]
slug = "alex"
name = "Alex Kim"
birthdate = "2015-05-05"
jurisdiction = "us-il"

[[guardians]]
name = "Chris Kim"
email = "chris@kim.example"

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
"""


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def _post(world: World, child: str = "sam", guardian: str = GUARDIAN) -> Received:
    world.send(report(), PROVIDER, f"{child}@{DOMAIN}")
    return world.review(to=guardian)


def _answer(world: World, to: Received, text: str, sender: str = GUARDIAN,
            **kw: object) -> None:
    world.send(reply_to(to, text, sender=sender, **kw), sender,  # type: ignore[arg-type]
               str(to.msg["Reply-To"]))


def _releases(world: World) -> list[Received]:
    return world.all_to(SCHOOL)


def _refusals(world: World, reason: str, count: int = 1, record_id: int | None = None) -> list:
    events = world.wait_audit("reply_refused", count=count, record_id=record_id)
    found = [e for e in events if json.loads(e.description).get("reason") == reason]
    assert len(found) == count, [e.description for e in events]
    return found


# --- automatic replies ------------------------------------------------------------------


@pytest.mark.parametrize("quote", [True, False], ids=["quoted", "bare"])
def test_auto_reply_approves_nothing_and_is_not_answered(world: World, quote: bool) -> None:
    review = _post(world)
    before = len(world.all_to([GUARDIAN]))
    _answer(world, review, "APPROVE", quote=quote,
            headers={"Auto-Submitted": "auto-replied"})

    ignored = world.wait_audit("reply_ignored")
    assert "Auto-Submitted" in json.loads(ignored[0].description)["reason"]
    world.settle()
    assert _releases(world) == []
    assert len(world.all_to([GUARDIAN])) == before  # never answered
    assert world.record().state == "awaiting_review"
    assert world.audit("approved") == []

    # The token was not spent: the guardian's own APPROVE still works.
    _answer(world, review, "APPROVE")
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    world.wait_state("released")


# --- the wrong people -------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["park@school.example", "mallory@elsewhere.example"])
def test_reply_from_a_non_guardian_is_refused(world: World, sender: str) -> None:
    review = _post(world)
    _answer(world, review, "APPROVE", sender=sender)

    refused = _refusals(world, "not_guardian")[0]
    assert refused.actor == sender
    notice = world.notice("Reply refused")
    assert sender in notice.text()
    world.settle()
    assert _releases(world) == []
    assert world.all_to([sender]) == []  # the impostor learns nothing
    record = world.record()
    assert record.state == "awaiting_review"
    assert world.audit("approved") == []


def test_token_of_another_child_is_refused(world: World) -> None:
    world.add_team(TEAM_ALEX)
    sam_review = _post(world, "sam", GUARDIAN)
    alex_review = _post(world, "alex", "chris@kim.example")
    sam_record, alex_record = world.records()
    assert (sam_record.child.slug, alex_record.child.slug) == ("sam", "alex")

    # Dana is Sam's guardian only; Alex's token does not make her Alex's guardian.
    _answer(world, alex_review, "APPROVE", sender=GUARDIAN)
    refused = _refusals(world, "not_guardian", record_id=alex_record.id)[0]
    assert refused.actor == GUARDIAN
    world.notice("Reply refused", to="chris@kim.example")
    world.settle()
    assert _releases(world) == []
    assert world.record(sam_record.id).state == "awaiting_review"
    assert world.record(alex_record.id).state == "awaiting_review"
    assert world.audit("approved") == []
    assert sam_review.msg["Reply-To"] != alex_review.msg["Reply-To"]


# --- tokens that are spent or replaced ------------------------------------------------------


def test_replayed_token_is_refused_and_nothing_is_sent_twice(world: World) -> None:
    review = _post(world)
    approve = reply_to(review, "APPROVE")
    reply_address = str(review.msg["Reply-To"])
    world.send(approve, GUARDIAN, reply_address)
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    record = world.wait_state("released")

    world.send(approve, GUARDIAN, reply_address)  # the very same message again
    _answer(world, review, "DENY")
    _refusals(world, "used", count=2, record_id=record.id)
    world.notice("Reply refused", count=2)
    world.settle()
    copies = _releases(world)
    assert sorted(m.rcpt_tos[0] for m in copies) == sorted(SCHOOL)
    assert world.record().state == "released"
    assert len(world.audit("approved")) == 1 and world.audit("denied") == []


def test_approving_the_superseded_review_request_is_refused(world: World) -> None:
    review = _post(world)
    _answer(world, review, "REDACT 2")
    preview = world.notice("Preview, please confirm")

    _answer(world, review, "APPROVE")  # the original request, not the preview
    _refusals(world, "superseded")
    assert "newer message" in world.notice("Reply refused").text()
    world.settle()
    assert _releases(world) == []
    assert world.record().state == "awaiting_review"

    # The preview's token is the live one.
    _answer(world, preview, "APPROVE")
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    assert all("family conflict" not in every_text(c.data) for c in copies)


# --- expiry -----------------------------------------------------------------------------


def test_undecided_record_expires(tmp_path: Path, db_url: str) -> None:
    world = World(tmp_path / "home", db_url, hold_days=2 / 86400).start()
    try:
        review = _post(world)
        expired = world.notice("Expired, not shared")
        assert "treated as denied" in expired.text()
        assert "family conflict" not in expired.text()
        record = world.wait_state("expired")
        assert world.audit("expired", record.id)

        _answer(world, review, "APPROVE")
        _refusals(world, "expired")
        world.notice("Reply refused")
        world.settle()
        assert _releases(world) == []
        assert world.record().state == "expired"
        assert world.audit("approved") == []
        # The provider learns nothing of the expiry either.
        assert [str(m.msg["Subject"]) for m in world.all_to([PROVIDER])] == [
            "Received and held for review: OT progress report"]
    finally:
        world.stop()


# --- quarantine -------------------------------------------------------------------------


def test_unknown_sender_is_quarantined_and_guardians_told_without_content(world: World) -> None:
    msg = report(sender="stranger@elsewhere.example",
                 body="Secret diagnosis details for Sam.\n\nMore private text.")
    world.send(msg, "stranger@elsewhere.example", f"sam@{DOMAIN}")

    notice = world.notice("Quarantined mail")
    assert "stranger@elsewhere.example" in notice.text()
    everything = every_text(notice.data)
    assert "Secret diagnosis" not in everything and "private text" not in everything
    record = world.wait_state("quarantined")
    assert "not on the team" in record.quarantine_reason
    world.settle()
    assert _releases(world) == []
    assert world.all_to(["stranger@elsewhere.example"]) == []
    assert not [m for m in world.sink.messages if "Review needed" in str(m.msg["Subject"])]


@pytest.mark.parametrize(("headers", "mail_from"), [
    ({"Precedence": "bulk"}, PROVIDER),
    ({"List-Id": "<news.clinic.example>"}, PROVIDER),
    ({}, ""),  # MAIL FROM:<>
], ids=["precedence-bulk", "list-id", "null-sender"])
def test_automatic_mail_is_quarantined_silently(world: World, headers: dict[str, str],
                                                mail_from: str) -> None:
    msg = report()
    for k, v in headers.items():
        msg[k] = v
    world.send(msg, mail_from, f"sam@{DOMAIN}")

    record = world.wait_state("quarantined")
    assert record.quarantine_reason.startswith("automatic mail")
    world.settle()
    assert world.sink.messages == []  # no notice, no receipt, no review: nothing to anybody
    with world.db.session() as s:
        assert verify_log(s).ok


def test_reply_matched_only_by_references_from_a_stranger_is_not_a_decision(
        world: World) -> None:
    """A stranger answering the list address while quoting the review's Message-ID."""
    review = _post(world)
    msg = reply_to(review, "APPROVE", sender="mallory@elsewhere.example")
    del msg["To"]
    msg["To"] = f"sam@{DOMAIN}"
    world.send(msg, "mallory@elsewhere.example", f"sam@{DOMAIN}")
    # Not a reply (the sender is no guardian): new mail to the list from a stranger.
    world.wait_state("quarantined", record_id=2)
    world.settle()
    assert _releases(world) == []
    assert world.records()[0].state == "awaiting_review"
    assert world.audit("approved") == []
    assert world.audit("reply_refused") == [] and world.audit("reply_ignored") == []
