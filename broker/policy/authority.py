"""Who decides a record, evaluated on the day of the decision (never at intake). Pure.

The guardians decide (one of them, or all with approval = "all"), until the student comes of
age under the child's jurisdiction: from then on the student decides alone, unless they have
delegated back to the guardians (`broker team delegate`). Between a category's
co_consent_age and majority the student must approve too, and with minor_veto their DENY
ends it. Every rule applied is given as a reason the parent can read.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from broker.policy.rules import Jurisdiction


@dataclass(frozen=True)
class Decider:
    person_id: int
    email: str
    name: str
    role: str  # guardian | student


@dataclass(frozen=True)
class Group:
    """Release needs `need` ("one" or "all") of `members` to APPROVE the same version."""

    label: str
    members: tuple[Decider, ...]
    need: str  # "one" | "all"
    veto: bool  # a DENY from a member ends the record


@dataclass(frozen=True)
class Authority:
    groups: tuple[Group, ...]
    reasons: tuple[str, ...]
    # Why nobody can release this at all (co-consent needed but no student address), or None.
    blocked: str | None = None

    @property
    def deciders(self) -> tuple[Decider, ...]:
        out: list[Decider] = []
        for g in self.groups:
            out.extend(m for m in g.members if m not in out)
        return tuple(out)

    def decider(self, email: str) -> Decider | None:
        return next((d for d in self.deciders if d.email == email.lower()), None)

    def can_veto(self, email: str) -> bool:
        return any(g.veto and any(m.email == email.lower() for m in g.members)
                   for g in self.groups)

    def waiting_for(self, approved: set[str]) -> list[Group]:
        """The groups not yet satisfied by these approvers' addresses."""
        out = []
        for g in self.groups:
            said = [m for m in g.members if m.email in approved]
            if (g.need == "one" and not said) or (g.need == "all" and len(said) < len(g.members)):
                out.append(g)
        return out

    def missing(self, approved: set[str]) -> list[Decider]:
        """Who could still approve to move the release forward."""
        out: list[Decider] = []
        for g in self.waiting_for(approved):
            out.extend(m for m in g.members if m.email not in approved and m not in out)
        return out


def age_on(birthdate: dt.date, day: dt.date) -> int:
    return day.year - birthdate.year - ((day.month, day.day) < (birthdate.month, birthdate.day))


def authority(
    *,
    guardians: Sequence[Decider],
    student: Decider | None,
    birthdate: dt.date | None,
    jurisdiction: Jurisdiction,
    categories: Sequence[str],
    approval: str,
    delegated: bool,
    day: dt.date,
) -> Authority:
    reasons: list[str] = []
    age = age_on(birthdate, day) if birthdate else None
    guardians_need = "all" if approval == "all" and len(guardians) > 1 else "one"
    guardian_group = Group("the guardians" if guardians_need == "all" else "a guardian",
                           tuple(guardians), guardians_need, veto=True)
    if guardians_need == "all":
        reasons.append("team file: approval = all -> every guardian must approve")

    if age is not None and age >= jurisdiction.majority_age:
        if delegated:
            reasons.append(f"the student is {age}, of age under {jurisdiction.name}, and has "
                           "delegated decisions to the guardians")
            return Authority((guardian_group,), tuple(reasons))
        if student is None:
            reasons.append(f"the student is {age}, of age under {jurisdiction.name}, but the "
                           "team file has no [student] address: the guardians still decide "
                           "until the operator adds it")
            return Authority((guardian_group,), tuple(reasons))
        reasons.append(f"the student is {age}: from {jurisdiction.majority_age} the student "
                       f"decides alone ({jurisdiction.name})")
        return Authority((Group("the student", (student,), "one", veto=True),), tuple(reasons))

    groups = [guardian_group]
    blocked = None
    if age is not None:
        for category in categories:
            rule = jurisdiction.rule(category)
            if rule.co_consent_age is None or age < rule.co_consent_age:
                continue
            why = (f"{category}: the child is {age}; from {rule.co_consent_age} "
                   f"{jurisdiction.name} requires the child's consent too")
            if rule.minor_veto:
                why += " and the child may refuse"
            reasons.append(why)
            if student is None:
                blocked = (f"{jurisdiction.name} requires the child's co-consent for "
                           f"{category}, but the team file has no [student] address")
                continue
            if not any(g.label == "the student" for g in groups):
                groups.append(Group("the student", (student,), "all", veto=rule.minor_veto))
            elif rule.minor_veto:
                groups = [Group(g.label, g.members, g.need, True) if g.label == "the student"
                          else g for g in groups]
    return Authority(tuple(groups), tuple(reasons), blocked)
