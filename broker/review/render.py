"""Turn plain data into the texts the broker mails: review requests, previews, releases, notices.

Pure functions over frozen dataclasses and the types of ``broker.mail.document``: no I/O
beyond reading the templates, no database. The wording lives in the Jinja2 templates under
the top-level ``templates/`` folder so it can be read and edited without touching code;
everything here only prepares values (sizes, dates, wrapped paragraphs) for them.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2

from broker.mail.compose import first_name, possessive, records_name
from broker.mail.document import Attachment, Document, Paragraph, ReleaseContent

WIDTH = 76
DEFAULT_CONSENT = "explicit approval by the guardian"

RefusalReason = Literal[
    "used", "expired", "superseded", "unknown_token", "not_guardian", "auth_failed",
    "not_decider",
]
Decision = Literal["released", "denied"]
NoticeKind = Literal[
    "fyi",
    "status",
    "review",
    "preview",
    "release",
    "help",
    "not_understood",
    "receipt",
    "forwarded",
    "quarantine",
    "decided_released",
    "decided_denied",
    "refused",
    "release_failed",
    "expired",
    # the scheduler (broker.schedule)
    "reminder",
    "consent_renewal",
    "consent_expired",
    "majority_notice",
    "majority_reached",
]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Person:
    """A recipient or team member as shown to the parent."""

    name: str
    email: str
    role: str = ""  # "teacher", "school OT", "therapist (provider)"

    def label(self) -> str:
        """``Ms Park <park@school.example>, teacher``: name, address and role on one line."""
        who = f"{self.name} <{self.email}>" if self.name else self.email
        return f"{who}, {self.role}" if self.role else who


@dataclass(frozen=True)
class ReviewContext:
    """Everything a review request shows: the parent decides from this text alone."""

    record_id: int
    child_name: str
    document: Document
    recipients: tuple[Person, ...]  # the default recipients (routing)
    reasons: tuple[str, ...]  # why it was held: one line per matched rule
    received_at: datetime
    expires_at: datetime
    sender_role: str = ""  # e.g. "therapist (provider)"; shown after the sender
    guardian_name: str = ""  # for the greeting
    # Per recipient: the consent on file that covers them, or the parent-directed flag.
    coverage: tuple[str, ...] = ()
    # Whose approval a release needs (several guardians, the student).
    who_decides: tuple[str, ...] = ()
    # Patterns the rules point out: "phone number "555-0100": REDACT "555-0100"".
    suggestions: tuple[str, ...] = ()


@dataclass(frozen=True)
class PreviewContext:
    """What recipients would get after the parent's changes, for confirmation."""

    record_id: int
    child_name: str
    content: ReleaseContent
    recipients: tuple[Person, ...]
    expires_at: datetime
    also_approved: bool = False  # the reply held APPROVE together with changes
    guardian_name: str = ""


@dataclass(frozen=True)
class ReleaseContext:
    """The body every recipient of one release gets (identical for all of them)."""

    record_id: int
    child_name: str
    content: ReleaseContent
    released_by: str  # the guardian's name
    released_at: datetime
    consent: str = DEFAULT_CONSENT
    # Lines the jurisdiction requires on every release of the record's categories.
    notices: tuple[str, ...] = ()


# --------------------------------------------------------------------------- helpers


def templates_dir(override: Path | str | None = None) -> Path:
    """The top-level ``templates/`` folder of the repository, unless told otherwise."""
    if override is not None:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "templates"


def human_size(n: int) -> str:
    """``1536`` -> ``1.5 KB``: sizes as a parent reads them (binary units, one decimal below 10)."""
    if n < 0:
        raise ValueError("size must be >= 0")
    if n < 1024:
        return "1 byte" if n == 1 else f"{n} bytes"
    value = float(n)
    units = ("KB", "MB", "GB", "TB")
    for i, unit in enumerate(units):
        value /= 1024
        shown = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
        if float(shown) < 1024 or i == len(units) - 1:
            return f"{shown.removesuffix('.0')} {unit}"
    raise AssertionError("unreachable")


# Words separated by single spaces, nothing textwrap would treat specially (tabs, runs of
# white space, other white space characters): wrapped by _greedy_wrap, which gives
# textwrap's result (tests/test_render.py checks with hypothesis) at a fraction of its cost.
_PLAIN_LINE = re.compile(r"[^\s]+(?: [^\s]+)*")


def _greedy_wrap(words: list[str], width: int, lead: str, pad: str) -> list[str]:
    """textwrap.wrap(break_long_words=False, break_on_hyphens=False) for plain lines."""
    lines: list[str] = []
    current = lead
    filled = False  # a word is on the current line
    for word in words:
        if filled and len(current) + 1 + len(word) <= width:
            current += " " + word
        elif not filled:
            current += word
            filled = True
        else:
            lines.append(current)
            current = pad + word
    lines.append(current)
    return lines


@lru_cache(maxsize=1024)
def hang(text: str, marker: str = "", width: int = WIDTH) -> str:
    """Wrap ``text`` at ``width`` after ``marker``, later lines indented under the text.

    Words are never split, hyphenated or changed; existing line breaks inside the text are
    kept (each line is wrapped on its own), so an address block stays an address block.
    Cached: the same paragraphs are wrapped for every person a review request goes to, and
    textwrap was a third of the pipeline's time. The cache lives in this process's memory
    only, like the text being rendered.
    """
    pad = " " * len(marker)
    out: list[str] = []
    for i, line in enumerate(text.splitlines() or [""]):
        lead = marker if i == 0 else pad
        if not line.strip():
            out.append(lead.rstrip())
            continue
        if _PLAIN_LINE.fullmatch(line):
            out.extend(_greedy_wrap(line.split(" "), max(width, len(lead) + 1), lead, pad))
            continue
        out.extend(
            textwrap.wrap(
                line,
                width=max(width, len(lead) + 1),
                initial_indent=lead,
                subsequent_indent=pad,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(out)


def oneline(text: str) -> str:
    """Collapse line breaks: an outside subject or name must not forge extra lines in a notice."""
    return " ".join(str(text).split())


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_utc(dt: datetime) -> str:
    """``Tue 4 Mar 2025 14:05 UTC``: one unambiguous, locale-free form; naive means UTC."""
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return f"{_DAYS[dt.weekday()]} {dt.day} {_MONTHS[dt.month - 1]} {dt.year} {dt:%H:%M} UTC"


def notice_subject(
    kind: NoticeKind, *, child_name: str, subject: str = "", record_id: int | None = None
) -> str:
    """Subject line for each kind of mail, tagged so the parent can sort and thread them."""
    subject = " ".join(subject.split()) or "(no subject)"
    if kind == "release":
        return subject
    if kind == "receipt":
        return f"Received and held for review: {subject}"
    if kind == "forwarded":
        return f"Shared by the family: {subject}"
    tag = f"[{records_name(child_name)}" + (f" #{record_id}]" if record_id is not None else "]")
    titles: dict[str, str] = {
        "review": "Review needed",
        "preview": "Preview, please confirm",
        "help": "How to answer",
        "not_understood": "Not understood, nothing changed",
        "quarantine": "Quarantined mail",
        "decided_released": "Released",
        "decided_denied": "Denied",
        "refused": "Reply refused",
        "release_failed": "Delivery failed",
        "expired": "Expired, not shared",
        "reminder": "Reminder, review needed",
        "consent_renewal": "Consent ends soon",
        "consent_expired": "Consent ended",
        "majority_notice": "Coming of age",
        "majority_reached": "Of age",
        "fyi": "Shared under your consent",
        "status": "Update",
    }
    return f"{tag} {titles[kind]}: {subject}"


# An attachment with more text than this is summarised in the mail (the first lines of each
# page) and shown in full in an attached text file, so the review request stays readable.
LONG_PARAGRAPHS = 40
LONG_CHARS = 12_000
SUMMARY_CHARS = 160


def is_long(att: Attachment) -> bool:
    paragraphs = att.paragraphs or ()
    return len(paragraphs) > LONG_PARAGRAPHS or sum(len(p.text) for p in paragraphs) > LONG_CHARS


def page_groups(att: Attachment) -> list[tuple[int | None, list[Paragraph]]]:
    """The paragraphs grouped by page (one group with page None for files without pages)."""
    groups: list[tuple[int | None, list[Paragraph]]] = []
    for p in att.paragraphs or ():
        if not groups or groups[-1][0] != p.page:
            groups.append((p.page, []))
        groups[-1][1].append(p)
    return groups


def full_text_name(att: Attachment) -> str:
    return f"{att.label}-full-text.txt"


def full_text(att: Attachment) -> str:
    """The whole numbered text of a long attachment, for the file the review request
    carries (the same numbering the parent uses in REDACT)."""
    lines = [f"{att.label} {oneline(att.filename)}" + (f", {att.pages} pages" if att.pages
                                                        else ""), ""]
    for page, paragraphs in page_groups(att):
        if page is not None:
            lines += [f"--- {att.label} p.{page} ---", ""]
        for p in paragraphs:
            lines += [hang(p.text, f"[{p.id}] "), ""]
    return "\n".join(lines)


def summary_line(text: str) -> str:
    text = oneline(text)
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS].rstrip() + " ..."


@lru_cache(maxsize=8)
def _environment(folder: Path) -> jinja2.Environment:
    """One cached Jinja2 environment per templates folder: plain text, strict, no escaping."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=False,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["hang"] = hang
    env.filters["human_size"] = human_size
    env.globals["is_long"] = is_long
    env.globals["page_groups"] = page_groups
    env.globals["full_text_name"] = full_text_name
    env.filters["summary_line"] = summary_line
    env.filters["utc"] = format_utc
    env.filters["oneline"] = oneline
    env.filters["chomp"] = lambda text: str(text).rstrip("\n")
    return env


def _render(name: str, templates: Path | str | None, **values: Any) -> str:
    """Render one template with the names every template may use."""
    env = _environment(templates_dir(templates).resolve())
    child_name = values.get("child_name", "")
    values.setdefault("child", first_name(child_name))
    values.setdefault("childs", possessive(first_name(child_name)))
    values.setdefault("records", records_name(child_name))
    values.setdefault("width", WIDTH)
    return env.get_template(name).render(**values)


# --------------------------------------------------------------------------- renderers


def render_review_request(ctx: ReviewContext, *, templates: Path | str | None = None) -> str:
    """The review request: the whole record, numbered, with recipients, reasons and expiry."""
    return _render(
        "review_request.txt.j2",
        templates,
        ctx=ctx,
        doc=ctx.document,
        child_name=ctx.child_name,
        record_id=ctx.record_id,
    )


def render_preview(ctx: PreviewContext, *, templates: Path | str | None = None) -> str:
    """Exactly what recipients would get, numbered by original ids so the parent can go on."""
    return _render(
        "preview.txt.j2",
        templates,
        ctx=ctx,
        content=ctx.content,
        child_name=ctx.child_name,
        record_id=ctx.record_id,
    )


def render_release(ctx: ReleaseContext, *, templates: Path | str | None = None) -> str:
    """The released text: family's note, approved paragraphs, attached files, footer.

    Paragraphs are reproduced exactly (not re-wrapped), so what is sent is what was approved.
    """
    return _render(
        "release.txt.j2",
        templates,
        ctx=ctx,
        content=ctx.content,
        child_name=ctx.child_name,
        record_id=ctx.record_id,
    )


def render_help(
    *, child_name: str, record_id: int | None = None, templates: Path | str | None = None
) -> str:
    """The command help, sent back for HELP."""
    return _render("help.txt.j2", templates, child_name=child_name, record_id=record_id)


def render_not_understood(
    *,
    child_name: str,
    record_id: int,
    problems: tuple[str, ...],
    templates: Path | str | None = None,
) -> str:
    """Answer to a reply with no usable commands: what was wrong, that nothing changed, help."""
    return _render(
        "not_understood.txt.j2",
        templates,
        child_name=child_name,
        record_id=record_id,
        problems=problems,
    )


def render_forwarded(
    *,
    child_name: str,
    subject: str,
    received_at: datetime,
    templates: Path | str | None = None,
) -> str:
    """To the sender, where the operator wants it: shared, and nothing more (not to whom,
    not what was removed)."""
    return _render(
        "forwarded.txt.j2",
        templates,
        child_name=child_name,
        subject=subject,
        received_at=received_at,
    )


def render_receipt(
    *,
    child_name: str,
    subject: str,
    received_at: datetime,
    templates: Path | str | None = None,
) -> str:
    """To the sender: received and held. Never anything about the family's decision."""
    return _render(
        "receipt.txt.j2",
        templates,
        child_name=child_name,
        subject=subject,
        received_at=received_at,
    )


def render_quarantine_notice(
    *,
    child_name: str,
    quarantine_id: int,
    from_addr: str,
    subject: str,
    date: str,
    reason: str = "the sender is not on the team",
    templates: Path | str | None = None,
) -> str:
    """To guardians: mail was quarantined. Headers only, never the body of unknown mail."""
    return _render(
        "quarantine_notice.txt.j2",
        templates,
        child_name=child_name,
        quarantine_id=quarantine_id,
        from_addr=from_addr,
        subject=subject,
        date=date,
        reason=reason,
    )


def render_decided(
    *,
    child_name: str,
    record_id: int,
    subject: str,
    decision: Decision,
    decided_by: str,
    decided_at: datetime,
    recipients: tuple[Person, ...] = (),
    templates: Path | str | None = None,
) -> str:
    """Confirmation to every guardian that a record was released (to whom) or denied."""
    if decision not in ("released", "denied"):
        raise ValueError(f"unknown decision: {decision!r}")
    return _render(
        "decided.txt.j2",
        templates,
        child_name=child_name,
        record_id=record_id,
        subject=subject,
        decision=decision,
        decided_by=decided_by,
        decided_at=decided_at,
        recipients=recipients,
    )


def render_refused(
    *,
    child_name: str,
    record_id: int | None,
    reason: RefusalReason,
    from_addr: str,
    subject: str,
    received_at: datetime,
    detail: str = "",
    templates: Path | str | None = None,
) -> str:
    """To guardians: a reply was refused (stale token, stranger, failed authentication) and why."""
    known = ("used", "expired", "superseded", "unknown_token", "not_guardian", "auth_failed",
             "not_decider")
    if reason not in known:
        raise ValueError(f"unknown refusal reason: {reason!r}")
    return _render(
        "refused.txt.j2",
        templates,
        child_name=child_name,
        record_id=record_id,
        reason=reason,
        from_addr=from_addr,
        subject=subject,
        received_at=received_at,
        detail=detail,
    )


def render_release_failed(
    *,
    child_name: str,
    record_id: int,
    subject: str,
    recipient: Person,
    reason: str,
    failed_at: datetime,
    templates: Path | str | None = None,
) -> str:
    """To guardians: one copy could not be delivered, permanently, and the server's reason."""
    return _render(
        "release_failed.txt.j2",
        templates,
        child_name=child_name,
        record_id=record_id,
        subject=subject,
        recipient=recipient,
        reason=reason,
        failed_at=failed_at,
    )


def render_expired(
    *,
    child_name: str,
    record_id: int,
    subject: str,
    sender: str,
    expired_at: datetime,
    templates: Path | str | None = None,
) -> str:
    """To guardians: no decision in time, so the record was treated as denied."""
    return _render(
        "expired.txt.j2",
        templates,
        child_name=child_name,
        record_id=record_id,
        subject=subject,
        sender=sender,
        expired_at=expired_at,
    )


@dataclass(frozen=True)
class FyiContext:
    """The copy guardians get of a record released automatically under a consent."""

    record_id: int
    child_name: str
    content: ReleaseContent
    recipients: tuple[Person, ...]
    consent_id: int
    consent_purpose: str
    released_at: datetime
    guardian_name: str = ""


def render_fyi(ctx: FyiContext, *, templates: Path | str | None = None) -> str:
    """What went out automatically, to whom, under which consent, and how to stop it."""
    return _render("fyi.txt.j2", templates, ctx=ctx, content=ctx.content,
                   child_name=ctx.child_name, record_id=ctx.record_id)


def render_status(*, child_name: str, record_id: int | None, lines: tuple[str, ...],
                  templates: Path | str | None = None) -> str:
    """A short update about a record: an approval recorded, a consent revoked."""
    return _render("status.txt.j2", templates, child_name=child_name, record_id=record_id,
                   lines=lines)
