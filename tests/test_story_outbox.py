"""Stories of the outbox: a relay that says "try later" gets the copy later, once; a
relay that refuses for good marks the release failed and tells the guardians; a
school member's reply to a release comes back into the hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from broker.db.models import AuditEvent, Delivery, Record
from tests.harness import DOMAIN, World, reply_to, report


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    w = World(tmp_path / "home", db_url).start()
    yield w
    w.stop()


def _approve(world: World) -> None:
    world.send(report(), "lee@clinic.example", f"sam@{DOMAIN}")
    review = world.wait_for(lambda m: "Review needed" in str(m.msg["Subject"]))[0]
    world.send(reply_to(review, "APPROVE"), "dana@home.example", str(review.msg["Reply-To"]))


def _record_state(world: World, want: str, timeout: float = 15.0) -> Record:
    import time

    deadline = time.monotonic() + timeout
    while True:
        with world.db.session() as s:
            record = s.scalars(select(Record).order_by(Record.id)).first()
            if record is not None and record.state == want:
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"record state is {record.state if record else None}")
        time.sleep(0.05)


def test_temporary_refusal_is_retried_and_delivered_once(world: World) -> None:
    refusals = {"park@school.example": 2}

    def refuse(address: str) -> str | None:
        if refusals.get(address, 0) > 0:
            refusals[address] -= 1
            return "451 4.3.0 try again later"
        return None

    world.sink.refuse = refuse
    _approve(world)
    world.wait_for(lambda m: m.rcpt_tos == ["park@school.example"])
    _record_state(world, "released")
    world.settle(1.0)
    assert len(world.to("park@school.example", "OT progress")) == 1
    with world.db.session() as s:
        park = s.scalar(select(Delivery).where(Delivery.recipient == "park@school.example",
                                                Delivery.kind == "release"))
        assert park is not None and park.state == "sent" and park.attempts == 3


def test_permanent_refusal_fails_the_release_and_tells_the_guardian(world: World) -> None:
    world.sink.refuse = lambda a: "550 5.1.1 no such user" if a == "ortiz@school.example" \
        else None
    _approve(world)
    record = _record_state(world, "release_failed")
    notice = world.wait_for(lambda m: m.rcpt_tos == ["dana@home.example"]
                            and "Delivery failed" in str(m.msg["Subject"]))[0]
    assert "ortiz@school.example" in notice.text()
    assert "550" in notice.text()
    # The other copy still went out, exactly once.
    assert len(world.to("park@school.example", "OT progress")) == 1
    with world.db.session() as s:
        actions = s.scalars(select(AuditEvent.action).where(AuditEvent.record_id == record.id)
                            ).all()
    assert "delivery_failed" in actions and actions[-1] == "release_failed"


def test_school_reply_to_a_release_is_held_for_the_parent(world: World) -> None:
    _approve(world)
    copy = world.wait_for(lambda m: m.rcpt_tos == ["park@school.example"])[0]
    answer = reply_to(copy, "Thanks, we will get the slant board.", sender="park@school.example")
    del answer["From"]
    answer["From"] = "Ms Park <park@school.example>"
    world.send(answer, "park@school.example", str(copy.msg["Reply-To"]))
    reviews = world.wait_for(lambda m: m.rcpt_tos == ["dana@home.example"]
                             and "Review needed" in str(m.msg["Subject"]), count=2)
    assert "slant board" in reviews[-1].text()
    world.settle(0.5)
    # Nothing of the school's reply reached the provider: it waits for the parent.
    assert not [m for m in world.to("lee@clinic.example") if "slant board" in m.text()]
