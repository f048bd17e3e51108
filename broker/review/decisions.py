"""Turn the parent's parsed commands into a decision about a held record.

Pure: (Document, Draft, commands, Team) -> Decision. Nothing here sends, stores or
releases; the shell acts on the returned value. Only ``Release`` may lead to sending, and
only a reply that is APPROVE and nothing else produces it: any edit yields a ``Preview``
the parent must confirm, any doubt yields ``Invalid`` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from broker.mail.document import Document, Draft
from broker.redact.text import normalize_phrase
from broker.review.commands import (
    Approve,
    Command,
    Deny,
    Drop,
    Help,
    Note,
    ParseResult,
    Redact,
    Revoke,
    To,
    join_words,
)

# --- the team -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeamMember:
    """A provider or school member who may receive records (guardians are not members)."""

    email: str
    name: str
    role: Literal["provider", "school"]
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Team:
    """The child's team, in a stable order so recipient lists are reproducible."""

    members: tuple[TeamMember, ...] = ()
    # The record's sender: never chosen by a tag (a provider tagged `ot` does not get its
    # own report back through TO tag:ot); naming the address still works.
    sender: str = ""

    def member(self, email: str) -> TeamMember | None:
        for m in self.members:
            if m.email.lower() == email.lower():
                return m
        return None

    def tags(self) -> set[str]:
        return {t.lower() for m in self.members for t in m.tags}


# --- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """Release ``draft`` now (APPROVE alone)."""

    draft: Draft


@dataclass(frozen=True)
class Refuse:
    """Never release (DENY)."""


@dataclass(frozen=True)
class Preview:
    """Show the parent the new draft and wait for a confirming APPROVE.

    ``also_approved``: the reply said APPROVE too; still not released, because the parent has
    not seen the result of the edits. The preview should ask them to confirm.
    """

    draft: Draft
    summary: tuple[str, ...]
    also_approved: bool = False


@dataclass(frozen=True)
class ShowHelp:
    """Send the command help (HELP alone)."""


@dataclass(frozen=True)
class Invalid:
    """Nothing changes; tell the parent why."""

    problems: tuple[str, ...]


Decision = Release | Refuse | Preview | ShowHelp | Invalid

_EDITS = (Redact, Drop, To, Note)


def decide(document: Document, draft: Draft, parsed: ParseResult, team: Team) -> Decision:
    """Decide from a parse result: any parse problem makes the whole reply Invalid."""
    if parsed.problems:
        return Invalid(parsed.problems)
    return apply_commands(document, draft, parsed.commands, team)


def apply_commands(
    document: Document,
    draft: Draft,
    commands: tuple[Command, ...],
    team: Team,
) -> Decision:
    """Apply one reply's commands to the current draft of ``document``.

    Conflicts are re-checked here so a caller that skipped the parser's checks still cannot
    get a release out of a contradictory reply.
    """
    if not commands:
        return Invalid(("I found no command in your reply.",))
    kinds = {type(c) for c in commands}
    if Revoke in kinds:
        return Invalid(("REVOKE only works as an answer to the copy of a record shared "
                        "automatically under a consent on file. To refuse this record, "
                        "reply DENY.",))
    if Deny in kinds:
        if len(kinds) > 1:
            return Invalid(("DENY cannot be combined with other commands.",))
        return Refuse()
    if Help in kinds:
        if len(kinds) > 1:
            return Invalid(("HELP cannot be combined with other commands.",))
        return ShowHelp()
    if kinds == {Approve}:
        return Release(draft)

    problems: list[str] = []
    new_draft = _merge_edits(document, draft, commands, team, problems)
    if problems or new_draft is None:
        return Invalid(tuple(problems))
    return Preview(
        draft=new_draft,
        summary=tuple(summarize_draft(document, new_draft, team)),
        also_approved=Approve in kinds,
    )


def _merge_edits(
    document: Document,
    draft: Draft,
    commands: tuple[Command, ...],
    team: Team,
    problems: list[str],
) -> Draft | None:
    """The old draft plus this reply's edits, validated against the document and team."""
    known_ids = {i.upper(): i for i in document.paragraph_ids()}
    ids = set(draft.redact_ids)
    pages = set(draft.redact_pages)
    phrases = list(draft.phrases)
    dropped = set(draft.dropped)
    notes: list[str] = []
    addresses: list[str] = []
    tags: list[str] = []
    saw_to = False

    for c in commands:
        if isinstance(c, Redact):
            for i in c.ids:
                if i.upper() in known_ids:
                    ids.add(known_ids[i.upper()])
                else:
                    problems.append(f"There is no paragraph {i} in this record.")
            for p in c.phrases:
                phrase = normalize_phrase(p)
                if not phrase:
                    problems.append("An empty phrase cannot be removed.")
                elif phrase.casefold() not in {x.casefold() for x in phrases}:
                    phrases.append(phrase)
            for ref in c.pages:
                label, _, number = ref.partition(" p.")
                att = document.attachment(label)
                if att is None:
                    problems.append(f"There is no attachment {label} in this record.")
                elif att.pages is None:
                    problems.append(f"Attachment {att.label} ({att.filename}) has no pages: "
                                    f"REDACT its paragraphs ({att.label}.1 ...) or DROP "
                                    f"{att.label}.")
                elif not 1 <= int(number) <= att.pages:
                    problems.append(f"Attachment {att.label} has {att.pages} page"
                                    f"{'s' if att.pages != 1 else ''}; there is no page "
                                    f"{number}.")
                else:
                    pages.add(f"{att.label} p.{int(number)}")
        elif isinstance(c, Drop):
            for label in c.labels:
                att = document.attachment(label)
                if att is None:
                    problems.append(f"There is no attachment {label} in this record.")
                else:
                    dropped.add(att.label)
        elif isinstance(c, To):
            saw_to = True
            addresses.extend(a.lower() for a in c.addresses)
            tags.extend(t.lower() for t in c.tags)
        elif isinstance(c, Note):
            if c.text.strip():
                notes.append(c.text.strip())
            else:
                problems.append("NOTE needs some text after it.")

    recipients = draft.recipients
    if saw_to:
        recipients = _resolve(addresses, tags, team, problems)
    if problems:
        return None
    return Draft(
        redact_ids=frozenset(ids),
        redact_pages=frozenset(pages),
        phrases=tuple(phrases),
        dropped=frozenset(dropped),
        recipients=recipients,
        # A new NOTE replaces the previous one, so a typo can be fixed by sending it again.
        note="\n".join(notes) if notes else draft.note,
    )


def _resolve(
    addresses: list[str], tags: list[str], team: Team, problems: list[str]
) -> tuple[str, ...] | None:
    """Team members named by TO, lower-cased, in team order; problems for anyone unknown."""
    wanted: set[str] = set()
    for address in addresses:
        member = team.member(address)
        if member is None:
            problems.append(f"{address} is not a member of the team, so nothing can go there.")
        else:
            wanted.add(member.email.lower())
    known_tags = team.tags()
    for tag in tags:
        if tag not in known_tags:
            problems.append(f"No team member has the tag {tag}.")
        else:
            wanted.update(m.email.lower() for m in team.members
                          if tag in _lower(m.tags) and m.email.lower() != team.sender.lower())
    if problems:
        return None
    resolved = _dedupe_in_order(m.email.lower() for m in team.members if m.email.lower() in wanted)
    if not resolved:
        problems.append("TO names nobody on the team.")
        return None
    return resolved


def _lower(items: tuple[str, ...]) -> set[str]:
    return {i.lower() for i in items}


def _dedupe_in_order(items: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return tuple(out)


# --- summaries ------------------------------------------------------------------------------


def _id_order(document: Document) -> dict[str, int]:
    order = [p.id for p in document.paragraphs]
    for a in document.attachments:
        order.extend(p.id for p in a.paragraphs or ())
    return {i.upper(): n for n, i in enumerate(order)}


def _page_key(ref: str) -> tuple[int, int]:
    label, _, number = ref.partition(" p.")
    return int(label[1:] or 0), int(number or 0)


def summarize_draft(document: Document, draft: Draft, team: Team) -> list[str]:
    """Everything the draft changes from the original, for the preview the parent confirms."""
    lines: list[str] = []
    order = _id_order(document)
    ids = sorted(draft.redact_ids, key=lambda i: order.get(i.upper(), len(order)))
    if ids:
        word = "paragraph" if len(ids) == 1 else "paragraphs"
        lines.append(f"Remove {word} {join_words(ids)}")
    lines.extend(f'Remove "{p}" everywhere it appears' for p in draft.phrases)
    for ref in sorted(draft.redact_pages, key=_page_key):
        label, _, number = ref.partition(" p.")
        lines.append(f"Remove page {number} of attachment {label} (blacked out)")
    dropped = {d.upper() for d in draft.dropped}
    for att in document.attachments:
        if att.label.upper() in dropped:
            lines.append(f"Leave out attachment {att.label} ({att.filename})")
    if draft.recipients is not None:
        names = []
        for email in draft.recipients:
            member = team.member(email)
            names.append(f"{member.name} <{email}>" if member and member.name else email)
        lines.append(f"Send only to {join_words(names)}")
    if draft.note:
        lines.append(f'Add your note: "{draft.note.replace(chr(10), " / ")}"')

    upper = {i.upper() for i in draft.redact_ids}
    body_left = any(p.id.upper() not in upper for p in document.paragraphs)
    atts_left = [
        a
        for a in document.attachments
        if a.label.upper() not in dropped
        and (a.paragraphs is None or any(p.id.upper() not in upper for p in a.paragraphs))
    ]
    if document.paragraphs and not body_left:
        if atts_left or draft.note:
            lines.append("Every paragraph of the message is removed; only the rest is sent")
        else:
            lines.append("Every paragraph is removed and nothing else is left to send")
    return lines
