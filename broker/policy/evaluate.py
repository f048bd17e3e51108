"""What the rules say about one new record, in one plain value. Pure.

`evaluate` runs classification, routing, patterns and the consent check over plain data and
returns an `Evaluation`: the categories with every matched rule and its reason, who the
record is suggested for (members carrying the routed tags, on the other side of the sender),
which consent on file covers each of them, the notices a release must carry, what is always
blacked out and what is only pointed out, and whether an automatic consent lets it go out at
once. The evaluation is stored (sealed) with the record and shown to the parent as "held
because: ..."; `broker rules explain RECORD` prints it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from broker.policy.classify import categories_of, classify, route, scan_patterns
from broker.policy.consent import ConsentTerms, Party, covering, names
from broker.policy.rules import Jurisdiction, Rules

SIDES = {"provider": "school", "school": "provider"}
PARENT_DIRECTED = ("no consent on file covers this; approving sends it as a parent-directed "
                   "disclosure")


@dataclass(frozen=True)
class Member:
    """A team member as the policy sees them."""

    person_id: int
    email: str
    name: str
    role: str  # provider | school
    tags: tuple[str, ...] = ()

    @property
    def party(self) -> Party:
        return Party(self.email, self.tags)


@dataclass(frozen=True)
class Coverage:
    email: str
    consent_id: int | None  # None: parent-directed
    label: str  # "consent #3 (purpose, valid until ...)" or PARENT_DIRECTED
    auto: bool = False


@dataclass(frozen=True)
class Evaluation:
    jurisdiction: str
    categories: tuple[str, ...]
    sensitive: tuple[str, ...]
    matches: tuple[dict[str, Any], ...]  # classify.Match as dicts
    routing: tuple[str, ...]  # reasons
    recipients: tuple[str, ...]  # suggested, by address, in team order
    coverage: tuple[Coverage, ...]
    notices: tuple[str, ...]
    always_redacted: dict[str, int] = field(default_factory=dict)  # pattern -> count
    redact_phrases: tuple[str, ...] = ()  # the texts matched by always-redact patterns
    suggestions: tuple[dict[str, Any], ...] = ()  # {name, why, text}
    auto_consent: int | None = None  # released at once under this automatic consent
    auto_reason: str = ""  # why it is, or why it is not, released automatically

    def reasons(self) -> list[str]:
        """'Held because' lines, in the order a parent reads them."""
        lines = [m["reason"] for m in self.matches]
        if not self.categories:
            lines.append("no category rule matched")
        lines.extend(self.routing)
        for name, n in self.always_redacted.items():
            lines.append(f"always removed before anyone gets it: {n} x {name.replace('_', ' ')}")
        lines.extend(f"release notice ({self.jurisdiction}): {n}" for n in self.notices)
        return lines

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evaluation:
        data = dict(data)
        data["coverage"] = tuple(Coverage(**c) for c in data.get("coverage", ()))
        for key in ("categories", "sensitive", "matches", "routing", "recipients", "notices",
                    "redact_phrases", "suggestions"):
            data[key] = tuple(data.get(key, ()))
        return cls(**data)


def jurisdiction_of(rules: Rules, child_jurisdiction: str | None) -> Jurisdiction | None:
    name = child_jurisdiction or rules.default_jurisdiction
    return rules.jurisdictions.get(name) if name else None


def no_standing_consent(jurisdiction: Jurisdiction | None) -> tuple[str, ...]:
    if jurisdiction is None:
        return ()
    return tuple(c for c, r in jurisdiction.categories.items() if not r.standing_consent)


def release_notices(jurisdiction: Jurisdiction | None,
                    categories: Sequence[str]) -> tuple[str, ...]:
    if jurisdiction is None:
        return ()
    notices = [jurisdiction.rule(c).release_notice for c in categories]
    return tuple(dict.fromkeys(n for n in notices if n))


def coverage_for(
    consents: Sequence[ConsentTerms],
    *,
    sender: Party,
    recipients: Sequence[Member],
    categories: Sequence[str],
    jurisdiction: Jurisdiction | None,
    day: dt.date,
) -> tuple[Coverage, ...]:
    """For each recipient: the consent the disclosure would go out under, or parent-directed."""
    blocked = no_standing_consent(jurisdiction)
    out = []
    for m in recipients:
        c = covering(consents, sender=sender, recipient=m.party, categories=categories,
                     day=day, no_standing_consent=blocked)
        out.append(Coverage(m.email, c.id, c.label(), c.mode == "auto") if c
                   else Coverage(m.email, None, PARENT_DIRECTED))
    return tuple(out)


def suggested_recipients(
    sender: Member, members: Sequence[Member], routed_tags: Sequence[str], categorised: bool,
) -> tuple[list[Member], str | None]:
    """Members on the other side carrying a routed tag; with no category at all, everyone on
    the other side (the parent still chooses). Returns them and a reason when it falls back."""
    other = [m for m in members if m.role == SIDES.get(sender.role) and m.email != sender.email]
    if not categorised:
        return other, ("routing: no category, so every "
                       f"{SIDES.get(sender.role, 'team')} member is suggested")
    wanted = set(routed_tags)
    return [m for m in other if wanted & set(m.tags)], None


def evaluate(
    rules: Rules,
    *,
    jurisdiction: str | None,
    sender: Member,
    members: Sequence[Member],
    subject: str,
    paragraphs: Sequence[str],
    attachment_names: Sequence[str],
    consents: Sequence[ConsentTerms],
    day: dt.date,
    guardians_only: bool = True,
) -> Evaluation:
    """``guardians_only``: the guardians alone decide (no student co-consent or majority);
    automatic release is only ever considered then."""
    j = jurisdiction_of(rules, jurisdiction)
    matches = classify(rules, sender_tags=sender.tags, subject=subject,
                       paragraphs_text=list(paragraphs), attachment_names=attachment_names)
    categories = categories_of(matches)
    sensitive = tuple(c for c in categories if rules.categories[c].sensitive)
    tags, routing = route(rules, matches)
    chosen, fallback = suggested_recipients(sender, members, tags, bool(categories))
    routing_lines = list(routing) + ([fallback] if fallback else [])
    if categories and tags and not chosen:
        routing_lines.append(f"routing: nobody on the team carries {', '.join(tags)}; the "
                             "parent chooses recipients with TO")
    cov = coverage_for(consents, sender=sender.party, recipients=chosen,
                       categories=categories, jurisdiction=j, day=day)

    text = "\n\n".join([subject, *paragraphs])
    always, suggestions = scan_patterns(rules, text)
    phrases: list[str] = []
    for spans in always.values():
        for start, end in spans:
            phrase = text[start:end]
            if phrase not in phrases:
                phrases.append(phrase)

    auto_id, auto_reason = _auto(cov, sensitive, guardians_only, chosen)
    if not auto_reason and sensitive and any(
            c.mode == "auto" and c.active_on(day) and names(sender.party, c.disclosers)
            for c in consents):
        # An automatic consent from this sender exists, but cannot cover this record.
        auto_reason = (f"not released automatically: {', '.join(sensitive)} is sensitive "
                       "and always waits for the parent")
    return Evaluation(
        jurisdiction=j.id if j else "",
        categories=tuple(categories),
        sensitive=sensitive,
        matches=tuple({"category": m.category, "kind": m.kind, "evidence": m.evidence,
                       "reason": m.reason} for m in matches),
        routing=tuple(routing_lines),
        recipients=tuple(m.email for m in chosen),
        coverage=cov,
        notices=release_notices(j, categories),
        always_redacted={name: len(spans) for name, spans in always.items()},
        redact_phrases=tuple(phrases),
        suggestions=tuple({"name": s.name, "why": s.why, "text": s.text}
                          for s in suggestions),
        auto_consent=auto_id,
        auto_reason=auto_reason,
    )


def _auto(cov: Sequence[Coverage], sensitive: Sequence[str], guardians_only: bool,
          chosen: Sequence[Member]) -> tuple[int | None, str]:
    autos = [c for c in cov if c.auto]
    if not autos:
        return None, ""
    if sensitive:
        return None, (f"not released automatically: {', '.join(sensitive)} is sensitive and "
                      "always waits for the parent")
    if not guardians_only:
        return None, "not released automatically: the student has a say in this record"
    if len(autos) < len(cov):
        uncovered = [c.email for c in cov if not c.auto]
        return None, ("not released automatically: no automatic consent covers "
                      + ", ".join(uncovered))
    ids = sorted({c.consent_id for c in autos if c.consent_id is not None})
    if len(ids) != 1 or not chosen:
        return None, "not released automatically: the recipients are under different consents"
    return ids[0], f"released at once under automatic consent #{ids[0]}"
