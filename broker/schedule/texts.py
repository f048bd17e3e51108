"""The scheduler's texts: hold reminders, consent renewal and expiry notices, coming-of-age
notices. Pure, like `broker.review.render` (whose template environment they use); the
wording is in the templates/ folder.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from broker.review.render import _render

# How a hold reminder tells its reader to answer:
#   reply     the reader holds the live review request: reply to it or to the reminder
#   replaced  the request the reader got was replaced by a newer version sent to others
#   none      the reader was never sent a review request for the record
Answer = Literal["reply", "replaced", "none"]

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_day(day: dt.date) -> str:
    """``Tue 4 Mar 2025``: a calendar day in the form `render.format_utc` writes times."""
    return f"{_DAYS[day.weekday()]} {day.day} {_MONTHS[day.month - 1]} {day.year}"


@dataclass(frozen=True)
class ConsentView:
    """A consent as a notice shows it: people already written as a person reads them
    ("Dr. Lee <lee@clinic.example>", "everyone tagged ot")."""

    id: int
    purpose: str
    disclosers: tuple[str, ...]
    recipients: tuple[str, ...]
    categories: tuple[str, ...]
    valid_from: dt.date
    valid_until: dt.date
    mode: str = "review"  # review | auto


def render_reminder(
    *,
    child_name: str,
    record_id: int,
    subject: str,
    sender: str,
    received_at: dt.datetime,
    expires_at: dt.datetime,
    days: int,
    answer: Answer = "reply",
    person_name: str = "",
    templates: Path | str | None = None,
) -> str:
    """A held record is still waiting: which one, since when, until when, how to answer."""
    if answer not in ("reply", "replaced", "none"):
        raise ValueError(f"unknown answer: {answer!r}")
    return _render(
        "reminder.txt.j2", templates, child_name=child_name, record_id=record_id,
        subject=subject, sender=sender, received_at=received_at, expires_at=expires_at,
        days=days, answer=answer, person_name=person_name,
    )


def _consent_values(consent: ConsentView) -> dict[str, object]:
    return {
        "consent": consent,
        "valid_from": format_day(consent.valid_from),
        "valid_until": format_day(consent.valid_until),
    }


def render_consent_renewal(
    *,
    child_name: str,
    consent: ConsentView,
    person_name: str = "",
    templates: Path | str | None = None,
) -> str:
    """A consent's last day is near: what it allows, when it ends, how to renew or let it
    lapse."""
    return _render("consent_renewal.txt.j2", templates, child_name=child_name,
                   person_name=person_name, **_consent_values(consent))


def render_consent_expired(
    *,
    child_name: str,
    consent: ConsentView,
    person_name: str = "",
    templates: Path | str | None = None,
) -> str:
    """A consent ran out: nothing goes out under it any more; how to put it back on file."""
    return _render("consent_expired.txt.j2", templates, child_name=child_name,
                   person_name=person_name, **_consent_values(consent))


def _majority_values(majority_date: dt.date, majority_age: int, jurisdiction: str,
                     to_student: bool) -> dict[str, object]:
    return {
        "majority_day": format_day(majority_date),
        "majority_age": majority_age,
        "jurisdiction": jurisdiction,
        "to_student": to_student,
    }


def render_majority_notice(
    *,
    child_name: str,
    majority_date: dt.date,
    majority_age: int,
    jurisdiction: str,
    to_student: bool = False,
    person_name: str = "",
    slug: str = "",
    student_email: str = "",
    templates: Path | str | None = None,
) -> str:
    """The year before: from the majority birthday the student decides alone."""
    return _render("majority_notice.txt.j2", templates, child_name=child_name,
                   person_name=person_name, slug=slug, student_email=student_email,
                   **_majority_values(majority_date, majority_age, jurisdiction,
                                      to_student))


def render_majority_reached(
    *,
    child_name: str,
    majority_date: dt.date,
    majority_age: int,
    jurisdiction: str,
    to_student: bool = False,
    person_name: str = "",
    slug: str = "",
    student_email: str = "",
    templates: Path | str | None = None,
) -> str:
    """The day has come: the student decides alone; the guardians are ordinary members."""
    return _render("majority_reached.txt.j2", templates, child_name=child_name,
                   person_name=person_name, slug=slug, student_email=student_email,
                   **_majority_values(majority_date, majority_age, jurisdiction,
                                      to_student))
