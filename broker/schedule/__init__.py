"""The scheduler inside `broker serve`: hold reminders, hold expiry, consent renewal and
expiry notices, coming-of-age notices.

What is due is derived from the database on every run (`due.due`, pure), never from
timers in memory, so a restart loses nothing; what was sent is remembered in the
`sent_reminders` table under a unique key naming the occasion, written in the same
transaction as the notices, so nothing is sent twice, by one process or by several on one
PostgreSQL (`run.run_schedule`).
"""

from __future__ import annotations

from broker.schedule.due import (
    ChildInfo,
    ConsentInfo,
    Due,
    HeldRecord,
    due,
    majority_date,
)

__all__ = ["ChildInfo", "ConsentInfo", "Due", "HeldRecord", "due", "majority_date"]
