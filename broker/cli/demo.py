"""`broker demo`: a full round trip on loopback, for a newcomer to watch.

A temporary home with SQLite, the broker on a free port, and a local SMTP server
playing the relay and the outside world. A provider sends a report with an
attachment; the parent replies REDACT 2, then APPROVE to the preview; the demo
prints what each party received and the audit trail, then stops everything.
"""

from __future__ import annotations

import email
import email.utils
import json
import shutil
import smtplib
import socket
import tempfile
import threading
import time
from email import policy
from email.message import EmailMessage
from pathlib import Path

import click
from aiosmtpd.controller import Controller
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from sqlalchemy import select

from broker import config
from broker.audit.log import verify_log
from broker.db.migrate import upgrade
from broker.db.models import AuditEvent
from broker.service import Service
from broker.team.apply import apply_team
from broker.team.spec import parse_team

DOMAIN = "records.example"
DEMO_TEAM = """
[child]
slug = "sam"
name = "Sam Rivera"
birthdate = "2014-03-02"
jurisdiction = "us-il"

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
tags = ["ot"]

[[members]]
name = "Mr Jones"
email = "jones@school.example"
role = "school"
tags = ["teacher"]
"""

REPORT = """Sam has made steady progress with handwriting this term: letters are better formed
and spacing has improved.

During the session Sam talked about family conflict at home and seemed tired.

For the classroom: a slant board and a short break every 30 minutes help."""


class _World:
    """The outside world: keeps every message the broker relays."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.messages.append((rcpt.lower(), envelope.content))
        return "250 OK"

    def wait(self, rcpt: str, subject_has: str, timeout: float = 30.0) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for who, data in self.messages:
                    msg = email.message_from_bytes(data, policy=policy.default)
                    if who == rcpt and subject_has in str(msg.get("Subject", "")):
                        assert isinstance(msg, EmailMessage)
                        return msg
            time.sleep(0.05)
        raise click.ClickException(f"demo: nothing for {rcpt} with {subject_has!r} in time")

    def received(self, rcpt: str) -> bool:
        with self.lock:
            return any(who == rcpt for who, _ in self.messages)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _text(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("plain",))
    return body.get_content() if body is not None else ""


def _reply(to_review: EmailMessage, text: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Dana Rivera <dana@home.example>"
    msg["To"] = str(to_review["Reply-To"])
    msg["Subject"] = "Re: " + str(to_review["Subject"])
    msg["In-Reply-To"] = str(to_review["Message-ID"])
    msg["References"] = str(to_review["Message-ID"])
    msg["Message-ID"] = email.utils.make_msgid(domain="home.example")
    quoted = "\n".join("> " + line for line in _text(to_review).splitlines())
    msg.set_content(f"{text}\n\nOn {to_review['Date']}, Sam's records wrote:\n{quoted}\n")
    return msg


def _send(port: int, msg: EmailMessage, mail_from: str, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(mail_from, [rcpt], msg.as_bytes(policy=policy.SMTP))


@click.command()
@click.option("--keep", is_flag=True, help="Keep the temporary home and print where it is.")
def demo(keep: bool) -> None:
    """Run the provider -> parent -> school round trip on loopback and print it."""
    console = Console()
    home = Path(tempfile.mkdtemp(prefix="broker-demo-"))
    world = _World()
    relay_port = _free_port()
    relay = Controller(world, hostname="127.0.0.1", port=relay_port)
    (home / config.CONFIG_NAME).write_text(
        # The demo has no DKIM (nobody signs its replies): token mode, for loopback only.
        config.render_config(domain=DOMAIN, listen="127.0.0.1:0", relay=f"127.0.0.1:{relay_port}",
                             auth="token")
    )
    settings = config.load(home)
    upgrade(settings.database_url)
    service = Service(settings, poll=0.1)
    with service.rt.db.session() as s:
        apply_team(s, parse_team(DEMO_TEAM))
    service.slugs.refresh()  # the intake accepts sam@ from the first message on
    relay.start()
    service.start()
    try:
        console.rule("1. Dr. Lee (provider) sends a report to sam@records.example")
        report = EmailMessage()
        report["From"] = "Dr. Lee <lee@clinic.example>"
        report["To"] = f"sam@{DOMAIN}"
        report["Subject"] = "OT progress report, March"
        report["Date"] = email.utils.formatdate()
        report["Message-ID"] = email.utils.make_msgid(domain="clinic.example")
        report.set_content(REPORT)
        report.add_attachment(
            b"Goals for next term:\n\nTyping practice twice a week.\n\nPencil grip check.\n",
            maintype="text", subtype="plain", filename="goals.txt",
        )
        _send(service.port, report, "lee@clinic.example", f"sam@{DOMAIN}")

        review = world.wait("dana@home.example", "Review needed")
        console.print(Panel(_text(review), title="2. Dana (parent) receives the review request"))

        console.rule("3. Dana replies: REDACT 2")
        _send(service.port, _reply(review, "REDACT 2"), "dana@home.example",
              str(review["Reply-To"]))
        preview = world.wait("dana@home.example", "Preview")
        console.print(Panel(_text(preview), title="4. Dana receives the preview"))

        console.rule("5. Dana replies to the preview: APPROVE")
        _send(service.port, _reply(preview, "APPROVE"), "dana@home.example",
              str(preview["Reply-To"]))
        school = world.wait("park@school.example", "OT progress")
        shown = [f"{k}: {v}" for k, v in school.items() if k in ("From", "To", "Reply-To",
                                                                  "Subject", "Message-ID")]
        files = [p.get_filename() for p in school.iter_attachments()]
        console.print(Panel("\n".join(shown) + "\n\n" + _text(school)
                            + (f"\n[attached: {', '.join(files)}]" if files else ""),
                            title="6. Ms Park (school) receives exactly what was approved"))
        if "family conflict" in school.as_string():
            raise click.ClickException("demo: the redacted paragraph reached the school")
        if world.received("jones@school.example"):
            raise click.ClickException("demo: the teacher got an OT note the rules route "
                                       "to the OT only")
        console.print("Mr Jones (teacher) received nothing: the rules route OT notes to the "
                      "school OT, and Dana approved no one else.")

        _wait_released(service)
        with service.rt.db.session() as s:
            events = s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
            verdict = verify_log(s)
            table = Table("seq", "time (UTC)", "actor", "action", "recipients", title="7. Audit")
            for ev in events:
                if ev.record_id is None:
                    continue
                table.add_row(str(ev.seq), ev.at.strftime("%H:%M:%S"), ev.actor, ev.action,
                              ", ".join(json.loads(ev.recipients)))
        console.print(table)
        console.print(f"audit chain: {'OK' if verdict.ok else 'BROKEN'}, "
                      f"{verdict.checked} events")
        if keep:
            console.print(f"home kept at {home}")
    finally:
        service.stop()
        relay.stop()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def _wait_released(service: Service, timeout: float = 15.0) -> None:
    from broker.db.models import Record

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with service.rt.db.session() as s:
            if s.scalar(select(Record.state)) == "released":
                return
        time.sleep(0.1)
