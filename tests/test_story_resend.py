"""Story: the provider's mail server never heard our 250 (the broker died between
storing the report and answering) and sends the very same bytes again -> the family
gets one review request, there is one record, and the second copy is kept as a
duplicate with an audit event saying which message it repeats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from email import policy
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.db.models import AuditEvent, Inbound, Record
from tests.harness import DOMAIN, GUARDIAN, World, report


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def test_identical_resend_is_one_record_and_one_review(world: World) -> None:
    raw = report(subject="OT report, March").as_bytes(policy=policy.SMTP)
    world.send(raw, "lee@clinic.example", f"sam@{DOMAIN}")
    world.wait_for(lambda m: GUARDIAN in m.rcpt_tos and "Review needed" in str(m.msg["Subject"]))
    world.send(raw, "lee@clinic.example", f"sam@{DOMAIN}")
    # A report that differs (a new Message-ID) is a new record, as before.
    world.send(report(subject="OT report, April"), "lee@clinic.example", f"sam@{DOMAIN}")
    world.wait_for(lambda m: GUARDIAN in m.rcpt_tos and "April" in str(m.msg["Subject"]))
    world.settle(1.0)

    reviews = [m for m in world.to(GUARDIAN) if "Review needed" in str(m.msg["Subject"])]
    assert sorted("March" in str(m.msg["Subject"]) for m in reviews) == [False, True]
    with world.db.read_session() as s:
        assert len(s.scalars(select(Record)).all()) == 2
        kinds = sorted((i.kind, i.id) for i in s.scalars(select(Inbound)))
        assert [k for k, _ in kinds] == ["duplicate", "record", "record"]
        dup = s.scalar(select(Inbound).where(Inbound.kind == "duplicate"))
        first = s.scalar(select(Inbound).where(Inbound.sha256 == dup.sha256,
                                               Inbound.kind == "record"))
        event = s.scalar(select(AuditEvent).where(AuditEvent.action == "duplicate_received"))
        assert json.loads(event.description) == {
            "inbound": dup.id, "same_as": first.id, "sha256": dup.sha256}
