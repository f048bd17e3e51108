"""The pipeline takes spooled mail in batches, one commit per batch: a message that
trips a bug is kept (failed inbound row, bytes kept) without losing its neighbours."""

from __future__ import annotations

from email import policy
from pathlib import Path

import pytest
from sqlalchemy import select

from broker import config
from broker.db.migrate import upgrade
from broker.db.models import Inbound, Record
from broker.intake import pipeline as pipeline_mod
from broker.intake.pipeline import Pipeline
from broker.intake.spool import Envelope
from broker.runtime import Runtime
from broker.team.apply import apply_team
from broker.team.spec import parse_team
from tests.harness import DOMAIN, TEAM, report


def test_one_bad_message_does_not_undo_the_batch(tmp_path: Path, db_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / config.CONFIG_NAME).write_text(config.render_config(
        domain=DOMAIN, listen="127.0.0.1:0", relay="127.0.0.1:9", auth="token"))
    settings = config.Settings(**{**config.load(home).__dict__, "database_url": db_url})
    upgrade(db_url)
    rt = Runtime.open(settings)
    with rt.db.session() as s:
        apply_team(s, parse_team(TEAM))
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
