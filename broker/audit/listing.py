"""`broker audit`'s listing, read and written without click or SQLAlchemy.

The listing is what a parent runs most ("who has seen Sam's records?"), so a new process
must answer in well under 100 ms, and most of that is start-up: importing click alone
costs some 16 ms. This module holds everything the listing needs once its arguments are
known - the fast read (broker.audit.fastread), the table, JSON and CSV - so that both
`broker audit` (click) and the command's entry point (broker.cli.entry, which parses the
listing's plain arguments itself) print exactly the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported when a table is printed: --json and verify skip it
    from rich.console import Console
    from rich.table import Table

    from broker.audit import queries
    from broker.config import Settings
    from broker.crypto.vault import Vault

DISCLOSURE_FIELDS = (
    "seq", "at", "child", "record", "recipient", "recipient_name",
    "subject", "attachments", "sha256", "released_by",
)  # fmt: skip
EVENT_FIELDS = (
    "seq", "at", "child", "record", "actor", "actor_role", "action",
    "recipients", "description",
)  # fmt: skip
# The table shows the latest rows only, unless --limit says otherwise: a child with years
# of history has thousands of disclosures, and a table that long is slow to draw and
# unreadable. JSON and CSV are exports: everything, unless --limit is given.
TABLE_LIMIT = 50


def console() -> Console:
    """A console that does not wrap tables narrowly when output goes to a file or pipe."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 200))
    return out


def when(at: dt.datetime) -> str:
    """Times shown to people: UTC to the minute, labelled, so no one guesses the zone."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def short(desc: dict[str, Any], limit: int = 80) -> str:
    """One line out of an event description, for the --all table (empty values left out)."""
    parts = []
    for key, value in sorted(desc.items()):
        if value in (None, "", [], {}):
            continue
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True, ensure_ascii=False)
        parts.append(f"{key}={value}")
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    """CSV with a header row; lists are joined with '; ', dicts written as JSON."""
    import csv

    writer = csv.DictWriter(sys.stdout, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat: dict[str, Any] = {}
        for key in fields:
            value = row.get(key)
            if isinstance(value, list):
                value = "; ".join(str(v) for v in value)
            elif isinstance(value, dict):
                value = json.dumps(value, sort_keys=True, ensure_ascii=False)
            elif value is None:
                value = ""
            flat[key] = value
        writer.writerow(flat)


Columns = tuple[tuple[str, str], ...]  # (header, "left" | "right" | "nowrap": a time)
DISCLOSURE_COLUMNS: Columns = (
    ("date", "nowrap"), ("child", "left"), ("record", "right"), ("recipient", "left"),
    ("what was sent", "left"), ("released by", "left"),
)  # fmt: skip
EVENT_COLUMNS: Columns = (
    ("seq", "right"), ("time", "nowrap"), ("child", "left"), ("record", "right"),
    ("actor", "left"), ("action", "left"), ("recipients", "left"), ("description", "left"),
)  # fmt: skip


def disclosure_cells(items: Sequence[Any]) -> list[tuple[str, ...]]:
    """The cells of the disclosures table (queries.Disclosure or fastread.Disclosure)."""
    rows = []
    for d in items:
        who = f"{d.recipient_name} <{d.recipient}>" if d.recipient_name else d.recipient
        what = d.subject or "(no subject)"
        if d.attachments:
            what += "\n+ " + ", ".join(d.attachments)
        record = "" if d.record_id is None else str(d.record_id)
        rows.append((when(d.at), d.child, record, who, what, d.released_by))
    return rows


def event_cells(items: Sequence[Any]) -> list[tuple[str, ...]]:
    """The cells of the events table (queries.EventRow or fastread.EventRow)."""
    return [
        (
            str(e.seq),
            when(e.at),
            e.child,
            "" if e.record_id is None else str(e.record_id),
            f"{e.actor} ({e.actor_role})" if e.actor_role else e.actor,
            e.action,
            ", ".join(e.recipients),
            short(e.description),
        )
        for e in items
    ]


def rich_table(title: str, columns: Columns, rows: Sequence[tuple[str, ...]]) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for header, how in columns:
        if how == "nowrap":
            table.add_column(header, no_wrap=True)
        else:
            table.add_column(header, justify="right" if how == "right" else "left")
    for cells in rows:
        table.add_row(*(Text(c) for c in cells))  # Text: never read user data as markup
    return table


def disclosure_table(items: Sequence[queries.Disclosure]) -> Table:
    return rich_table("Disclosures", DISCLOSURE_COLUMNS, disclosure_cells(items))


def event_table(items: Sequence[queries.EventRow]) -> Table:
    return rich_table("Audit events", EVENT_COLUMNS, event_cells(items))


def _width(text: str) -> int:
    """Columns a line takes in a terminal: wide East Asian characters take two."""
    if text.isascii():
        return len(text)
    import unicodedata

    return sum(
        0 if unicodedata.combining(ch) else
        2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        for ch in text
    )


def _printable(text: str) -> list[str]:
    """A cell's lines, control characters (escape sequences in a subject) made visible."""
    lines = text.replace("\r\n", "\n").split("\n")
    return [
        line if line.isprintable() else "".join(
            ch if ch.isprintable() else " " if ch == "\t" else "\ufffd" for ch in line
        )
        for line in lines
    ]


def plain_table(title: str, columns: Columns, rows: Sequence[tuple[str, ...]]) -> str:
    """The table as plain text, for a file or a pipe (rich alone costs a new process more
    than the whole listing): the same columns, a header rule, multi-line cells kept."""
    cells = [[_printable(c) for c in row] for row in rows]
    widths = [
        max([_width(header), *(_width(line) for row in cells for line in row[i])])
        for i, (header, _) in enumerate(columns)
    ]

    def line(parts: Sequence[str]) -> str:
        out = []
        for part, width, (_, how) in zip(parts, widths, columns, strict=True):
            pad = " " * (width - _width(part))
            out.append(pad + part if how == "right" else part + pad)
        return "  ".join(out).rstrip()

    text = [title, line([h for h, _ in columns]), line(["-" * w for w in widths])]
    for row in cells:
        for n in range(max(len(lines) for lines in row)):
            text.append(line([lines[n] if n < len(lines) else "" for lines in row]))
    return "\n".join(text)


def print_table(show_all: bool, items: Sequence[Any]) -> None:
    """The listing as a table: rich on a terminal, plain text into a file or pipe."""
    if show_all:
        title, columns, rows = "Audit events", EVENT_COLUMNS, event_cells(items)
    else:
        title, columns, rows = "Disclosures", DISCLOSURE_COLUMNS, disclosure_cells(items)
    if _stdout_is_terminal():
        console().print(rich_table(title, columns, rows))
    else:
        echo(plain_table(title, columns, rows))


def listing_limit(limit: int | None, export: bool) -> int:
    """How many rows to list (0: all): --limit if given, else all for an export and the
    latest TABLE_LIMIT for the table."""
    if limit is None:
        return 0 if export else TABLE_LIMIT
    return limit


def print_listing(
    items: Sequence[Any], total: int | None, *, show_all: bool, as_json: bool, as_csv: bool
) -> None:
    """Disclosures or events as JSON, CSV or a table, and how many a limit left out."""
    export = as_json or as_csv
    fields = EVENT_FIELDS if show_all else DISCLOSURE_FIELDS
    if as_json:
        echo(json.dumps([i.as_dict() for i in items], indent=2, ensure_ascii=False))
    elif as_csv:
        write_csv([i.as_dict() for i in items], fields)
    elif not items:
        echo("no audit events match" if show_all else "no disclosures match")
    else:
        print_table(show_all, items)
    if total is not None and total > len(items):
        # After the table, or on stderr so an export stays valid JSON or CSV.
        noun = "events" if show_all else "disclosures"
        echo(
            f"showing the latest {len(items)} of {total:,} {noun}: --limit 0 shows all "
            f"(--json and --csv export all), --since/--until narrow the period",
            err=export,
        )


def echo(text: str, err: bool = False) -> None:
    """A line to stdout (or stderr), flushed, as click.echo writes a plain str."""
    out = sys.stderr if err else sys.stdout
    out.write(text + "\n")
    out.flush()


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


@dataclass(frozen=True)
class Listing:
    """What the listing's options ask for (the filters, the view, the format)."""

    child: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None
    record: int | None = None
    show_all: bool = False
    as_json: bool = False
    as_csv: bool = False
    limit: int | None = None


class UnknownChild(Exception):
    """--child names no child of this broker: `known` are the slugs there are."""

    def __init__(self, child: str, known: Sequence[str]) -> None:
        super().__init__(child)
        self.child = child
        self.known = tuple(known)


def read_fast(settings: Settings, vault: Vault, want: Listing) -> tuple[Sequence[Any], int | None]:
    """The rows and, when a limit cut them, how many match in all, read without
    SQLAlchemy. Raises fastread.Unavailable where this database cannot be read that way
    (nothing printed: the caller takes the SQLAlchemy path) and UnknownChild."""
    from broker.audit import fastread

    limit = listing_limit(want.limit, want.as_json or want.as_csv)
    filters = (want.child, want.since, want.until, want.record)
    total = None
    with fastread.open_reader(settings.database_url) as reader:
        if want.child is not None:
            known = fastread.child_slugs(reader)
            if want.child not in known:
                raise UnknownChild(want.child, known)
        if want.show_all:
            items: Sequence[Any] = fastread.events(reader, *filters, limit=limit or None)
        else:
            items = fastread.disclosures(reader, vault, *filters, limit=limit or None)
        if limit and len(items) == limit:
            total = fastread.count_matching(reader, *filters,
                                            disclosures_only=not want.show_all)
    return items, total
