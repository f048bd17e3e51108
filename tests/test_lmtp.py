"""LMTP intake (RFC 2033): the same handler and spool as SMTP, one reply per recipient.

Real aiosmtpd on 127.0.0.1 and stdlib smtplib.LMTP as the client. smtplib's sendmail reads
only one reply after DATA, so the DATA exchanges here are driven line by line.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import config
from broker.intake.smtp import IntakeHandler, IntakeServer, address_acceptor
from broker.intake.spool import Spool

DOMAIN = "records.example"
SENDER = "therapist@clinic.example"
SIZE_LIMIT = 64 * 1024
RAW = (
    b"From: Dr T <therapist@clinic.example>\r\n"
    b"To: sam@records.example, alex@records.example\r\n"
    b"Subject: session notes\r\n"
    b"\r\n"
    b"Both did well today.\r\n"
    b".a line starting with a dot\r\n"
)


class Intake:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.stored: list[str] = []
        self.handler = IntakeHandler(
            spool, address_acceptor(DOMAIN, lambda: {"sam", "alex"}),
            on_stored=self.stored.append,
        )
        self.server = IntakeServer(self.handler, "127.0.0.1", 0, hostname="mx.records.example",
                                   data_size_limit=SIZE_LIMIT, lmtp=True)

    def client(self) -> smtplib.LMTP:
        c = smtplib.LMTP("127.0.0.1", self.server.port, local_hostname="mx.clinic.example",
                         timeout=10)
        code, _ = c.ehlo()  # smtplib.LMTP sends LHLO here
        assert code == 250
        return c


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[Intake]:
    spool = Spool(tmp_path / "spool")
    it = Intake(spool)
    it.server.start()
    try:
        yield it
    finally:
        it.server.stop()
        it.handler.close()
        spool.close()


def send_data(c: smtplib.LMTP, raw: bytes, replies: int) -> list[tuple[int, bytes]]:
    """DATA, the message, and the ``replies`` final replies the server owes."""
    code, _ = c.docmd("DATA")
    assert code == 354
    wire = smtplib.quotedata(raw.decode("latin-1")).encode("latin-1")
    c.send(wire + (b"" if wire.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    return [c.getreply() for _ in range(replies)]


def test_lhlo_advertises_size_and_helo_ehlo_are_refused(intake: Intake) -> None:
    with intake.client() as c:
        assert c.has_extn("size") and int(c.esmtp_features["size"]) == SIZE_LIMIT
        assert c.docmd("EHLO", "mx.clinic.example")[0] == 500
        assert c.docmd("HELO", "mx.clinic.example")[0] == 500


def test_two_known_children_get_two_replies_and_unknown_is_refused_at_rcpt(
    intake: Intake,
) -> None:
    with intake.client() as c:
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt(f"sam@{DOMAIN}")[0] == 250
        code, msg = c.rcpt(f"nobody@{DOMAIN}")
        assert (code, msg) == (550, b"5.1.1 no such recipient here")
        assert c.rcpt(f"alex@{DOMAIN}")[0] == 250
        replies = send_data(c, RAW, 2)
        assert [code for code, _ in replies] == [250, 250]
        # Stored once for both: each line names the same spool entry.
        assert replies[0][1] == replies[1][1]
        assert replies[0][1].startswith(b"2.0.0 Ok: queued as ")
        # Nothing more was said: the next command's reply is its own.
        assert c.noop()[0] == 250
    assert len(intake.stored) == 1
    assert intake.spool.read(intake.stored[0]) == RAW
    env = intake.spool.envelope(intake.stored[0])
    assert env.rcpt_tos == (f"sam@{DOMAIN}", f"alex@{DOMAIN}")
    assert env.mail_from == SENDER
    assert env.helo == "mx.clinic.example"


def test_oversized_message_gets_552_for_each_recipient(intake: Intake) -> None:
    big = RAW + b"x" * 998 + b"\r\n"
    big = big * (SIZE_LIMIT // len(big) + 2)
    with intake.client() as c:
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt(f"sam@{DOMAIN}")[0] == 250
        assert c.rcpt(f"alex@{DOMAIN}")[0] == 250
        replies = send_data(c, big, 2)
        assert [code for code, _ in replies] == [552, 552]
        assert c.noop()[0] == 250  # the session is still in step
        # ...and still takes a message after the refusal.
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt(f"sam@{DOMAIN}")[0] == 250
        assert [code for code, _ in send_data(c, RAW, 1)] == [250]
    assert len(intake.stored) == 1


def test_oversized_declared_in_mail_from_gets_552_at_mail(intake: Intake) -> None:
    with intake.client() as c:
        code, _ = c.mail(SENDER, [f"SIZE={SIZE_LIMIT + 1}"])
        assert code == 552
    assert intake.stored == []


def test_header_limits_refuse_per_recipient(intake: Intake) -> None:
    too_many = b"".join(b"X-H: %d\r\n" % i for i in range(600)) + b"\r\nbody\r\n"
    with intake.client() as c:
        assert c.mail(SENDER)[0] == 250
        assert c.rcpt(f"sam@{DOMAIN}")[0] == 250
        assert c.rcpt(f"alex@{DOMAIN}")[0] == 250
        replies = send_data(c, too_many, 2)
        assert [code for code, _ in replies] == [552, 552]
        assert c.noop()[0] == 250
    assert intake.stored == []


def test_smtp_server_still_answers_once(tmp_path: Path) -> None:
    """The SMTP path is untouched: one reply after DATA however many recipients."""
    spool = Spool(tmp_path / "spool")
    handler = IntakeHandler(spool, address_acceptor(DOMAIN, lambda: {"sam", "alex"}))
    server = IntakeServer(handler, "127.0.0.1", 0, hostname="mx.records.example")
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
            assert c.ehlo()[0] == 250
            assert c.mail(SENDER)[0] == 250
            assert c.rcpt(f"sam@{DOMAIN}")[0] == 250
            assert c.rcpt(f"alex@{DOMAIN}")[0] == 250
            code, msg = c.data(RAW)
            assert code == 250 and msg.startswith(b"2.0.0 Ok: queued as ")
            assert c.noop() == (250, b"OK")
    finally:
        server.stop()
        handler.close()
        spool.close()


def test_config_protocol(tmp_path: Path) -> None:
    text = config.render_config(domain=DOMAIN, listen="127.0.0.1:2525",
                                relay="127.0.0.1:25", auth="token")
    (tmp_path / config.CONFIG_NAME).write_text(text)
    assert config.load(tmp_path).smtp_protocol == "smtp"
    (tmp_path / config.CONFIG_NAME).write_text(
        text.replace('protocol = "smtp"', 'protocol = "lmtp"', 1))
    assert config.load(tmp_path).smtp_protocol == "lmtp"
    (tmp_path / config.CONFIG_NAME).write_text(
        text.replace('protocol = "smtp"', 'protocol = "esmtp"', 1))
    with pytest.raises(config.ConfigError, match=r"smtp\.protocol must be one of smtp, lmtp"):
        config.load(tmp_path)
