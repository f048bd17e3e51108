"""The schema: what the migrations build is what the models describe, and the outbox's
hot queries are answered from an index, not by reading its whole history.

The outbox (deliveries) keeps every copy ever sent. Before migration 0009 a notice's daily
cap and settling a record as each copy went out read all of it: with 200,000 past copies
the pipeline took 69-76 ms a record instead of 30-34 ms, and the outbox 80-90 ms an
approval instead of 11-24 ms (bench/latency.py --profile 200 --history 200000)."""

from __future__ import annotations

import datetime as dt

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Select, create_engine, func, select, text

from broker.db.models import Base, Delivery


def test_the_migrations_build_the_schema_the_models_describe(db_url: str) -> None:
    """An index (or column) added to the models without a migration, or the other way
    round, shows up here on both databases."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diffs == []


def _plan(db_url: str, query: Select) -> str:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
            if conn.dialect.name == "sqlite":
                rows = conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
                return "\n".join(str(r[-1]) for r in rows)
            # An empty table is read whole by PostgreSQL's planner whatever the indexes;
            # with sequential scans priced out, the plan shows which index can answer.
            conn.execute(text("SET enable_seqscan = off"))
            return "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {compiled}")))
    finally:
        engine.dispose()


def test_a_records_copies_are_found_by_index(db_url: str) -> None:
    """Settling a record (as each copy is sent) and reading a decision's copies."""
    plan = _plan(db_url, select(Delivery.state).where(Delivery.record_id == 7,
                                                      Delivery.kind == "release"))
    assert "ix_deliveries_record_kind" in plan, plan


def test_the_notices_to_an_address_today_are_found_by_index(db_url: str) -> None:
    """The daily cap on notices counts one address's copies of today."""
    day = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    todays = (select(Delivery.id).where(
        Delivery.recipient == "lee@clinic.example", Delivery.kind.in_(("notice", "receipt")),
        Delivery.created_at >= day).limit(50).subquery())
    plan = _plan(db_url, select(func.count()).select_from(todays))
    assert "ix_deliveries_recipient_created" in plan, plan
