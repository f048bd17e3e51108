"""Story: the broker is killed (SIGKILL) right after answering 250 -> after a restart
the message is there, held once, and the parent gets exactly one review request."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from email import policy
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select

from broker import config
from broker.crypto import vault as vaults
from broker.db.engine import Database
from broker.db.migrate import upgrade
from broker.db.models import Inbound, Record
from broker.team.apply import apply_team
from broker.team.spec import parse_team
from tests.harness import DOMAIN, TEAM, Sink, free_port, report
from tests.serve_process import ServeProcess


@pytest.fixture
def setup(tmp_path: Path, db_url: str) -> Iterator[tuple[ServeProcess, Sink, int, Database]]:
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    sink = Sink()
    relay_port = free_port()
    relay = Controller(sink, hostname="127.0.0.1", port=relay_port)
    relay.start()
    (home / config.CONFIG_NAME).write_text(
        config.render_config(domain=DOMAIN, listen=f"127.0.0.1:{port}",
                             relay=f"127.0.0.1:{relay_port}", auth="token"))
    upgrade(db_url)
    # The content key, as `broker init` makes it; registered so this process reads sealed columns.
    vaults.register(db_url, vaults.create_keyring(home))
    db = Database(db_url)
    with db.session() as s:
        apply_team(s, parse_team(TEAM))
    daemon = ServeProcess(home, db_url)
    yield daemon, sink, port, db
    daemon.stop()
    relay.stop()
    db.dispose()


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        code, _ = smtp.noop()
        assert code == 250
        smtp.sendmail("lee@clinic.example", [f"sam@{DOMAIN}"],
                      report().as_bytes(policy=policy.SMTP))


def _reviews(sink: Sink) -> list:
    with sink.lock:
        return [m for m in sink.messages if m.rcpt_tos == ["dana@home.example"]
                and "Review needed" in str(m.msg["Subject"])]


def _wait(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_killed_after_250_before_processing_loses_nothing(setup) -> None:
    daemon, sink, port, db = setup
    daemon.start("intake")  # nothing but the spool runs: the kill lands before processing
    _send(port)
    daemon.kill()
    with db.session() as s:
        assert s.scalar(select(func.count(Record.id))) == 0
    daemon.start()
    _wait(lambda: len(_reviews(sink)) == 1)
    time.sleep(1.0)
    assert len(_reviews(sink)) == 1
    with db.session() as s:
        assert s.scalar(select(func.count(Record.id))) == 1
        assert s.scalar(select(func.count(Inbound.id))) == 1
        assert s.scalar(select(Record.state)) == "awaiting_review"


def test_killed_right_after_250_with_everything_running(setup) -> None:
    daemon, sink, port, db = setup
    daemon.start()
    _send(port)
    daemon.kill()
    daemon.start()
    _wait(lambda: len(_reviews(sink)) >= 1)
    time.sleep(1.0)
    with db.session() as s:
        assert s.scalar(select(func.count(Record.id))) == 1
    # One review request per guardian; a resend after the crash would carry the same
    # Message-ID, which is what promise 3 allows.
    ids = {str(m.msg["Message-ID"]) for m in _reviews(sink)}
    assert len(ids) == 1
