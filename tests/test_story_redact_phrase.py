"""Story: the report carries "family conflict" in its text part, its HTML part, its
subject, an attachment's name and that attachment's text -> the parent replies
REDACT "family conflict" -> preview -> APPROVE -> nothing of the phrase, in any
part, header or filename, reaches the school."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import DOMAIN, Received, World, reply_to, report

PHRASE = re.compile(r"family\s+conflict", re.IGNORECASE)


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def _everything_readable(copy: Received) -> str:
    """Every header (decoded), every part's decoded content and every filename."""
    msg = copy.msg
    out = [f"{k}: {v}" for k, v in msg.items()]
    for part in msg.walk():
        out.extend(f"{k}: {v}" for k, v in part.items())
        if part.get_filename():
            out.append(part.get_filename())
        if not part.is_multipart():
            payload = part.get_payload(decode=True) or b""
            out.append(payload.decode("utf-8", "replace"))
    return "\n".join(out)


def test_phrase_is_removed_from_every_part(world: World) -> None:
    msg = report(
        subject="Notes on Family Conflict and handwriting",
        body=("Sam worked on handwriting.\n\n"
              "Sam spoke about the family\nconflict at home.\n\n"
              "Slant board recommended."),
        html=("<p>Sam worked on handwriting.</p><p>Sam spoke about the "
              "<b>family conflict</b> at home.</p><p>Slant board recommended.</p>"),
        attachments=(("family conflict notes.txt", "text/plain",
                      b"Session notes.\n\nThe family conflict came up again.\n"),),
    )
    world.send(msg, "lee@clinic.example", f"sam@{DOMAIN}")
    review = world.wait_for(lambda m: "dana@home.example" in m.rcpt_tos
                            and "Review needed" in str(m.msg["Subject"]))[0]
    assert PHRASE.search(review.text())  # the parent sees the original

    world.send(reply_to(review, 'REDACT "family conflict"'), "dana@home.example",
               str(review.msg["Reply-To"]))
    preview = world.wait_for(lambda m: "Preview" in str(m.msg["Subject"]))[0]
    body = preview.text()
    assert "Sam worked on handwriting." in body
    assert "[redacted]" in body
    # The preview's own body shows what recipients would get: no phrase there either
    # (the subject line of the preview to the parent may name the original subject).
    shown = body.split("=== How to answer")[0]
    assert not PHRASE.search(shown.split("=== Your changes")[0])

    world.send(reply_to(preview, "APPROVE"), "dana@home.example",
               str(preview.msg["Reply-To"]))
    copies = world.wait_for(lambda m: m.rcpt_tos[0].endswith("@school.example"), count=2)
    for copy in copies:
        readable = _everything_readable(copy)
        assert "Sam worked on handwriting." in readable
        assert "Slant board recommended." in readable
        assert not PHRASE.search(readable), readable
        assert b"family" not in copy.data.lower() or not PHRASE.search(
            copy.data.decode("latin-1"))
        # No HTML is ever passed through: the broker sends its own text rebuild.
        assert all(p.get_content_type() != "text/html" for p in copy.msg.walk())
        names = [p.get_filename() for p in copy.msg.iter_attachments()]
        assert len(names) == 1 and not PHRASE.search(names[0])
