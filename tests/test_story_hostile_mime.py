"""Story: hostile or broken mail from a team member, and mail loops.

Every message of the shared MIME and malformed corpora, and crafted monsters (1,500-level
nesting, 1,000 parts, 60 attachments, 600 headers), goes through SMTP intake from Dr. Lee:
nothing crashes or hangs, each ends held or quarantined with a stated reason (or refused at
SMTP where that is the limit), and the daemon keeps serving. The [limits] answer at SMTP
(421, 452, 552); the broker never answers its own domain; its notices are capped per day.
"""

from __future__ import annotations

import json
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from broker.cli.records import records as records_cli
from broker.config import ConfigError, Limits, from_mapping
from broker.db.migrate import upgrade
from broker.db.models import Inbound, Record
from tests.harness import DOMAIN, GUARDIAN, World, reply_to, report
from tests.test_story_malformed import _as_from_lee

LEE = "lee@clinic.example"
SAM = f"sam@{DOMAIN}"
HEAD = (b"From: Dr. Lee <lee@clinic.example>\r\nTo: sam@records.example\r\n"
        b"Subject: %s\r\nMIME-Version: 1.0\r\n")


def nested(levels: int) -> bytes:
    out = [HEAD % b"deep"]
    for i in range(levels):
        out.append(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i))
    out.append(b"Content-Type: text/plain\r\n\r\nhello\r\n")
    out.extend(b"--b%d--\r\n" % i for i in reversed(range(levels)))
    return b"".join(out)


def many_parts(n: int, attachments: bool = False) -> bytes:
    out = [HEAD % (b"attachments" if attachments else b"parts"),
           b'Content-Type: multipart/mixed; boundary="X"\r\n\r\n',
           b"--X\r\nContent-Type: text/plain\r\n\r\nSee the files.\r\n"]
    for i in range(n):
        if attachments:
            out.append(b"--X\r\nContent-Type: application/octet-stream\r\n"
                       b'Content-Disposition: attachment; filename="f%d.bin"\r\n'
                       b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n" % i)
        else:
            out.append(b"--X\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i)
    out.append(b"--X--\r\n")
    return b"".join(out)


def many_headers(n: int) -> bytes:
    extra = b"".join(b"X-Filler-%d: %d\r\n" % (i, i) for i in range(n))
    return HEAD % b"headers" + extra + b"Content-Type: text/plain\r\n\r\nhello\r\n"


def corpus_files(corpus: Path) -> list[Path]:
    return sorted(p for sub in ("mime", "malformed") for p in (corpus / sub).rglob("*")
                  if p.is_file())


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def _sqlite_world(tmp_path: Path, **settings: object) -> World:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    upgrade(url)
    return World(tmp_path / "home", url, **settings).start()


def _wait_inbound(world: World, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with world.db.session() as s:
            if s.scalar(select(func.count(Inbound.id))) >= count:
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {count} inbound messages")


def test_corpus_and_monsters_end_held_or_quarantined(world: World, corpus: Path) -> None:
    files = corpus_files(corpus)
    assert len(files) >= 100
    accepted = 0
    refused_at_smtp = []
    for path in files:
        try:
            world.send(_as_from_lee(path.read_bytes()), LEE, SAM)
        except smtplib.SMTPDataError as exc:
            # RFC 5321 line length (500) or a header limit (552): answered, not taken in.
            assert exc.smtp_code in (500, 552), (path.name, exc)
            refused_at_smtp.append(path.name)
            continue
        accepted += 1
    monsters = {b"deep": nested(1500), b"parts": many_parts(1000),
                b"attachments": many_parts(60, attachments=True)}
    for data in monsters.values():
        world.send(data, LEE, SAM)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        world.send(many_headers(600), LEE, SAM)
    assert refused.value.smtp_code == 552
    assert b"Too many header fields (limit 500)" in refused.value.smtp_error

    _wait_inbound(world, accepted + len(monsters))
    world.settle(0.5)
    with world.db.session() as s:
        kinds = s.scalars(select(Inbound.kind)).all()
        rows = [(r.subject, r.state, r.quarantine_reason) for r in s.scalars(select(Record))]
    assert len(kinds) == accepted + len(monsters)
    assert "failed" not in kinds  # no internal error on any of them
    assert {state for _, state, _ in rows} <= {"awaiting_review", "quarantined"}
    assert all(reason for _, state, reason in rows if state == "quarantined")
    reasons = {subject: reason for subject, _, reason in rows}
    assert "nested deeper than 20 levels" in reasons["deep"]
    assert "more than 200 MIME parts" in reasons["parts"]
    assert "more than 50 attachments" in reasons["attachments"]
    assert world.to("park@school.example") == []  # nothing released

    # Still serving: an ordinary report gets its review request.
    world.send(report(subject="After the storm"), LEE, SAM)
    world.wait_for(lambda m: GUARDIAN in m.rcpt_tos
                   and "After the storm" in str(m.msg.get("Subject", "")), timeout=30)


def test_limit_quarantine_tells_guardians_and_shows_in_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = _sqlite_world(tmp_path, limits=Limits(max_attachments=3))
    try:
        world.send(many_parts(4, attachments=True), LEE, SAM)
        record = world.wait_state("quarantined")
        assert record.quarantine_reason == (
            "over a limit of this broker: more than 3 attachments (4)")
        notice = world.notice("uarantine")
        assert "more than 3 attachments" in notice.text()
        monkeypatch.setenv("BROKER_DATABASE_URL", world.settings.database_url)
        monkeypatch.delenv("BROKER_HOME", raising=False)
        shown = CliRunner().invoke(records_cli, ["--home", str(world.home), "show",
                                                 str(record.id)], prog_name="broker records")
        assert shown.exit_code == 0, shown.output
        assert "more than 3 attachments" in " ".join(shown.output.split())
    finally:
        world.stop()


def _greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.recv(512)


def test_smtp_limits_answer_clearly(tmp_path: Path) -> None:
    world = _sqlite_world(tmp_path, limits=Limits(
        max_recipients=2, max_headers=20, max_header_length=300, connections_per_address=3))
    try:
        with smtplib.SMTP("127.0.0.1", world.port, timeout=10) as smtp:
            smtp.ehlo()
            smtp.mail(LEE)
            assert smtp.rcpt(SAM)[0] == 250
            assert smtp.rcpt(SAM)[0] == 250
            code, text = smtp.rcpt(SAM)
            assert (code, text) == (452, b"4.5.3 Too many recipients")
        with pytest.raises(smtplib.SMTPDataError) as many:
            world.send(many_headers(20), LEE, SAM)
        assert (many.value.smtp_code, many.value.smtp_error) == (
            552, b"5.6.0 Too many header fields (limit 20)")
        long_header = (HEAD % b"long") + b"X-Long: a\r\n" + b"".join(
            b"\tcontinued line %d\r\n" % i for i in range(30)) + b"\r\nhello\r\n"
        with pytest.raises(smtplib.SMTPDataError) as long:
            world.send(long_header, LEE, SAM)
        assert (long.value.smtp_code, long.value.smtp_error) == (
            552, b"5.6.0 A header field is too long (limit 300 bytes)")
        with pytest.raises(smtplib.SMTPDataError) as line:
            world.send((HEAD % b"line") + b"X-Line: " + b"a" * 1200 + b"\r\n\r\nhi\r\n", LEE, SAM)
        assert line.value.smtp_code == 500  # RFC 5321 4.5.3.1.6, aiosmtpd's own answer

        held = [_greeting(world.port) for _ in range(3)]
        assert all(g.startswith(b"220") for _, g in held)
        extra, greeting = _greeting(world.port)
        assert greeting.startswith(b"421 4.7.0 too many connections from your address")
        extra.close()
        held.pop()[0].close()
        deadline = time.monotonic() + 5
        while True:  # the freed slot is reusable once the server has seen the close
            sock, greeting = _greeting(world.port)
            sock.close()
            if greeting.startswith(b"220") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert greeting.startswith(b"220")
        for sock, _ in held:
            sock.close()
        # Within limits, everything still works.
        world.send(report(), LEE, SAM)
        world.review()
    finally:
        world.stop()


def test_loopback_can_be_exempt_from_the_connection_limit(tmp_path: Path) -> None:
    world = _sqlite_world(tmp_path, limits=Limits(connections_per_address=1,
                                                  limit_loopback=False))
    try:
        socks = [_greeting(world.port) for _ in range(3)]
        assert all(g.startswith(b"220") for _, g in socks)
        for sock, _ in socks:
            sock.close()
    finally:
        world.stop()


def test_own_domain_mail_is_never_answered(tmp_path: Path) -> None:
    world = _sqlite_world(tmp_path)
    try:
        # A notice of the broker's own coming back to a list address (say, via a forward).
        own = report(subject="Looped notice", sender=f"sam@{DOMAIN}")
        world.send(own, f"bounces+1@{DOMAIN}", SAM)
        record = world.wait_state("quarantined")
        assert "broker's own domain" in (record.quarantine_reason or "")
        # A reply to a review request written by the broker's own domain: ignored.
        world.send(report(subject="Real one"), LEE, SAM)
        review = world.review()
        world.send(reply_to(review, "APPROVE", sender=f"notices@{DOMAIN}"),
                   f"notices@{DOMAIN}", str(review.msg["Reply-To"]))
        _wait_inbound(world, 3, timeout=15)
        world.settle(0.5)
        with world.db.session() as s:
            outcomes = s.scalars(select(Inbound.outcome).order_by(Inbound.id)).all()
            states = s.scalars(select(Record.state).order_by(Record.id)).all()
        assert outcomes[-1].startswith("ignored: mail from the broker's own domain")
        assert states == ["quarantined", "awaiting_review"]
        with world.sink.lock:
            rcpts = [r for m in world.sink.messages for r in m.rcpt_tos]
        assert not [r for r in rcpts if r.endswith("@" + DOMAIN)]
        assert rcpts.count(GUARDIAN) == 1 and rcpts.count(LEE) == 1  # review, receipt
    finally:
        world.stop()


def test_notices_are_capped_per_address_per_day(tmp_path: Path) -> None:
    world = _sqlite_world(tmp_path, limits=Limits(notices_per_address_per_day=2))
    try:
        for i in range(4):
            world.send(report(subject=f"Report {i}"), LEE, SAM)
        world.review(count=4)  # review requests are never capped
        world.wait_audit("notice_capped")
        world.settle(1.0)
        assert len(world.to(LEE)) == 2  # receipts: capped at 2
        capped = world.audit("notice_capped")
        assert len(capped) == 1  # once per address per day
        assert json.loads(capped[0].recipients) == [LEE]
    finally:
        world.stop()


def test_limits_config() -> None:
    home = Path("/nonexistent")
    settings = from_mapping(home, {"domain": DOMAIN, "limits": {"max_mime_depth": 5,
                                                                "limit_loopback": False}})
    assert settings.limits.max_mime_depth == 5 and not settings.limits.limit_loopback
    assert settings.limits.max_headers == 500  # the rest keep their defaults
    assert from_mapping(home, {"domain": DOMAIN}).limits == Limits()
    for bad in ({"max_headers": 0}, {"max_headers": "many"}, {"no_such_limit": 1},
                {"limit_loopback": 1}):
        with pytest.raises(ConfigError):
            from_mapping(home, {"domain": DOMAIN, "limits": bad})
