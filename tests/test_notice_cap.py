"""The daily cap on notices to one address (broker.review.notify.Notifier._over_cap) counts
the copies of its own transaction that are not yet flushed as well as the table: a batch of
records from one sender queues their receipts without a flush between them, and the cap must
hold all the same. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import func, select

from broker.content.store import ContentStore
from broker.crypto.vault import Vault, new_key, register
from broker.db.engine import Database
from broker.db.models import AuditEvent, Child, Delivery
from broker.review.notify import Notifier
from broker.team.apply import apply_team
from broker.team.spec import parse_team
from tests.harness import DOMAIN, TEAM

LEE = "lee@clinic.example"


def _queued(db: Database, address: str) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Delivery)
                        .where(Delivery.recipient == address)) or 0


def _capped(db: Database) -> list[list[str]]:
    with db.session() as s:
        return [json.loads(r) for r in s.scalars(
            select(AuditEvent.recipients).where(AuditEvent.action == "notice_capped"))]


def test_cap_holds_within_one_unflushed_transaction_and_after_it(
        db: Database, db_url: str, tmp_path: Path) -> None:
    vault = Vault.from_keys([new_key()])
    register(db_url, vault)
    with db.session() as s:
        apply_team(s, parse_team(TEAM))
    store = ContentStore(tmp_path / "content", vault, db)
    notifier = Notifier(store, DOMAIN, signer=None, per_day=2)
    with db.session() as s:
        child = s.scalars(select(Child)).one()
        # Four receipts to one sender in one transaction, no flush between them (the address
        # written in another case once: the cap is per address, not per spelling).
        for i, to in enumerate((LEE, LEE.upper(), LEE, LEE)):
            notifier.notice(s, child, to, "receipt", f"receipt {i}")
            if i < 2:  # nothing was flushed to count them: the copies are still pending
                assert sum(isinstance(o, Delivery) for o in s.new) == i + 1
        notifier.notice(s, child, "other@clinic.example", "receipt", "another sender")
    assert _queued(db, LEE) == 2
    assert _queued(db, "other@clinic.example") == 1
    assert _capped(db) == [[LEE]]  # said once, for the one address over its cap
    # The next transaction counts what the table holds: still capped, and not said again.
    with db.session() as s:
        child = s.scalars(select(Child)).one()
        notifier.notice(s, child, LEE, "receipt", "one more")
    assert _queued(db, LEE) == 2
    assert _capped(db) == [[LEE]]
