"""Scale-out: one `broker serve --role intake` and TWO worker processes
(`--role pipeline --role outbox --role expiry`) share one home (spool, content store)
and one PostgreSQL. 200 records in, 200 approvals in: every message is taken in
exactly once, every review request and every release copy leaves exactly once.

PostgreSQL only: SQLite serialises every writer on one file, so several processes on
one SQLite database are not a deployment this broker supports.
"""

from __future__ import annotations

import smtplib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from email import policy
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import func, select

from broker import config
from broker.audit.log import verify_log
from broker.crypto import vault as vaults
from broker.db.engine import Database
from broker.db.migrate import upgrade
from broker.db.models import Inbound, Record
from broker.team.apply import apply_team
from broker.team.spec import parse_team
from tests.conftest import reset_postgres
from tests.harness import DOMAIN, GUARDIAN, SCHOOL, TEAM, Received, Sink, free_port, reply_to
from tests.harness import report as make_report
from tests.serve_process import ServeProcess

N = 200
WORKER_ROLES = ("pipeline", "outbox", "expiry")


@pytest.fixture
def cluster(tmp_path: Path,
            pg_url: str) -> Iterator[tuple[list[ServeProcess], Sink, int, Database]]:
    reset_postgres(pg_url)
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
    upgrade(pg_url)
    vaults.register(pg_url, vaults.create_keyring(home))
    db = Database(pg_url)
    with db.session() as s:
        apply_team(s, parse_team(TEAM))
    procs = [ServeProcess(home, pg_url, name) for name in ("intake", "worker1", "worker2")]
    try:
        for p, roles in zip(procs, (("intake",), WORKER_ROLES, WORKER_ROLES), strict=True):
            p.start(*roles)
        yield procs, sink, port, db
    finally:
        for p in procs:
            p.stop()
        relay.stop()
        db.dispose()


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _messages(sink: Sink, pred: Callable[[Received], bool]) -> list[Received]:
    with sink.lock:
        found = list(sink.messages)
    return [m for m in found if pred(m)]


def _is_review(m: Received) -> bool:
    return m.rcpt_tos == [GUARDIAN] and "Review needed" in str(m.msg["Subject"])


def _is_copy(m: Received) -> bool:
    return m.rcpt_tos[0] in SCHOOL


def test_two_workers_share_the_work_without_doing_anything_twice(cluster) -> None:
    procs, sink, port, db = cluster
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for i in range(N):
            msg = make_report(subject=f"OT progress report {i}",
                              body=f"Report {i}: Sam worked on handwriting this month.\n\n"
                              "Recommend a slant board in class.")
            smtp.sendmail("lee@clinic.example", [f"sam@{DOMAIN}"],
                          msg.as_bytes(policy=policy.SMTP))
    _wait(lambda: len(_messages(sink, _is_review)) >= N, 60, f"{N} review requests")
    intake_done = time.monotonic()

    reviews = _messages(sink, _is_review)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for review in reviews:
            smtp.sendmail(GUARDIAN, [str(review.msg["Reply-To"])],
                          reply_to(review, "APPROVE").as_bytes(policy=policy.SMTP))

    def released() -> bool:
        with db.read_session() as s:
            done = s.scalar(select(func.count(Record.id))
                            .where(Record.state == "released"))
        return done == N and len(_messages(sink, _is_copy)) >= N * len(SCHOOL)

    _wait(released, 60, f"{N} records released")
    time.sleep(1.0)  # a copy sent twice would arrive now
    elapsed = time.monotonic() - started
    print(f"\n{N} records in {intake_done - started:.1f}s; all released after {elapsed:.1f}s")

    logs = "\n".join(p.log_text() for p in procs)
    with db.read_session() as s:
        assert s.scalar(select(func.count(Record.id))) == N
        kinds = dict(s.execute(select(Inbound.kind, func.count(Inbound.id))
                               .group_by(Inbound.kind)).all())
        assert kinds == {"record": N, "reply": N}, (kinds, logs)
        assert verify_log(s).ok
    # Every message the relay was handed, once per recipient and Message-ID.
    with sink.lock:
        seen = Counter((m.rcpt_tos[0], str(m.msg["Message-ID"])) for m in sink.messages)
    assert [k for k, n in seen.items() if n > 1] == []
    reviews = _messages(sink, _is_review)
    assert len(reviews) == N
    assert len({str(m.msg["Message-ID"]) for m in reviews}) == N
    for member in SCHOOL:
        copies = _messages(sink, lambda m, member=member: m.rcpt_tos == [member])
        assert len(copies) == N
        assert len({str(m.msg["Message-ID"]) for m in copies}) == N
    assert "could not be processed" not in logs, logs
    assert "step failed" not in logs, logs
