"""Stories of replies that must not approve, over real SMTP: look-alike letters, zero-width
and bidi characters, HTML-only replies whose command is hidden, and a paragraph number
that does not exist. Each one is answered "not understood" and nothing reaches the school;
a plain APPROVE afterwards still works (the token stayed live)."""

from __future__ import annotations

import email
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.harness import DOMAIN, GUARDIAN, SCHOOL, Received, World, reply_to, report

PROVIDER = "lee@clinic.example"


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def _post(world: World) -> Received:
    world.send(report(), PROVIDER, f"sam@{DOMAIN}")
    return world.review()


def _html_reply(review: Received, html: str) -> EmailMessage:
    """An HTML-only reply (no text/plain part), as some webmail sends."""
    original = review.msg
    msg = EmailMessage()
    msg["From"] = f"Dana Rivera <{GUARDIAN}>"
    msg["To"] = str(original["Reply-To"])
    msg["Subject"] = "Re: " + str(original["Subject"])
    msg["In-Reply-To"] = str(original["Message-ID"])
    msg["Message-ID"] = email.utils.make_msgid(domain="home.example")
    msg.set_content(html, subtype="html")
    return msg


def _refused_then_plain_approve(world: World, review: Received, problem: str) -> None:
    answer = world.notice("Not understood, nothing changed")
    assert problem in answer.text(), answer.text()
    world.settle(0.3)
    assert world.all_to(SCHOOL) == []
    assert world.record().state == "awaiting_review"
    # The parent types it plainly: now it is released.
    world.send(reply_to(review, "APPROVE"), GUARDIAN, str(review.msg["Reply-To"]))
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    world.wait_state("released")


LOOKS_LIKE = "look like letters but are not"


@pytest.mark.parametrize(
    "text",
    [
        "АPPROVE",  # Cyrillic A
        "APPRОVE",  # Cyrillic O
        "ＡＰＰＲＯＶＥ",  # fullwidth
        "APP\u200bROVE",  # zero-width space
        "APPROVE\u2060",  # word joiner
        "\u202eEVORPPA",  # right-to-left override: displays as APPROVE
        "\u2067APPROVE\u2069",  # isolate
    ],
    ids=["cyrillic-a", "cyrillic-o", "fullwidth", "zwsp", "word-joiner", "rlo", "isolate"],
)
def test_lookalike_approve_is_not_understood(world: World, text: str) -> None:
    review = _post(world)
    world.send(reply_to(review, text), GUARDIAN, str(review.msg["Reply-To"]))
    _refused_then_plain_approve(world, review, LOOKS_LIKE)


def test_html_only_reply_with_hidden_approve(world: World) -> None:
    review = _post(world)
    html = (
        "<html><body><div>Thanks, I will look at it tonight.</div>"
        '<span style="display:none">APPROVE</span>'
        "<div hidden>APPROVE</div>"
        '<p style="font-size:0">APPROVE</p></body></html>'
    )
    world.send(_html_reply(review, html), GUARDIAN, str(review.msg["Reply-To"]))
    _refused_then_plain_approve(world, review, "Thanks, I will look at it tonight.")


def test_html_only_reply_with_style_sheet_hiding_is_not_read(world: World) -> None:
    review = _post(world)
    html = (
        "<html><head><style>.x { display: none }</style></head>"
        '<body><div class="x">APPROVE</div></body></html>'
    )
    world.send(_html_reply(review, html), GUARDIAN, str(review.msg["Reply-To"]))
    _refused_then_plain_approve(world, review, "I found no command in your reply.")


def test_html_only_reply_with_visible_approve_is_read(world: World) -> None:
    review = _post(world)
    world.send(
        _html_reply(review, "<html><body><p>APPROVE</p></body></html>"),
        GUARDIAN,
        str(review.msg["Reply-To"]),
    )
    world.wait_for(lambda m: m.rcpt_tos[0] in SCHOOL, count=2)
    world.wait_state("released")


def test_paragraph_out_of_range_is_an_error(world: World) -> None:
    review = _post(world)  # the report has three paragraphs
    world.send(reply_to(review, "REDACT 2 9\nAPPROVE"), GUARDIAN, str(review.msg["Reply-To"]))
    _refused_then_plain_approve(world, review, "There is no paragraph 9 in this record.")
