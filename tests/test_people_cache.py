"""A transaction reads a child's active people once (broker.policy.context.active_people):
taking a decision in asked for them five times. What it read must never outlive a change:
a person added, deactivated or edited in the same session is seen at once, and nothing
read is kept past the transaction (or savepoint) that read it. SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import event, select

from broker.db.engine import Database
from broker.db.models import Child, Person
from broker.policy.context import active_people
from broker.review.notify import guardians
from broker.team.apply import apply_team
from broker.team.spec import parse_team
from tests.harness import TEAM


def test_people_are_read_once_and_never_stale(db: Database) -> None:
    with db.session() as s:
        apply_team(s, parse_team(TEAM))
    statements: list[str] = []
    event.listen(db.engine, "before_cursor_execute",
                 lambda conn, cur, statement, *a: statements.append(statement))
    with db.session() as s:
        child = s.scalars(select(Child)).one()
        first = active_people(s, child)
        people_reads = sum("FROM people" in x for x in statements)
        assert [p.email for p in guardians(s, child)] == ["dana@home.example"]
        assert active_people(s, child) == first  # no second read
        assert sum("FROM people" in x for x in statements) == people_reads
        # A change in the same session is seen at once.
        s.add(Person(child_id=child.id, role="guardian", name="Alex Rivera",
                     email="alex@home.example"))
        s.flush()
        assert "alex@home.example" in [p.email for p in guardians(s, child)]
        first[0].active = False
        s.flush()
        assert first[0] not in active_people(s, child)
        # A savepoint that rolls back takes what it read with it.
        with s.begin_nested() as nested:
            s.add(Person(child_id=child.id, role="school", name="Temp", email="t@x.example"))
            s.flush()
            assert "t@x.example" in [p.email for p in active_people(s, child)]
            nested.rollback()
        assert "t@x.example" not in [p.email for p in active_people(s, child)]
    with db.session() as s:  # the next transaction reads again
        child = s.scalars(select(Child)).one()
        emails = [p.email for p in active_people(s, child)]
        assert "alex@home.example" in emails and "t@x.example" not in emails


def test_reads_skip_the_flush_only_when_nothing_they_read_is_pending(
        db: Database, db_url: str) -> None:
    """broker.db.reads: reading people or consents flushes first only when a person, a
    consent or a child is pending; a pending record (the intake's case) stays unflushed,
    and a pending person or consent is read all the same."""
    import datetime as dt

    from broker.consents.manage import active_for_child
    from broker.crypto.vault import Vault, new_key, register
    from broker.db.models import Consent, Record

    register(db_url, Vault.from_keys([new_key()]))  # records' subjects are sealed
    with db.session() as s:
        apply_team(s, parse_team(TEAM))
    with db.session() as s:
        child = s.scalars(select(Child)).one()
        record = Record(child_id=child.id, child=child, state="received", sender_email="x",
                        subject="", raw_ref="r", raw_sha256="h",
                        received_at=dt.datetime.now(dt.UTC))
        s.add(record)
        active_people(s, child)
        active_for_child(s, child.id, dt.date.today())
        assert record in s.new  # nothing it reads was pending: no flush
        s.info.clear()
        s.add(Person(child_id=child.id, role="school", name="New", email="new@x.example"))
        assert "new@x.example" in [p.email for p in active_people(s, child)]
        assert record not in s.new  # a person was pending: flushed, and read
        s.add(Consent(child_id=child.id, disclosers="[]", recipients="[]", categories="[]",
                      purpose="test", valid_from=dt.date.today(),
                      valid_until=dt.date.today(), signed_by="[]"))
        assert [c.purpose for c in active_for_child(s, child.id, dt.date.today())] == ["test"]
