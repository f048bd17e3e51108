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
