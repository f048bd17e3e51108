"""Reads that need no flush first.

A query makes the session write everything pending (autoflush) so it cannot miss a change
of this transaction. A query that reads only some tables can miss only a pending change to
those tables' objects: with none pending, the flush is work done early and one more round
of the unit of work (a new record paid for two of them, for reading its people and its
consents, while its own rows were still being written).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy.orm import Session


@contextlib.contextmanager
def reading(s: Session, *models: type) -> Iterator[None]:
    """Runs the block without autoflush when no object of ``models`` (the tables the block
    reads) is new, changed or deleted in ``s``; otherwise as usual."""
    pending = any(isinstance(o, models) for o in (*s.new, *s.dirty, *s.deleted))
    if pending:
        yield
        return
    with s.no_autoflush:
        yield
