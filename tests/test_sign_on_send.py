"""The outbox signs what it sends, and runs in a process of its own under `broker serve`.

Stories:
- provider sends report -> the pipeline queues the review request and the receipt as
  composed (no signature yet) -> the outbox signs both and offers them: the relay says
  451 -> next round the relay takes them, and the broker dies before recording it -> after
  the restart they are sent again: all three tries carried the very same signed bytes,
  which the copies then hold, and they verify with the broker's key;
- a copy that cannot be signed stays queued, says why, and nothing of it is sent; it goes
  once signing works again;
- `broker serve` runs the pipeline and the outbox in two worker processes, and the
  pipeline's commits wake the outbox: review requests do not wait for its idle poll.
SQLite and PostgreSQL, real SMTP relay (aiosmtpd), real spool and database.
"""

from __future__ import annotations

import hashlib
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from email import policy
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from broker import config
from broker.cli import serve as serve_cli
from broker.content.store import ContentMissing
from broker.crypto import pgp, pgpmime
from broker.crypto import vault as vaults
from broker.crypto.keys import broker_public_key, create_broker_key
from broker.db.engine import Database
from broker.db.models import Delivery
from broker.intake import journal as jnl
from broker.intake.burst import BurstDeferral
from broker.intake.pipeline import Pipeline
from broker.intake.spool import Envelope, Spool
from broker.release.sender import OutboxSender
from broker.runtime import Runtime
from broker.service import Service
from broker.team.apply import apply_team
from broker.team.spec import parse_team
from tests.harness import DOMAIN, GUARDIAN, TEAM, Received, Sink, free_port, report
from tests.serve_process import ServeProcess

LEE = "lee@clinic.example"


def _home(home: Path, db_url: str, relay_port: int, listen: str = "127.0.0.1:0") -> None:
    """A home with the test team and the broker's own OpenPGP key."""
    home.mkdir(parents=True, exist_ok=True)
    (home / config.CONFIG_NAME).write_text(config.render_config(
        domain=DOMAIN, listen=listen, relay=f"127.0.0.1:{relay_port}", auth="token"))
    create_broker_key(home, DOMAIN)
    vaults.register(db_url, vaults.create_keyring(home))
    db = Database(db_url)
    with db.session() as s:
        apply_team(s, parse_team(TEAM))
    db.dispose()


@pytest.fixture
def rt(tmp_path: Path, db_url: str) -> Iterator[tuple[Runtime, int]]:
    """The broker's runtime on a fresh home (nothing running) and its relay's port."""
    relay_port = free_port()
    home = tmp_path / "home"
    _home(home, db_url, relay_port)
    settings = config.Settings(**{**config.load(home).__dict__, "database_url": db_url,
                                  "retry_schedule": (0.0,)})
    runtime = Runtime.open(settings)
    yield runtime, relay_port
    runtime.spool.close()
    runtime.close()


def _take_in_a_report(runtime: Runtime) -> None:
    """A provider's report, spooled as the intake spools it, and taken in."""
    data = report().as_bytes(policy=policy.SMTP)
    pipeline = Pipeline(runtime)
    pipeline.notify(runtime.spool.store(data, Envelope.for_message(
        data, mail_from=LEE, rcpt_tos=(f"sam@{DOMAIN}",), peer="127.0.0.1",
        helo="clinic.example")))
    assert pipeline.run_once() == 1


def _queued(runtime: Runtime) -> list[SimpleNamespace]:
    """The outbox's rows as they are now (plain values: the session is gone after)."""
    with runtime.db.read_session() as s:
        return [SimpleNamespace(**{c.key: getattr(d, c.key) for c in Delivery.__table__.columns})
                for d in s.scalars(select(Delivery).order_by(Delivery.id))]


def _verify(runtime: Runtime, data: bytes) -> pgpmime.Opened:
    opened = pgpmime.open_message(data, verify_with=[broker_public_key(runtime.settings.home)])
    assert opened.signature.status == "good", opened.signature
    return opened


class RefusingFirst(Sink):
    """A relay that reads each message and answers 451 to the first try of each recipient
    (the bytes it was offered are kept in ``offered``), 250 after."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: dict[str, bytes] = {}

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        rcpt = envelope.rcpt_tos[0]
        if rcpt not in self.offered:
            self.offered[rcpt] = envelope.content
            return "451 4.3.0 try again later"
        return await super().handle_DATA(server, session, envelope)


def _due_now(runtime: Runtime) -> None:
    """Every queued copy due again (instead of waiting out the retry schedule or lease)."""
    with runtime.db.session() as s:
        for d in s.scalars(select(Delivery)):
            d.next_attempt_at = d.created_at


def test_the_outbox_signs_what_it_sends_and_a_retry_sends_the_same_bytes(
    rt: tuple[Runtime, int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, relay_port = rt
    _take_in_a_report(runtime)
    queued = _queued(runtime)
    assert [(d.kind, d.recipient) for d in queued] == [("review", GUARDIAN), ("receipt", LEE)]
    for d in queued:
        composed = runtime.content.get(d.content_ref)
        # Queued as composed: no signature yet, and nothing encrypted (no keys on the team).
        assert d.sign_on_send and b"multipart/signed" not in composed
        assert d.sha256 == hashlib.sha256(composed).hexdigest()

    sink = RefusingFirst()
    relay = Controller(sink, hostname="127.0.0.1", port=relay_port)
    relay.start()
    sender = OutboxSender(runtime)
    try:
        # First try: signed, offered, refused (451). Nothing is stored for it.
        assert sender.run_once() == 2
        after = _queued(runtime)
        assert [(d.state, d.sign_on_send) for d in after] == [("queued", True)] * 2
        assert [d.content_ref for d in after] == [d.content_ref for d in queued]
        assert all(b"multipart/signed" in sink.offered[d.recipient] for d in queued)
        # Second try: the relay takes them... and the broker dies before it writes that
        # down (its outcomes are never recorded).
        _due_now(runtime)
        with monkeypatch.context() as m:
            def crash(outcomes: object) -> None:
                raise KeyboardInterrupt("killed")

            m.setattr(sender, "_record", crash)
            with pytest.raises(KeyboardInterrupt):
                sender.run_once()
        assert [d.state for d in _queued(runtime)] == ["queued", "queued"]
        # After the restart: sent again, and this time recorded.
        _due_now(runtime)
        assert sender.run_once() == 2
    finally:
        sender.close()
        relay.stop()
    sent = _queued(runtime)
    assert [(d.state, d.sign_on_send) for d in sent] == [("sent", False)] * 2
    for d in sent:
        copies = [m.data for m in sink.messages if m.rcpt_tos == [d.recipient]]
        # Every try carried the same bytes: the refused one, the one the crash hid, and
        # the last; they are what the copy now holds and what its sha256 (so the audit)
        # names, and they verify with the broker's key.
        assert copies == [sink.offered[d.recipient]] * 2
        assert runtime.content.get(d.content_ref) == copies[0]
        assert d.sha256 == hashlib.sha256(copies[0]).hexdigest()
        opened = _verify(runtime, copies[0])
        assert opened.message["Message-ID"] == d.message_id
    review = _verify(runtime, sink.offered[GUARDIAN]).message
    assert "Review needed" in str(review["Subject"])
    assert "handwriting" in review.get_body(preferencelist=("plain",)).get_content()


def test_a_copy_that_cannot_be_signed_stays_queued_and_goes_once_it_can(
    rt: tuple[Runtime, int], monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime, relay_port = rt
    _take_in_a_report(runtime)
    sink = Sink()
    relay = Controller(sink, hostname="127.0.0.1", port=relay_port)
    relay.start()
    sender = OutboxSender(runtime)
    try:
        with monkeypatch.context() as m:
            def broken(data: bytes, signer: str | bytes, **kw: object) -> bytes:
                raise pgp.PGPError("signing failed: the key cannot sign")

            m.setattr(pgpmime, "sign_bytes", broken)
            assert sender.run_once() == 2
        rows = _queued(runtime)
        assert [(d.state, d.sign_on_send, d.last_error) for d in rows] == [
            ("queued", True, "signing failed")] * 2
        assert sink.messages == []  # nothing unsigned, nothing at all, left
        _due_now(runtime)
        assert sender.run_once() == 2
    finally:
        sender.close()
        relay.stop()
    assert [d.state for d in _queued(runtime)] == ["sent", "sent"]
    assert len(sink.messages) == 2
    for m in sink.messages:
        _verify(runtime, m.data)


# -- broker serve: the outbox in its own process, woken by the pipeline ----------------------


def test_the_pipelines_commits_wake_the_outbox_process(
    rt: tuple[Runtime, int],
) -> None:
    """The pipeline's process announces each commit that queued mail (on_queued), the
    parent passes each announcement line on, and the outbox process wakes on it."""
    runtime, _ = rt
    announced: list[int] = []
    service = Service(runtime.settings, roles=("pipeline",),
                      on_queued=lambda: announced.append(1))
    try:
        data = report().as_bytes(policy=policy.SMTP)
        service.notify(service.rt.spool.store(data, Envelope.for_message(
            data, mail_from=LEE, rcpt_tos=(f"sam@{DOMAIN}",), peer="127.0.0.1",
            helo="clinic.example")))
        assert service.pipeline.run_once() == 1
        assert announced == [1]
        assert not service.sender_wake.is_set()  # no outbox in this process
    finally:
        service.rt.spool.close()
        service.rt.close()
        service.slugs.stop()

    # The parent: every line the worker process writes is one announcement.
    passed_on: list[int] = []
    workers = serve_cli._Workers(runtime.settings.home, "WARNING", ("pipeline",),
                                 on_queued=lambda: passed_on.append(1))
    workers.args = [sys.executable, "-c", "print(); print(); print()"]
    workers.start()
    assert workers.proc is not None
    workers.proc.wait(10)
    deadline = time.monotonic() + 5
    while len(passed_on) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert passed_on == [1, 1, 1]
    workers.stop()


@pytest.fixture
def served(tmp_path: Path, db_url: str) -> Iterator[tuple[ServeProcess, Sink, int]]:
    port, relay_port = free_port(), free_port()
    sink = Sink()
    relay = Controller(sink, hostname="127.0.0.1", port=relay_port)
    relay.start()
    _home(tmp_path / "home", db_url, relay_port, listen=f"127.0.0.1:{port}")
    daemon = ServeProcess(tmp_path / "home", db_url)
    yield daemon, sink, port
    daemon.stop()
    relay.stop()


def test_broker_serve_runs_the_outbox_in_a_process_of_its_own(
    served: tuple[ServeProcess, Sink, int],
) -> None:
    daemon, sink, port = served
    daemon.start()
    assert daemon.proc is not None
    workers = _children(daemon.proc.pid)
    roles = sorted(" ".join(a for a in _cmdline(p) if a in ("pipeline", "expiry", "outbox"))
                   for p in workers)
    assert roles == ["outbox", "pipeline expiry"], [_cmdline(p) for p in workers]
    # Report after report: each review request reaches the relay without waiting for the
    # outbox's idle poll (1 s): the pipeline's commit wakes it. (Report 0 is the first
    # the processes see: it pays for their first imports, so it is not timed.)
    waits = []
    for n in range(6):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail(LEE, [f"sam@{DOMAIN}"],
                          report(f"Report {n}").as_bytes(policy=policy.SMTP))
        acked = time.monotonic()
        deadline = acked + 20
        while not _reviews(sink, f"Report {n}") and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _reviews(sink, f"Report {n}"), daemon.log_text()
        waits.append(time.monotonic() - acked)
        time.sleep(0.3)  # the outbox idle again
    assert max(waits[1:]) < 0.6, waits
    review = _reviews(sink, "Report 5")[0]
    assert review.msg.get_content_type() == "multipart/signed"


def _reviews(sink: Sink, subject: str) -> list[Received]:
    with sink.lock:
        return [m for m in sink.messages if m.rcpt_tos == [GUARDIAN]
                and subject in str(m.msg["Subject"])]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=True).stdout
    return [int(x) for x in out.split()]


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def test_an_outbox_process_that_dies_is_started_again(
    served: tuple[ServeProcess, Sink, int],
) -> None:
    daemon, sink, port = served
    daemon.start()
    assert daemon.proc is not None
    outbox = next(p for p in _children(daemon.proc.pid) if "outbox" in _cmdline(p))
    os.kill(outbox, signal.SIGKILL)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(LEE, [f"sam@{DOMAIN}"], report("After").as_bytes(policy=policy.SMTP))
    deadline = time.monotonic() + 30
    while not _reviews(sink, "After") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _reviews(sink, "After"), daemon.log_text()
    again = [p for p in _children(daemon.proc.pid) if "outbox" in _cmdline(p)]
    assert again and outbox not in again
    assert "worker process (outbox) exited" in daemon.log_text()


# -- broker serve's outbox process makes the journal's spool files ---------------------------


def _files(spool: Spool) -> int:
    """Spool files there are (Spool.message_files would make the journal's first)."""
    return len(list(spool.root.glob("*.eml")))


def test_the_outbox_process_turns_journal_records_into_spool_files(
    rt: tuple[Runtime, int],
) -> None:
    """The intake of `broker serve` appends small mail to the spool's journal and tells
    the outbox's process, whose own thread turns the records into spool files shortly
    after (the pipeline process then finds them made), but not while the intake is in a
    burst. The intake's process keeps its interpreter for the SMTP sessions."""
    runtime, _ = rt
    settings = config.Settings(**{**runtime.settings.__dict__, "listen_port": free_port()})
    service = Service(settings, roles=("outbox",), materialise=True)
    intake = Service(settings, roles=("intake",),
                     on_stored=lambda spool_id: service.stored_elsewhere())
    assert not any(w.name == "materialise" for w in intake.workers)
    service.start()
    intake.start()

    def send(subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", intake.port, timeout=30) as smtp:
            smtp.sendmail(LEE, [f"sam@{DOMAIN}"], report(subject).as_bytes(policy=policy.SMTP))

    def files_reach(n: int) -> bool:
        deadline = time.monotonic() + 10
        while _files(spool) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return _files(spool) == n

    try:
        spool = intake.rt.spool
        # The journal's first segment is prepared while the first messages are stored (as
        # files); from then on small mail goes to the journal.
        sent = 0
        while not jnl.segments(spool.journal_dir) and sent < 50:
            send(f"Warm-up {sent}")
            sent += 1
            time.sleep(0.05)
        assert jnl.segments(spool.journal_dir), "the journal never started"
        assert files_reach(sent)
        for n in range(3):
            send(f"Report {n}")
        sent += 3
        assert files_reach(sent)  # made here: no pipeline runs at all

        # In a burst the thread leaves the journal alone (the intake has the machine).
        time.sleep(0.2)  # its round after the last one is over
        service.burst = burst = BurstDeferral(rate=10, longest=30, window=1.0)
        for _ in range(burst.count):
            burst.arrived()
        send("In the burst")
        time.sleep(0.3)
        assert burst.in_burst() and _files(spool) == sent
        assert files_reach(sent + 1)  # the burst ends a second after its last arrival
    finally:
        intake.stop()
        service.stop()


def test_the_pipelines_leave_journal_records_to_the_materialiser_for_a_moment(
    rt: tuple[Runtime, int],
) -> None:
    """The large pipeline never makes files of the journal (it holds small mail only);
    the small one waits `journal_wait` for another process to, then makes them itself."""
    runtime, _ = rt
    settings = config.Settings(**{**runtime.settings.__dict__, "listen_port": free_port()})
    intake = Service(settings, roles=("intake",))  # nobody makes the journal's files
    intake.start()
    try:
        spool = intake.rt.spool
        ids: list[str] = []
        intake.handler.on_stored = ids.append
        while not jnl.segments(spool.journal_dir) and len(ids) < 50:
            with smtplib.SMTP("127.0.0.1", intake.port, timeout=30) as smtp:
                smtp.sendmail(LEE, [f"sam@{DOMAIN}"], report().as_bytes(policy=policy.SMTP))
            time.sleep(0.05)
        before = _files(spool)
        with smtplib.SMTP("127.0.0.1", intake.port, timeout=30) as smtp:
            smtp.sendmail(LEE, [f"sam@{DOMAIN}"], report("Journal").as_bytes(policy=policy.SMTP))
        in_journal = ids[-1]
        assert _files(spool) == before  # still a journal record

        assert Pipeline(runtime, sizes="large")._entries([in_journal]) == []
        assert _files(spool) == before  # the large pipeline made nothing
        small = Pipeline(runtime, sizes="small", journal_wait=0.2)
        started = time.monotonic()
        [entry] = small._entries([in_journal])
        assert time.monotonic() - started >= 0.2  # it waited, then made it itself
        assert entry.id == in_journal and entry.eml_path.exists()
        assert _files(spool) > before
    finally:
        intake.stop()


def test_the_round_reads_its_copies_at_once_and_a_missing_one_alone_fails(
    rt: tuple[Runtime, int],
) -> None:
    runtime, _ = rt
    content = runtime.content
    with runtime.db.session() as s:
        small = content.put(b"a composed copy", s)  # in the database
    large = content.put(b"x" * (content.inline_limit + 1))  # a file
    missing = "0" * len(small)
    got = content.get_many([small, large, missing])
    assert got == {small: b"a composed copy", large: b"x" * (content.inline_limit + 1)}
    with pytest.raises(ContentMissing):
        content.get(missing)  # what the outbox then meets for that copy alone
