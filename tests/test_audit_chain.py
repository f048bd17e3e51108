"""The audit log: every event chained; any tampering is found and named by seq."""

from __future__ import annotations

from sqlalchemy import select, text

from broker.audit.log import record_event, verify_log
from broker.db.engine import Database
from broker.db.models import AuditEvent


def _append(db: Database, n: int) -> None:
    for i in range(n):
        with db.session() as s:
            record_event(
                s,
                action="held",
                actor="lee@clinic.example",
                actor_role="provider",
                child="sam",
                record_id=i + 1,
                recipients=["dana@home.example"],
                description={"subject": f"Report {i}", "sha256": "ab" * 32},
            )


def test_untouched_log_verifies(db: Database) -> None:
    _append(db, 5)
    with db.session() as s:
        verdict = verify_log(s)
        seqs = s.scalars(select(AuditEvent.seq).order_by(AuditEvent.seq)).all()
    assert verdict.ok, verdict
    assert verdict.checked == 5
    assert seqs == [1, 2, 3, 4, 5]


def test_changed_description_is_found_at_its_seq(db: Database) -> None:
    _append(db, 5)
    with db.session() as s:
        s.execute(
            text("UPDATE audit_events SET description = :d WHERE seq = 3"),
            {"d": '{"subject":"Nothing to see"}'},
        )
    with db.session() as s:
        verdict = verify_log(s)
    assert not verdict.ok
    assert verdict.first_bad_seq == 3


def test_deleted_last_event_is_found(db: Database) -> None:
    _append(db, 4)
    with db.session() as s:
        s.execute(text("DELETE FROM audit_events WHERE seq = 4"))
    with db.session() as s:
        verdict = verify_log(s)
    assert not verdict.ok
    assert verdict.first_bad_seq == 4


def test_deleted_middle_event_is_found(db: Database) -> None:
    _append(db, 4)
    with db.session() as s:
        s.execute(text("DELETE FROM audit_events WHERE seq = 2"))
    with db.session() as s:
        verdict = verify_log(s)
    assert not verdict.ok
    assert verdict.first_bad_seq == 2


def test_rolled_back_change_leaves_no_event(db: Database) -> None:
    _append(db, 1)
    try:
        with db.session() as s:
            record_event(s, action="held", actor="x@y", actor_role="provider")
            raise RuntimeError("the change failed")
    except RuntimeError:
        pass
    with db.session() as s:
        assert s.scalar(select(AuditEvent.seq).order_by(AuditEvent.seq.desc())) == 1
        assert verify_log(s).ok
