"""Stories of the parent's decisions, over real SMTP: DENY, REDACT, DROP, TO, NOTE, HELP
and replies the broker does not understand. Each asserts on what a user can check:
which bytes reached the school (or did not), the record's state, the audit log."""

from __future__ import annotations

import email
import json
from collections.abc import Iterator
from email import policy
from email.message import EmailMessage
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

PARK, ORTIZ = SCHOOL
PROVIDER = "lee@clinic.example"
PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06"
       b"\x00\x00\x00\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01"
       b"\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def _answer(world: World, to: Received, text: str, **kw: object) -> None:
    world.send(reply_to(to, text, **kw), GUARDIAN, str(to.msg["Reply-To"]))  # type: ignore[arg-type]


def _post(world: World, msg: EmailMessage | None = None) -> Received:
    world.send(msg or report(), PROVIDER, f"sam@{DOMAIN}")
    return world.review()


def _section(text: str, start: str, end: str) -> str:
    """The lines of ``text`` between a line starting ``start`` and the next containing ``end``."""
    _, sep, rest = text.partition(start)
    assert sep, f"{start!r} not in:\n{text}"
    return rest.split(end, 1)[0]


def _attachments(copy: Received) -> list[tuple[str, str, bytes]]:
    return [(p.get_filename() or "", p.get_content_type(), p.get_payload(decode=True) or b"")
            for p in copy.msg.iter_attachments()]


# --- DENY -------------------------------------------------------------------------------


def test_deny_shares_nothing_and_tells_only_the_family(world: World) -> None:
    review = _post(world)
    world.notice("Received and held", to=PROVIDER)
    _answer(world, review, "DENY")

    confirmation = world.notice("Denied")
    assert "denied by Dana Rivera" in confirmation.text()
    assert "family conflict" not in confirmation.text()
    world.settle()

    assert world.all_to(SCHOOL) == []
    # The provider had its receipt and nothing since: no word of the decision.
    to_provider = world.all_to([PROVIDER])
    assert [str(m.msg["Subject"]) for m in to_provider] == [
        "Received and held for review: OT progress report"]
    assert "denied" not in every_text(to_provider[0].data).lower()

    record = world.wait_state("denied")
    assert record.decided_by == GUARDIAN
    denied = world.audit("denied", record.id)
    assert len(denied) == 1
    assert denied[0].actor == GUARDIAN and denied[0].actor_role == "guardian"
    actions = [e.action for e in world.audit(record_id=record.id)]
    assert "approved" not in actions and "delivered" not in actions
    with world.db.session() as s:
        assert verify_log(s).ok


# --- REDACT -----------------------------------------------------------------------------


HTML = ("<p>Sam worked on handwriting this month.</p>"
        "<p>Sam mentioned family conflict at home during the session.</p>"
        "<p>Recommend a slant board in class.</p>")


def test_redact_paragraph_then_approve_preview(world: World) -> None:
    review = _post(world, report(html=HTML))  # the provider also sent an HTML version
    _answer(world, review, "REDACT 2")

    preview = world.notice("Preview, please confirm")
    text = preview.text()
    assert "[1] Sam worked on handwriting" in text
    assert "[3] Recommend a slant board" in text
    assert "[2]" not in text
    assert "family conflict" not in every_text(preview.data)
    assert "paragraph 2" in _section(text, "=== Your changes", "=== How to answer")
    world.settle(0.3)
    assert world.all_to(SCHOOL) == []  # a preview releases nothing
    assert world.record().state == "awaiting_review"

    _answer(world, preview, "APPROVE")
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    for copy in copies:
        assert "Sam worked on handwriting" in copy.text()
        assert "Recommend a slant board" in copy.text()
        everything = every_text(copy.data)
        for gone in ("family conflict", "Sam mentioned", "conflict at home"):
            assert gone not in everything, gone
            assert gone.encode() not in copy.data, gone
        for part in copy.msg.walk():
            if not part.is_multipart():
                assert "conflict" not in str(part.get_content())
    record = world.wait_state("released")
    approved = world.audit("approved", record.id)[0]
    assert json.loads(approved.description)["paragraphs_removed"] == ["2"]
    assert "family conflict" not in approved.description
    world.settle(0.3)
    assert len(world.all_to(SCHOOL)) == 2


def test_redact_phrase_everywhere(world: World) -> None:
    """The phrase is in the subject, the body, the HTML version, an attachment's text and
    its filename; none of it may reach the school in any form."""
    msg = report(subject="Family conflict follow-up", html=HTML, attachments=(
        ("family conflict notes.txt", "text/plain",
         b"Observed: family\nconflict affects sleep.\n\nPlan: check in weekly.\n"),))
    review = _post(world, msg)
    _answer(world, review, 'REDACT "family conflict"')

    preview = world.notice("Preview, please confirm")
    shown = _section(preview.text(), "It would go to:", "=== Your changes")
    assert "family conflict" not in shown.casefold()
    assert "Sam worked on handwriting" in shown

    _answer(world, preview, "APPROVE")
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    for copy in copies:
        everything = every_text(copy.data).casefold()
        assert "family conflict" not in everything
        assert "family\nconflict" not in everything
        assert b"conflict" not in copy.data.lower()
        assert "Recommend a slant board" in copy.text()
        assert "check in weekly" in everything
    world.wait_state("released")


# --- DROP -------------------------------------------------------------------------------


def test_drop_attachment_then_approve(world: World) -> None:
    notes = b"Fine motor checklist.\n\nScissors: emerging.\n"
    msg = report(attachments=(("notes.txt", "text/plain", notes),
                              ("chart.png", "image/png", PNG)))
    review = _post(world, msg)
    text = review.text()
    assert "A1 notes.txt" in text and "A2 chart.png" in text

    _answer(world, review, "DROP A2")
    preview = world.notice("Preview, please confirm")
    assert "A1 notes.txt" in preview.text()
    assert "chart.png" not in _section(preview.text(), "=== Attachments", "=== Your changes")
    changes = _section(preview.text(), "=== Your changes", "=== How to answer")
    assert "A2" in changes and "chart.png" in changes

    _answer(world, preview, "APPROVE")
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    for copy in copies:
        atts = _attachments(copy)
        assert [(name, ctype) for name, ctype, _ in atts] == [("notes.txt", "text/plain")]
        assert b"Scissors: emerging." in atts[0][2]
        assert "chart.png" not in every_text(copy.data)
        assert all(p.get_content_type() != "image/png" for p in copy.msg.walk())
        assert b"IHDR" not in copy.data
    world.wait_state("released")


# --- TO ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "chosen", "left_out"), [
    ("TO park@school.example", PARK, ORTIZ),
    ("TO tag:ot", ORTIZ, PARK),
])
def test_to_a_subset(world: World, command: str, chosen: str, left_out: str) -> None:
    review = _post(world)
    _answer(world, review, command)

    preview = world.notice("Preview, please confirm")
    goes_to = _section(preview.text(), "It would go to:", "Subject:")
    assert chosen in goes_to
    assert left_out not in goes_to
    assert PROVIDER not in goes_to

    _answer(world, preview, "APPROVE")
    copy = world.wait_for(lambda m: chosen in m.rcpt_tos and "OT progress" in
                          str(m.msg["Subject"]))[0]
    assert "Sam worked on handwriting" in copy.text()
    record = world.wait_state("released")
    world.settle()
    assert world.all_to([left_out]) == []
    assert len(world.all_to([chosen])) == 1
    assert [json.loads(e.recipients) for e in world.audit("delivered", record.id)] == [[chosen]]
    assert json.loads(world.audit("approved", record.id)[0].recipients) == [chosen]


# --- NOTE -------------------------------------------------------------------------------


def test_note_goes_on_top(world: World) -> None:
    note = "Please note the date in paragraph 1 is wrong"
    review = _post(world)
    _answer(world, review, f"NOTE {note}")

    preview = world.notice("Preview, please confirm")
    assert note in _section(preview.text(), "=== Your note", "=== Text")

    _answer(world, preview, "APPROVE")
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    for copy in copies:
        body = copy.text()
        assert "Note from the family:" in body
        assert note in body
        assert body.index(note) < body.index("Sam worked on handwriting")
        assert body.index("Sam worked on handwriting") < body.index("Recommend a slant board")
    record = world.wait_state("released")
    assert json.loads(world.audit("approved", record.id)[0].description)["note"] is True


# --- HELP and replies that are not commands -----------------------------------------------


def test_help_then_approve_with_the_same_token(world: World) -> None:
    review = _post(world)
    _answer(world, review, "HELP")

    help_msg = world.notice("How to answer")
    assert "APPROVE" in help_msg.text() and "REDACT" in help_msg.text()
    # The help answers with the same live token: replying to it works.
    assert str(help_msg.msg["Reply-To"]) == str(review.msg["Reply-To"])
    world.settle(0.5)
    assert world.record().state == "awaiting_review"
    assert world.all_to(SCHOOL) == []
    assert world.wait_audit("help_sent")

    _answer(world, help_msg, "APPROVE")
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    world.wait_state("released")


@pytest.mark.parametrize("garbage", ["don't approve", "ok thanks"])
def test_garbage_changes_nothing_then_approve_works(world: World, garbage: str) -> None:
    review = _post(world)
    _answer(world, review, garbage)

    answer = world.notice("Not understood, nothing changed")
    assert "NOTHING changed" in answer.text()
    world.settle()
    assert world.all_to(SCHOOL) == []
    record = world.record()
    assert record.state == "awaiting_review"
    assert len(world.audit("reply_not_understood", record.id)) == 1
    assert world.audit("approved") == []

    _answer(world, review, "APPROVE")
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    world.wait_state("released")


def test_html_only_report_is_shown_as_numbered_paragraphs(world: World) -> None:
    msg = EmailMessage()
    msg["From"] = f"Dr. Lee <{PROVIDER}>"
    msg["To"] = f"sam@{DOMAIN}"
    msg["Subject"] = "Session summary"
    msg["Message-ID"] = email.utils.make_msgid(domain="clinic.example")
    msg.set_content(
        "<html><body><p>Sam practised <b>buttoning</b> today.</p>"
        "<p>Next goal: shoelaces.</p><div>Well done overall.</div></body></html>",
        subtype="html",
    )
    assert msg.get_content_type() == "text/html"
    review = _post(world, msg)
    text = review.text()
    assert "[1] Sam practised buttoning today." in text
    assert "[2] Next goal: shoelaces." in text
    assert "[3] Well done overall." in text
    assert "<p>" not in text and "<b>" not in text
    parsed = email.message_from_bytes(review.data, policy=policy.default)
    assert "Session summary" in str(parsed["Subject"])

    _answer(world, review, "APPROVE")
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    for copy in copies:
        assert "Sam practised buttoning today." in copy.text()
        assert "<p>" not in every_text(copy.data)
