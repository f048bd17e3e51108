"""What a message is, by the rules in rules/default.toml (broker.policy.rules). Pure.

`classify` says which categories a message falls in and why (one `Match` per sign found, each
with a reason a parent can read: "sender tag therapy -> category mental_health"); `route`
turns the categories into suggested recipient tags; `scan_patterns` finds what is always
redacted and what is only pointed out to the parent.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from broker.policy.rules import Rules


@dataclass(frozen=True)
class Match:
    category: str
    sensitive: bool
    sensitivity: str
    kind: str  # "sender_tag" | "subject" | "body" | "attachment"
    evidence: str  # the tag, the word as written in the rules, or the attachment name
    reason: str


@dataclass(frozen=True)
class Suggestion:
    name: str
    why: str
    start: int
    end: int
    text: str


def classify(
    rules: Rules,
    *,
    sender_tags: Iterable[str] = (),
    subject: str | None = "",
    paragraphs_text: str | Iterable[str] | None = "",
    attachment_names: Iterable[str | None] = (),
) -> list[Match]:
    """Every sign of every category, in the order the categories are written."""
    tags = {t.strip().lower() for t in sender_tags if isinstance(t, str)}
    subject = subject or ""
    if paragraphs_text is None:
        body = ""
    elif isinstance(paragraphs_text, str):
        body = paragraphs_text
    else:
        body = "\n\n".join(p for p in paragraphs_text if isinstance(p, str))
    names = [n for n in attachment_names if isinstance(n, str) and n]

    # A word's regex can only match where its first word-token occurs: look those up in
    # the message's set of tokens first (one pass) and run only the regexes that can match
    # (90 whole-word searches over a 10 KB report cost 24 ms; this, about 3).
    present = _tokens(subject) | _tokens(body)
    matches: list[Match] = []
    for category in rules.categories.values():

        def hit(kind: str, evidence: str, reason: str, category=category) -> None:
            matches.append(Match(category.name, category.sensitive, category.sensitivity,
                                 kind, evidence, reason))

        for tag in category.sender_tags:
            if tag in tags:
                hit("sender_tag", tag, f"sender tag {tag} -> category {category.name}")
        for word, regex in category.word_patterns:
            first = _first_token(word)
            if first and not first & present:
                continue
            if regex.search(subject):
                hit("subject", word, f"word '{word}' in the subject -> {category.name}")
            elif regex.search(body):
                hit("body", word, f"word '{word}' in the body -> {category.name}")
        for name in names:
            for glob, regex in category.attachment_patterns:
                if regex.match(name):
                    hit("attachment", name,
                        f"attachment '{name}' matches '{glob}' -> {category.name}")
                    break
    return matches


_WORD = re.compile(r"\w+")


def _tokens(text: str) -> set[str]:
    """The text's word tokens, lower-cased and case-folded (both, so no casing rule that
    re.IGNORECASE applies can make the pre-check miss a match)."""
    return set(_WORD.findall(text.lower())) | set(_WORD.findall(text.casefold()))


@functools.lru_cache(maxsize=4096)
def _first_token(word: str) -> frozenset[str]:
    """The first word-token of a rules word, in the forms `_tokens` produces."""
    found = _WORD.findall(word.lower())[:1] + _WORD.findall(word.casefold())[:1]
    # A word with no token at all (punctuation only): empty, always tried.
    return frozenset(found)


def categories_of(matches: Sequence[Match]) -> list[str]:
    """The matched categories, each once, in order."""
    return list(dict.fromkeys(m.category for m in matches))


def route(rules: Rules, matches: Sequence[Match]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The recipient tags the matched categories route to, and a reason per category."""
    tags: list[str] = []
    reasons: list[str] = []
    for category in categories_of(matches):
        routed = rules.routing.get(category)
        if routed is None:
            reasons.append(f"routing: {category} has no routing; the parent chooses recipients")
        elif not routed:
            reasons.append(f"routing: {category} -> nobody by default; the parent chooses "
                           "recipients")
        else:
            reasons.append(f"routing: {category} -> {', '.join(routed)}")
            tags.extend(routed)
    return tuple(dict.fromkeys(tags)), tuple(reasons)


def scan_patterns(
    rules: Rules, text: str | None
) -> tuple[dict[str, tuple[tuple[int, int], ...]], list[Suggestion]]:
    """Spans (start, end) of each always-redacted pattern by name, and the suggestions."""
    text = text or ""
    always: dict[str, tuple[tuple[int, int], ...]] = {}
    for pattern in rules.always_redact:
        spans = tuple(m.span() for m in pattern.compiled.finditer(text) if m.end() > m.start())
        if spans:
            always[pattern.name] = spans
    suggestions = [
        Suggestion(pattern.name, pattern.why, m.start(), m.end(), m.group(0))
        for pattern in rules.suggest
        for m in pattern.compiled.finditer(text)
        if m.end() > m.start()
    ]
    suggestions.sort(key=lambda s: (s.start, s.end, s.name))
    return always, suggestions
