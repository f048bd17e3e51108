"""Story: a team member's mail client sends broken MIME (the corpus of real broken
messages) -> every message is taken in, held or quarantined with a reason; the
daemon never crashes and nothing is released."""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from broker.db.models import Inbound, Record
from broker.mail.parse import ParseFailed, parse_message
from tests.harness import DOMAIN, World


def _malformed(corpus: Path) -> list[Path]:
    return sorted((corpus / "malformed").rglob("*.eml"))


def _as_from_lee(data: bytes) -> bytes:
    """The broken message, sent by a team member: its From lines replaced."""
    head, sep, body = data.partition(b"\r\n\r\n")
    nl = b"\r\n"
    if not sep:
        head, sep, body = data.partition(b"\n\n")
        nl = b"\n"
    head = re.sub(rb"(?im)^from:.*(\r?\n[ \t].*)*\r?\n?", b"", head)
    return b"From: lee@clinic.example" + nl + head + sep + body


def test_every_broken_message_parses_or_fails_cleanly(corpus: Path) -> None:
    files = _malformed(corpus)
    assert len(files) >= 30
    for path in files:
        start = time.monotonic()
        try:
            doc = parse_message(path)
        except ParseFailed:
            continue
        assert time.monotonic() - start < 5, path.name
        assert all(p.text.strip() for p in doc.paragraphs), path.name
        assert all(a.label == f"A{i}" for i, a in enumerate(doc.attachments, 1)), path.name


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def test_broken_mail_is_held_or_quarantined_never_lost(world: World, corpus: Path) -> None:
    accepted = []
    distinct: set[bytes] = set()
    for path in _malformed(corpus):
        raw = _as_from_lee(path.read_bytes())
        try:
            world.send(raw, "lee@clinic.example", f"sam@{DOMAIN}")
        except smtplib.SMTPDataError as exc:
            # Refused at the door with a reason the sender's server passes back
            # (RFC 5321 line length): not accepted, so nothing to lose.
            assert exc.smtp_code == 500 and b"Line too long" in exc.smtp_error, path.name
            continue
        accepted.append(path)
        distinct.add(raw)
    files = accepted
    assert len(files) >= 30
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with world.db.session() as s:
            if s.scalar(select(func.count(Inbound.id))) == len(files):
                break
        time.sleep(0.2)
    world.settle(0.5)
    with world.db.session() as s:
        kinds = s.scalars(select(Inbound.kind)).all()
        states = s.scalars(select(Record.state)).all()
    assert len(kinds) == len(files)
    assert "failed" not in kinds  # no internal error on any of them
    # Files that are the very same bytes once From is rewritten are one record, and the
    # repeat is kept as a duplicate (a resend), never a second review request.
    assert len(states) == len(distinct)
    assert kinds.count("duplicate") == len(files) - len(distinct)
    assert set(states) <= {"awaiting_review", "quarantined"}
    assert world.to("park@school.example") == []
    assert world.to("ortiz@school.example") == []
