"""A running broker for end-to-end stories: real SMTP on 127.0.0.1 in both directions.

`World` starts the broker (intake, pipeline, outbox, expiry) on a free port and an
aiosmtpd server playing the relay and the outside world, which keeps every message
it is handed. Tests speak SMTP to the broker and read what the outside received.
"""

from __future__ import annotations

import email
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

from aiosmtpd.controller import Controller
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from broker import config
from broker.db.engine import Database
from broker.db.models import AuditEvent, Record
from broker.service import Service
from broker.team.apply import apply_team
from broker.team.spec import parse_team

if TYPE_CHECKING:
    from broker.runtime import Runtime

DOMAIN = "records.example"
GUARDIAN = "dana@home.example"
SCHOOL = ("park@school.example", "ortiz@school.example")

TEAM = """
[child]
slug = "sam"
name = "Sam Rivera"
birthdate = "2014-03-02"
jurisdiction = "us-federal"

[[guardians]]
name = "Dana Rivera"
email = "dana@home.example"

[[members]]
name = "Dr. Lee"
email = "lee@clinic.example"
role = "provider"
tags = ["ot"]

[[members]]
name = "Ms Park"
email = "park@school.example"
role = "school"
tags = ["teacher", "case-manager"]

[[members]]
name = "Mr Ortiz"
email = "ortiz@school.example"
role = "school"
tags = ["ot"]
"""


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def msg(self) -> EmailMessage:
        m = email.message_from_bytes(self.data, policy=policy.default)
        assert isinstance(m, EmailMessage)
        return m

    def text(self) -> str:
        body = self.msg.get_body(preferencelist=("plain",))
        return body.get_content() if body is not None else ""


@dataclass
class Sink:
    """The relay: an aiosmtpd handler that keeps everything."""

    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    refuse: Callable[[str], str | None] | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse and (answer := self.refuse(address)):
            return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.messages.append(Received(envelope.mail_from, [rcpt], envelope.content))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def team_runtime(home: Path, db_url: str) -> Runtime:
    """A home with the test team and no broker running: for tests that drive the pipeline
    (or the outbox) themselves, one round at a time. The caller closes it (rt.spool.close(),
    rt.close())."""
    from broker.db.migrate import upgrade
    from broker.runtime import Runtime

    home.mkdir(parents=True, exist_ok=True)
    (home / config.CONFIG_NAME).write_text(config.render_config(
        domain=DOMAIN, listen="127.0.0.1:0", relay="127.0.0.1:9", auth="token"))
    settings = config.Settings(**{**config.load(home).__dict__, "database_url": db_url})
    upgrade(db_url)
    rt = Runtime.open(settings)
    with rt.db.session() as s:
        apply_team(s, parse_team(TEAM))
    return rt


class World:
    def __init__(self, home: Path, db_url: str, team: str = TEAM, poll: float = 0.1,
                 **settings: object) -> None:
        self.home = home
        self.poll = poll  # the workers' idle poll (seconds)
        self.sink = Sink()
        self.relay_port = free_port()
        self.relay = Controller(self.sink, hostname="127.0.0.1", port=self.relay_port)
        home.mkdir(parents=True, exist_ok=True)
        (home / config.CONFIG_NAME).write_text(
            # Token mode unless a story asks for more (reply_auth=...): nothing here signs.
            config.render_config(domain=DOMAIN, listen="127.0.0.1:0",
                                 relay=f"127.0.0.1:{self.relay_port}", auth="token")
            # The same database for `broker ... --home` commands a story runs.
            .replace('url = ""', f'url = "{db_url}"', 1)
        )
        base = config.load(home)
        fields = {"database_url": db_url, "retry_schedule": (0.2, 0.5, 1.0),
                  "expiry_interval": 0.2, **settings}
        self.settings = config.Settings(**{**base.__dict__, **fields})
        self.db = Database(db_url)
        with self.db.session() as s:
            apply_team(s, parse_team(team))
        self.service: Service | None = None

    def start(self) -> World:
        self.relay.start()
        self.start_broker()
        return self

    def start_broker(self) -> None:
        self.service = Service(self.settings, poll=self.poll)
        self.service.start()

    def stop_broker(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def stop(self) -> None:
        self.stop_broker()
        self.relay.stop()
        self.db.dispose()

    @property
    def port(self) -> int:
        assert self.service is not None
        return self.service.port

    # -- the outside world --------------------------------------------------------------

    def send(self, data: bytes | EmailMessage, mail_from: str, rcpt: str | list[str]) -> None:
        raw = data.as_bytes(policy=policy.SMTP) if isinstance(data, EmailMessage) else data
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            smtp.sendmail(mail_from, [rcpt] if isinstance(rcpt, str) else rcpt, raw)

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float = 15.0,
                 count: int = 1) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.sink.lock:
                found = [m for m in self.sink.messages if predicate(m)]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        with self.sink.lock:
            seen = [(m.rcpt_tos, m.msg.get("Subject")) for m in self.sink.messages]
        raise AssertionError(f"timed out waiting for {count} message(s); relay has: {seen}")

    def to(self, address: str, subject_part: str = "") -> list[Received]:
        with self.sink.lock:
            return [m for m in self.sink.messages if address in m.rcpt_tos
                    and subject_part in str(m.msg.get("Subject", ""))]

    def settle(self, seconds: float = 1.0) -> None:
        """Let the workers run; used before asserting that something did NOT happen."""
        time.sleep(seconds)

    # -- helpers for stories (additive) -----------------------------------------------------

    def add_team(self, team: str) -> None:
        """Register one more child's team in the same database."""
        with self.db.session() as s:
            apply_team(s, parse_team(team))
        if self.service is not None:
            # The intake learns new children within a couple of seconds; don't wait.
            self.service.slugs.refresh()

    def all_to(self, addresses: tuple[str, ...] | list[str]) -> list[Received]:
        """Everything the relay was handed for any of these addresses."""
        wanted = {a.lower() for a in addresses}
        with self.sink.lock:
            return [m for m in self.sink.messages
                    if any(r.lower() in wanted for r in m.rcpt_tos)]

    def notice(self, subject_part: str, to: str = GUARDIAN, count: int = 1,
               timeout: float = 15.0) -> Received:
        """Wait for the count-th message to `to` whose Subject contains subject_part."""
        found = self.wait_for(lambda m: to in m.rcpt_tos
                              and subject_part in str(m.msg.get("Subject", "")),
                              timeout=timeout, count=count)
        return found[count - 1]

    def review(self, to: str = GUARDIAN, count: int = 1) -> Received:
        return self.notice("Review needed", to=to, count=count)

    def records(self) -> list[Record]:
        """All records, oldest first, with their child loaded."""
        with self.db.session() as s:
            return list(s.scalars(select(Record).options(selectinload(Record.child))
                                  .order_by(Record.id)))

    def record(self, record_id: int | None = None) -> Record:
        """One record (the only one when no id is given), with its child loaded."""
        records = self.records()
        if record_id is None:
            assert len(records) == 1, [(r.id, r.state) for r in records]
            return records[0]
        found = [r for r in records if r.id == record_id]
        assert found, record_id
        return found[0]

    def wait_state(self, state: str, record_id: int | None = None,
                   timeout: float = 10.0) -> Record:
        """Wait until the record (the only one when no id is given) exists in ``state``."""
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in self.records() if record_id in (None, r.id)]
            if len(records) == 1 and records[0].state == state:
                return records[0]
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for state {state!r}; records: "
                                     f"{[(r.id, r.state) for r in records]}")
            time.sleep(0.05)

    def audit(self, action: str | None = None, record_id: int | None = None) -> list[AuditEvent]:
        with self.db.session() as s:
            q = select(AuditEvent).order_by(AuditEvent.seq)
            if action is not None:
                q = q.where(AuditEvent.action == action)
            if record_id is not None:
                q = q.where(AuditEvent.record_id == record_id)
            return list(s.scalars(q))

    def wait_audit(self, action: str, count: int = 1, record_id: int | None = None,
                   timeout: float = 10.0) -> list[AuditEvent]:
        deadline = time.monotonic() + timeout
        while True:
            events = self.audit(action, record_id)
            if len(events) >= count:
                return events
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out waiting for {count} audit {action!r}; "
                                     f"log has {[e.action for e in self.audit()]}")
            time.sleep(0.05)


def every_text(data: bytes) -> str:
    """All a recipient could read out of a message: the raw bytes, every decoded header,
    every part's decoded payload (QP/base64 undone) and every filename, joined."""
    msg = email.message_from_bytes(data, policy=policy.default)
    out = [data.decode("utf-8", "replace")]
    for part in msg.walk():
        for key, value in part.items():
            out.append(f"{key}: {value}")
        if part.get_filename():
            out.append(part.get_filename())
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True) or b""
        out.append(payload.decode("utf-8", "replace"))
        charset = part.get_content_charset()
        if charset and charset.lower() not in ("utf-8", "us-ascii"):
            out.append(payload.decode(charset, "replace"))
    return "\n".join(out)


def report(subject: str = "OT progress report", body: str | None = None,
           sender: str = "lee@clinic.example", html: str | None = None,
           attachments: tuple[tuple[str, str, bytes], ...] = ()) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Dr. Lee <{sender}>"
    msg["To"] = f"sam@{DOMAIN}"
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="clinic.example")
    msg["Date"] = email.utils.formatdate()
    msg.set_content(body if body is not None else (
        "Sam worked on handwriting this month.\n\n"
        "Sam mentioned family conflict at home during the session.\n\n"
        "Recommend a slant board in class."
    ))
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for name, ctype, data in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg


def reply_to(review: Received, text: str, sender: str = "dana@home.example",
             quote: bool = True, headers: dict[str, str] | None = None) -> EmailMessage:
    """A guardian's reply as a mail client writes it: new text above a quote."""
    original = review.msg
    msg = EmailMessage()
    msg["From"] = f"Dana Rivera <{sender}>"
    msg["To"] = str(original["Reply-To"])
    msg["Subject"] = "Re: " + str(original["Subject"])
    msg["In-Reply-To"] = str(original["Message-ID"])
    msg["References"] = str(original["Message-ID"])
    msg["Message-ID"] = email.utils.make_msgid(domain="home.example")
    for k, v in (headers or {}).items():
        msg[k] = v
    body = text + "\n"
    if quote:
        quoted = "\n".join("> " + line for line in review.text().splitlines())
        body += f"\nOn Mon, 2 Mar 2026 at 10:00, Sam's records <sam@{DOMAIN}> wrote:\n{quoted}\n"
    msg.set_content(body)
    return msg
