"""What the scheduler owes, from plain data and a clock. Pure: no database, no mail.

`due(...)` returns every occasion that has come, each named by a key that is the same on
every run (and in every process) for the same occasion. The caller sends what is not yet
in `sent_reminders` and records the key there, so the list may be computed as often as
wanted:

    hold:<record>:day<N>                   a held record, N days after it arrived
    consent-renewal:<consent>:<valid_until> an active consent, in its last 30 days
    consent-expired:<consent>:<valid_until> an active consent past its last day
    majority-notice:<child>:<year>          the year the student turns majority_notice_age
    majority:<child>:<date>                 the day the student comes of age (30 days' grace)

Hold reminders: only the latest reminder day already reached is due, so a broker that was
down across two reminder days sends one reminder, not two at once; never once the hold has
expired. Days are UTC days (`now` in UTC).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from broker.records import states

# A consent's renewal notice goes out this many days before its last day (inclusive).
RENEWAL_DAYS = 30
# A majority notice is still sent this many days after the birthday (a broker that was
# down that day); a student who came of age earlier than that is not told.
MAJORITY_GRACE_DAYS = 30

DueKind = Literal["hold", "consent-renewal", "consent-expired", "majority-notice", "majority"]


@dataclass(frozen=True)
class HeldRecord:
    id: int
    child_id: int
    state: str
    received_at: dt.datetime
    expires_at: dt.datetime | None


@dataclass(frozen=True)
class ConsentInfo:
    id: int
    child_id: int
    status: str  # active | revoked
    valid_until: dt.date  # the last day it covers
    renews_id: int | None = None  # the consent this one renews


@dataclass(frozen=True)
class ChildInfo:
    id: int
    birthdate: dt.date | None
    # From the child's jurisdiction (None: no birthdate rules apply).
    majority_age: int | None
    majority_notice_age: int | None = None


@dataclass(frozen=True)
class Due:
    key: str
    kind: DueKind
    child_id: int
    record_id: int | None = None
    consent_id: int | None = None
    day: int | None = None  # hold: the reminder day N
    # consent-*: its valid_until; majority*: the day the student comes of age
    date: dt.date | None = None
    # consent-expired: the active consent that renews it (no notice then, only the audit)
    renewed_by: int | None = None


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def majority_date(birthdate: dt.date, age: int) -> dt.date:
    """The first day on which `broker.policy.authority.age_on` gives `age`: the birthday
    `age` years on, and 1 March for a 29 February birthday in a common year."""
    year = birthdate.year + age
    try:
        return birthdate.replace(year=year)
    except ValueError:  # 29 February, and that year has none
        return dt.date(year, 3, 1)


def hold_reminders(records: Iterable[HeldRecord], reminder_days: Sequence[int],
                   now: dt.datetime) -> list[Due]:
    now = _utc(now)
    out = []
    for r in records:
        if r.state not in states.OPEN:
            continue
        if r.expires_at is not None and _utc(r.expires_at) <= now:
            continue  # expired (or about to be): the expiry notice says the rest
        received = _utc(r.received_at)
        reached = [n for n in reminder_days if received + dt.timedelta(days=n) <= now]
        if not reached:
            continue
        n = max(reached)
        out.append(Due(key=f"hold:{r.id}:day{n}", kind="hold", child_id=r.child_id,
                       record_id=r.id, day=n))
    return out


def consent_notices(consents: Sequence[ConsentInfo], today: dt.date) -> list[Due]:
    renewals: dict[int, int] = {}
    for c in sorted(consents, key=lambda c: c.id):
        if c.status == "active" and c.renews_id is not None:
            renewals.setdefault(c.renews_id, c.id)
    out = []
    for c in consents:
        if c.status != "active":
            continue
        until = c.valid_until.isoformat()
        renewed_by = renewals.get(c.id)
        if today > c.valid_until:
            out.append(Due(key=f"consent-expired:{c.id}:{until}", kind="consent-expired",
                           child_id=c.child_id, consent_id=c.id, date=c.valid_until,
                           renewed_by=renewed_by))
        elif (renewed_by is None
              and c.valid_until - dt.timedelta(days=RENEWAL_DAYS) <= today):
            out.append(Due(key=f"consent-renewal:{c.id}:{until}", kind="consent-renewal",
                           child_id=c.child_id, consent_id=c.id, date=c.valid_until))
    return out


def majority_notices(children: Iterable[ChildInfo], today: dt.date) -> list[Due]:
    out = []
    for c in children:
        if c.birthdate is None or c.majority_age is None:
            continue
        of_age = majority_date(c.birthdate, c.majority_age)
        if c.majority_notice_age is not None and c.majority_notice_age < c.majority_age:
            year = c.birthdate.year + c.majority_notice_age
            if dt.date(year, 1, 1) <= today < of_age:
                out.append(Due(key=f"majority-notice:{c.id}:{year}", kind="majority-notice",
                               child_id=c.id, date=of_age))
        if of_age <= today <= of_age + dt.timedelta(days=MAJORITY_GRACE_DAYS):
            out.append(Due(key=f"majority:{c.id}:{of_age.isoformat()}", kind="majority",
                           child_id=c.id, date=of_age))
    return out


def due(
    *,
    now: dt.datetime,
    records: Iterable[HeldRecord] = (),
    reminder_days: Sequence[int] = (),
    consents: Sequence[ConsentInfo] = (),
    children: Iterable[ChildInfo] = (),
) -> list[Due]:
    """Every occasion that has come by `now` (aware, or naive UTC): hold reminders by
    record, then consent notices by consent, then majority notices by child."""
    today = _utc(now).date()
    return [
        *sorted(hold_reminders(records, reminder_days, now), key=lambda d: d.record_id or 0),
        *sorted(consent_notices(consents, today), key=lambda d: d.consent_id or 0),
        *sorted(majority_notices(children, today), key=lambda d: (d.child_id, d.kind)),
    ]
