"""Consents on file as plain values, and the question the release check asks of them:
does an active consent cover this sender, this recipient and these categories? Pure.

A consent names people by address and groups by tag ("tag:ot"); it never names
"everyone". It covers a record for one recipient when the sender is among its disclosers,
the recipient among its recipients, every category of the record among its categories,
and the day of the decision inside [valid_from, valid_until]. A record with no category is
covered by no consent (the parent decides it). Categories whose jurisdiction rule says
`standing_consent = false` (psychotherapy notes) are never covered.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MODES = ("review", "auto")
DEFAULT_DAYS = 365
TAG_PREFIX = "tag:"


@dataclass(frozen=True)
class ConsentTerms:
    id: int
    disclosers: tuple[str, ...]  # addresses and tag:x, lower case
    recipients: tuple[str, ...]
    categories: tuple[str, ...]
    purpose: str
    valid_from: dt.date
    valid_until: dt.date
    mode: str = "review"
    status: str = "active"  # active | revoked

    def active_on(self, day: dt.date) -> bool:
        return self.status == "active" and self.valid_from <= day <= self.valid_until

    def label(self) -> str:
        return f"consent #{self.id} ({self.purpose}, valid until {self.valid_until.isoformat()})"


@dataclass(frozen=True)
class Party:
    """A team member as the consent check sees them."""

    email: str
    tags: tuple[str, ...] = ()


def names(party: Party, entries: Iterable[str]) -> bool:
    """True if `entries` (addresses and tag:x) name this party."""
    tags = {t.lower() for t in party.tags}
    for entry in entries:
        e = entry.lower()
        if e.startswith(TAG_PREFIX):
            if e[len(TAG_PREFIX):] in tags:
                return True
        elif e == party.email.lower():
            return True
    return False


def covering(
    consents: Sequence[ConsentTerms],
    *,
    sender: Party,
    recipient: Party,
    categories: Sequence[str],
    day: dt.date,
    no_standing_consent: Iterable[str] = (),
) -> ConsentTerms | None:
    """The consent covering this disclosure (the lowest id among several), or None."""
    if not categories:
        return None
    if set(categories) & set(no_standing_consent):
        return None
    for c in sorted(consents, key=lambda c: c.id):
        if (c.active_on(day) and names(sender, c.disclosers) and names(recipient, c.recipients)
                and set(categories) <= set(c.categories)):
            return c
    return None


def validate(
    *,
    disclosers: Sequence[str],
    recipients: Sequence[str],
    categories: Sequence[str],
    purpose: str,
    valid_from: dt.date,
    valid_until: dt.date | None,
    mode: str,
    known_categories: Iterable[str],
    sensitive_categories: Iterable[str],
    no_standing_consent: Iterable[str] = (),
    requires_expiry: bool = False,
) -> list[str]:
    """Every problem with a consent about to be filed, in words for the operator."""
    problems: list[str] = []
    known = set(known_categories)
    if not disclosers:
        problems.append("name at least one discloser (--from ADDRESS or --from tag:NAME)")
    if not recipients:
        problems.append("name at least one recipient (--to ADDRESS or --to tag:NAME); "
                        "a consent never covers everyone")
    for entry in list(disclosers) + list(recipients):
        if entry.strip().lower() in ("*", "all", "everyone", "tag:*", "tag:all", "tag:everyone"):
            problems.append(f"{entry!r}: a consent never covers everyone; name people or tags")
    if not categories:
        problems.append("name at least one category (--category NAME)")
    for cat in categories:
        if cat not in known:
            problems.append(f"unknown category {cat!r} (known: {', '.join(sorted(known))})")
    blocked = sorted(set(categories) & set(no_standing_consent))
    if blocked:
        problems.append(f"{', '.join(blocked)}: never released under a standing consent in "
                        "this jurisdiction; each record needs the guardians' own approval")
    if not purpose.strip():
        problems.append("a purpose is required (--purpose TEXT)")
    if mode not in MODES:
        problems.append(f"mode must be review or auto, not {mode!r}")
    sensitive = sorted(set(categories) & set(sensitive_categories))
    if mode == "auto" and sensitive:
        problems.append(f"{', '.join(sensitive)} is sensitive: such records are always held "
                        "for the guardians (mode review)")
    if valid_until is None:
        if requires_expiry:
            problems.append("this jurisdiction requires a calendar expiry date (--until)")
    elif valid_until < valid_from:
        problems.append(f"valid until {valid_until} is before valid from {valid_from}")
    return problems


def default_until(valid_from: dt.date) -> dt.date:
    """A year by default: the day before the same date next year."""
    try:
        return valid_from.replace(year=valid_from.year + 1) - dt.timedelta(days=1)
    except ValueError:  # 29 February
        return valid_from.replace(year=valid_from.year + 1, day=28)
