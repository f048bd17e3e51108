"""The pipeline takes spooled mail in batches, one commit per batch: a message that
trips a bug is kept (failed inbound row, bytes kept) without losing its neighbours."""

from __future__ import annotations

from email import policy
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.db.models import Inbound, Record
from broker.intake import pipeline as pipeline_mod
from broker.intake.pipeline import Pipeline
from broker.intake.spool import Envelope
from tests.harness import DOMAIN, report, team_runtime


def test_one_bad_message_does_not_undo_the_batch(tmp_path: Path, db_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rt = team_runtime(tmp_path / "home", db_url)
    subjects = ["first report", "poison report", "third report"]
    for subject in subjects:
        data = report(subject=subject).as_bytes(policy=policy.SMTP)
        rt.spool.store(data, Envelope.for_message(
            data, mail_from="lee@clinic.example", rcpt_tos=(f"sam@{DOMAIN}",), peer="x",
            helo="x"))

    real = pipeline_mod.parse_message

    def parse(source, *args, **kwargs):
        doc = real(source, *args, **kwargs)
        if doc.subject == "poison report":
            raise RuntimeError("a bug in the pipeline")
        return doc

    monkeypatch.setattr(pipeline_mod, "parse_message", parse)
    assert Pipeline(rt).run_once() == 3
    with rt.db.session() as s:
        kinds = sorted(s.scalars(select(Inbound.kind)).all())
        subjects_held = sorted(r.subject for r in s.scalars(select(Record)))
    assert kinds == ["failed", "record", "record"]
    assert subjects_held == ["first report", "third report"]
    assert rt.spool.pending() == []  # all taken in; the failed one's bytes are kept
    rt.spool.close()
    rt.close()


def test_a_decision_is_taken_in_before_a_backlog_of_reports(tmp_path: Path,
                                                             db_url: str) -> None:
    """Provider reports pile up in the spool; the parent's APPROVE, which arrived after
    all of them, is taken in with the first round, not after the whole backlog."""
    from broker.review import tokens

    rt = team_runtime(tmp_path / "home", db_url)

    def spool(data: bytes, sender: str, rcpt: str) -> None:
        rt.spool.store(data, Envelope.for_message(
            data, mail_from=sender, rcpt_tos=(rcpt,), peer="x", helo="x"))

    pipeline = Pipeline(rt)
    spool(report(subject="the first report").as_bytes(policy=policy.SMTP),
          "lee@clinic.example", f"sam@{DOMAIN}")
    assert pipeline.run_once() == 1
    with rt.db.session() as s:
        record = s.scalar(select(Record))
        token = tokens.issue(s, record, record.expires_at)  # as the review request has it
    for n in range(30):
        spool(report(subject=f"report {n}").as_bytes(policy=policy.SMTP),
              "lee@clinic.example", f"sam@{DOMAIN}")
    reply = report(subject="Re: review", body="APPROVE")
    del reply["From"]
    reply["From"] = "dana@home.example"
    spool(reply.as_bytes(policy=policy.SMTP), "dana@home.example",
          f"review+{token}@{DOMAIN}")

    pipeline._last_scan = float("-inf")  # as after a restart: the spool is listed
    assert pipeline.run_once(limit=10) == 10
    with rt.db.session() as s:
        kinds = [i.kind for i in s.scalars(select(Inbound).order_by(Inbound.id))]
    assert kinds[1] == "reply", kinds  # first in the round, ahead of 30 reports
    assert kinds.count("record") == 1 + 9
    rt.spool.close()
    rt.close()


def test_identical_bytes_claimed_by_another_pipeline_wait_and_become_a_duplicate(
        tmp_path: Path, db_url: str) -> None:
    """Two broker processes on one PostgreSQL database; a clinic's server lost our 250 and
    sent the same report again, and each copy reached a different pipeline. While one
    pipeline holds the first copy (its transaction open), the other must not take the
    second copy in as a new record: it leaves it spooled, and takes it in as a duplicate
    once the first is committed."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite's write lock lets one pipeline at a time take mail in")
    from sqlalchemy.orm import Session

    rt = team_runtime(tmp_path / "home", db_url)
    data = report(subject="sent twice").as_bytes(policy=policy.SMTP)

    def spool() -> str:
        return rt.spool.store(data, Envelope.for_message(
            data, mail_from="lee@clinic.example", rcpt_tos=(f"sam@{DOMAIN}",), peer="x",
            helo="x"))

    first, second = spool(), spool()
    # The other process is taking the first copy in: its transaction holds the claims.
    other = Session(rt.db.engine)
    other.begin()
    assert pipeline_mod._claim(other, first, rt.spool.envelope(first).sha256)
    entry = rt.spool.entry(second)
    assert entry is not None
    Pipeline(rt).process_batch([entry])
    with rt.db.session() as s:
        assert s.scalars(select(Inbound.kind)).all() == []
    assert rt.spool.entry(second) is not None  # still spooled, not lost
    other.rollback()  # (the other process failed; had it committed, the same follows)
    other.close()

    assert Pipeline(rt).run_once() == 2  # now both copies: one record, one duplicate
    with rt.db.session() as s:
        assert sorted(s.scalars(select(Inbound.kind)).all()) == ["duplicate", "record"]
        assert len(s.scalars(select(Record)).all()) == 1
    rt.spool.close()
    rt.close()



def test_a_message_announced_twice_and_one_already_taken_in_each_become_one_row(
        tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch looks once for messages already taken in (a crash between the commit and
    the spool file's removal): such a message is skipped, and one that is twice in the
    same batch (announced twice) is taken in once."""
    rt = team_runtime(tmp_path / "home", db_url)
    entries = []
    for subject in ("taken in before the crash", "announced twice"):
        data = report(subject=subject).as_bytes(policy=policy.SMTP)
        entry = rt.spool.entry(rt.spool.store(data, Envelope.for_message(
            data, mail_from="lee@clinic.example", rcpt_tos=(f"sam@{DOMAIN}",), peer="x",
            helo="x")))
        assert entry is not None
        entries.append(entry)
    pipeline = Pipeline(rt)
    # The crash: the first message's row commits, its spool file stays.
    with monkeypatch.context() as m:
        m.setattr(rt.spool, "remove", lambda spool_id: None)
        pipeline.process_batch([entries[0]])
    pipeline.process_batch([entries[0], entries[1], entries[1]])
    with rt.db.session() as s:
        kinds = [r.kind for r in s.scalars(select(Inbound).order_by(Inbound.id))]
        subjects = sorted(r.subject for r in s.scalars(select(Record)))
    assert kinds == ["record", "record"]
    assert subjects == ["announced twice", "taken in before the crash"]
    assert rt.spool.pending() == []
    rt.spool.close()
    rt.close()
