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


def _held(s, record_id: int) -> None:
    record_event(s, action="held", actor="lee@clinic.example", actor_role="provider",
                 child="sam", record_id=record_id)


def test_events_of_a_rolled_back_savepoint_are_not_written(db: Database) -> None:
    """The pipeline takes each message in inside a savepoint: a message that fails
    must leave no audit event behind, while its neighbours' events stay."""
    with db.session() as s:
        _held(s, 1)
        try:
            with s.begin_nested():
                _held(s, 2)
                raise RuntimeError("this message failed")
        except RuntimeError:
            pass
        with s.begin_nested():
            _held(s, 3)
    with db.session() as s:
        rows = s.execute(select(AuditEvent.seq, AuditEvent.record_id)
                         .order_by(AuditEvent.seq)).all()
        assert [tuple(r) for r in rows] == [(1, 1), (2, 3)]
        assert verify_log(s).ok


def test_events_read_back_in_their_own_transaction(db: Database) -> None:
    """append_pending makes queued events visible to a read in the same transaction."""
    from broker.audit.log import append_pending

    with db.session() as s:
        _held(s, 7)
        append_pending(s)
        assert s.scalar(select(AuditEvent.record_id).where(AuditEvent.seq == 1)) == 7
        _held(s, 8)
    with db.session() as s:
        assert s.scalars(select(AuditEvent.record_id).order_by(AuditEvent.seq)).all() == [7, 8]
        assert verify_log(s).ok


def test_an_open_transaction_does_not_hold_the_chain(db: Database) -> None:
    """Two processes' batches: one that has queued events but not committed must not
    make another writer wait for the chain (PostgreSQL; SQLite has one writer anyway).
    Seq follows commit order."""
    if not db.is_postgres:
        import pytest

        pytest.skip("SQLite serialises writers with its database lock")
    import threading

    first = db._factory()
    try:
        _held(first, 1)  # queued: nothing locked yet
        done = threading.Event()

        def other() -> None:
            with db.session() as s:
                _held(s, 2)
            done.set()

        t = threading.Thread(target=other)
        t.start()
        assert done.wait(10), "the second writer waited for the first one's commit"
        first.commit()
    finally:
        first.close()
    t.join()
    with db.session() as s:
        assert s.scalars(select(AuditEvent.record_id).order_by(AuditEvent.seq)).all() == [2, 1]
        assert verify_log(s).ok
