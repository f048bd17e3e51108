"""Story: a provider sends a report -> the parent gets a review request -> APPROVE ->
the school gets exactly the broker-built copy; the audit shows every step."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.audit.log import verify_log
from broker.db.models import AuditEvent, Delivery, Record
from tests.harness import DOMAIN, World, reply_to, report


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    # [receipts] forwarded = true: the provider is told when the family shared it.
    w = World(tmp_path / "home", db_url, notify_sender_on_release=True).start()
    yield w
    w.stop()


def _review(world: World) -> list:
    return world.wait_for(lambda m: "dana@home.example" in m.rcpt_tos
                          and "Review needed" in str(m.msg["Subject"]))


def test_approve_releases_to_school_members(world: World) -> None:
    world.send(report(), "lee@clinic.example", f"sam@{DOMAIN}")
    review = _review(world)[0]
    text = review.text()
    assert "[1] Sam worked on handwriting" in text
    assert "[2] Sam mentioned family conflict" in text
    assert "park@school.example" in text and "ortiz@school.example" in text
    assert str(review.msg["Reply-To"]).startswith("review+")
    # Nothing reached the school while the record is held.
    assert world.to("park@school.example") == []
    # The sender got a receipt, not the content.
    receipt = world.wait_for(lambda m: "lee@clinic.example" in m.rcpt_tos)[0]
    assert "family conflict" not in receipt.text()

    world.send(reply_to(review, "APPROVE"), "dana@home.example", str(review.msg["Reply-To"]))
    copies = world.wait_for(lambda m: m.rcpt_tos[0] in ("park@school.example",
                                                        "ortiz@school.example"), count=2)
    for copy in copies:
        msg = copy.msg
        assert msg["From"].addresses[0].addr_spec == f"sam@{DOMAIN}"
        assert str(msg["Reply-To"]) == f"sam@{DOMAIN}"
        assert copy.mail_from.startswith("bounces+")
        body = copy.text()
        assert "Sam worked on handwriting" in body
        assert "Do not pass it on without the family's written permission" in body
        assert "Dana Rivera" in body  # released by
    # One decision, one moment: every copy says it was released when the record was
    # decided, in its Date header and in its "Released by" line alike.
    lines = {next(ln for ln in c.text().splitlines() if ln.startswith("Released by"))
             for c in copies}
    assert len(lines) == 1 and len({str(c.msg["Date"]) for c in copies}) == 1
    # The provider never receives its own report back.
    assert not [m for m in world.to("lee@clinic.example") if "handwriting" in m.text()]

    with world.db.session() as s:
        deadline_ok = False
        for _ in range(100):
            record = s.scalars(select(Record)).one()
            s.refresh(record)
            if record.state == "released":
                deadline_ok = True
                break
            world.settle(0.05)
        assert deadline_ok, record.state
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.record_id == record.id)
                            .order_by(AuditEvent.seq)).all()
        assert actions[:5] == ["received", "held", "review_requested", "approved", "releasing"]
        assert actions.count("delivered") == 2
        assert actions[-1] == "released" or "released" in actions
        delivered = s.scalars(select(AuditEvent).where(AuditEvent.action == "delivered")).all()
        sent = {d.recipient: d.sha256 for d in s.scalars(
            select(Delivery).where(Delivery.kind == "release"))}
        for ev in delivered:
            desc = json.loads(ev.description)
            rcpt = json.loads(ev.recipients)[0]
            assert desc["sha256"] == sent[rcpt]
            assert desc["released_by"] == "dana@home.example"
        assert verify_log(s).ok
        decided = record.decided_at.replace(tzinfo=UTC)
    assert {c.msg["Date"].datetime for c in copies} == {decided.replace(microsecond=0)}
    # What reached the school is byte-for-byte what the audit hashed.
    assert {hashlib.sha256(c.data).hexdigest() for c in copies} == set(sent.values())
    # The provider is told it was shared: not to whom, not what.
    shared = world.wait_for(lambda m: m.rcpt_tos == ["lee@clinic.example"]
                            and "Shared by the family" in str(m.msg["Subject"]))[0]
    assert "park" not in shared.text().lower() and "handwriting" not in shared.text()
