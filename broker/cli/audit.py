"""`broker audit`: who received what and when, every event, and proof the log is intact.

This is how a parent answers "who has seen Sam's records?" (DESIGN.md promise 5), so
the default view is disclosures only; `--all` shows the whole trail. JSON and CSV are
for exporting, so their field names are a stable format.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from broker.cli.context import Broker, home_option, with_broker

if TYPE_CHECKING:  # rich is imported when a table is printed: --json and verify skip it
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy.orm import Session

    from broker.audit import queries

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


class DateParam(click.ParamType):
    """A calendar day as YYYY-MM-DD, with an error that says what was expected."""

    name = "DATE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.date:
        if isinstance(value, dt.date):
            return value
        try:
            return dt.date.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a date; use YYYY-MM-DD, e.g. 2025-03-31", param, ctx)


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


def check_child(s: Session, child: str | None) -> None:
    """A mistyped child would otherwise look like "nobody received anything"."""
    if child is None:
        return
    from broker.audit import queries

    require_child(child, queries.child_slugs(s))


def require_child(child: str, known: Sequence[str]) -> None:
    """The error for a child not among the `known` slugs, naming them."""
    if child not in known:
        listing = ", ".join(known) or "none yet"
        raise click.BadParameter(f"no child {child!r} (known: {listing})", param_hint="--child")


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
        click.echo(plain_table(title, columns, rows))


def listing_limit(limit: int | None, export: bool) -> int:
    """How many rows to list (0: all): --limit if given, else all for an export and the
    latest TABLE_LIMIT for the table."""
    if limit is None:
        return 0 if export else TABLE_LIMIT
    return limit


def show(
    broker: Broker,
    *,
    child: str | None,
    since: dt.date | None,
    until: dt.date | None,
    record: int | None,
    show_all: bool,
    as_json: bool,
    as_csv: bool,
    limit: int | None = None,
) -> None:
    """The listing through SQLAlchemy (broker.audit.queries): what show_fast falls back to."""
    from broker.audit import queries

    limit = listing_limit(limit, as_json or as_csv)
    filters = (child, since, until, record)
    total = None
    with broker.db.read_session() as s:
        check_child(s, child)
        if show_all:
            items: Sequence[Any] = queries.events(s, *filters, limit=limit or None)
        else:
            items = queries.disclosures(s, *filters, limit=limit or None)
        if limit and len(items) == limit:
            total = queries.count_matching(s, *filters, disclosures_only=not show_all)
    print_listing(items, total, show_all=show_all, as_json=as_json, as_csv=as_csv)


def show_fast(
    home: str | None,
    *,
    child: str | None,
    since: dt.date | None,
    until: dt.date | None,
    record: int | None,
    show_all: bool,
    as_json: bool,
    as_csv: bool,
    limit: int | None = None,
) -> bool:
    """The listing without SQLAlchemy (broker.audit.fastread), so a new process answers
    in tens of milliseconds. False, having printed nothing, when this database cannot be
    read that way: then `show` answers (or fails) exactly as it always has."""
    from broker.audit import fastread
    from broker.cli.context import load_settings, load_vault

    settings = load_settings(home)
    vault = load_vault(settings)
    limit = listing_limit(limit, as_json or as_csv)
    filters = (child, since, until, record)
    total = None
    try:
        with fastread.open_reader(settings.database_url) as reader:
            if child is not None:
                require_child(child, fastread.child_slugs(reader))
            if show_all:
                items: Sequence[Any] = fastread.events(reader, *filters, limit=limit or None)
            else:
                items = fastread.disclosures(reader, vault, *filters, limit=limit or None)
            if limit and len(items) == limit:
                total = fastread.count_matching(reader, *filters, disclosures_only=not show_all)
    except fastread.Unavailable:
        return False
    print_listing(items, total, show_all=show_all, as_json=as_json, as_csv=as_csv)
    return True


def print_listing(
    items: Sequence[Any], total: int | None, *, show_all: bool, as_json: bool, as_csv: bool
) -> None:
    """Disclosures or events as JSON, CSV or a table, and how many a limit left out."""
    export = as_json or as_csv
    fields = EVENT_FIELDS if show_all else DISCLOSURE_FIELDS
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in items], indent=2, ensure_ascii=False))
    elif as_csv:
        write_csv([i.as_dict() for i in items], fields)
    elif not items:
        click.echo("no audit events match" if show_all else "no disclosures match")
    else:
        print_table(show_all, items)
    if total is not None and total > len(items):
        # After the table, or on stderr so an export stays valid JSON or CSV.
        noun = "events" if show_all else "disclosures"
        click.echo(
            f"showing the latest {len(items)} of {total:,} {noun}: --limit 0 shows all "
            f"(--json and --csv export all), --since/--until narrow the period",
            err=export,
        )


@click.group(invoke_without_command=True)
@home_option
@click.option("--child", help="Only this child (slug, e.g. sam).")
@click.option("--since", type=DateParam(), help="From this UTC day on (YYYY-MM-DD).")
@click.option("--until", type=DateParam(), help="Up to and including this UTC day.")
@click.option("--record", type=click.IntRange(min=1), help="Only this record id.")
@click.option("--all", "show_all", is_flag=True, help="Every event, not only disclosures.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV with a header row.")
@click.option(
    "--limit", type=click.IntRange(min=0),
    help=f"Only the latest N (0: all). Default: the table shows the latest {TABLE_LIMIT}; "
    "--json and --csv export all.",
)
@click.pass_context
def audit(
    ctx: click.Context,
    home: str | None,
    child: str | None,
    since: dt.date | None,
    until: dt.date | None,
    record: int | None,
    show_all: bool,
    as_json: bool,
    as_csv: bool,
    limit: int | None,
) -> None:
    """Who received what and when (use --all for every event).

    Dates are whole UTC days and both ends are included. The table shows the latest
    disclosures and says how many more there are.
    """
    listing = (
        child or since or until or record or show_all or as_json or as_csv
        or limit is not None
    )
    if ctx.invoked_subcommand is not None:
        if listing and ctx.invoked_subcommand == "report":
            raise click.UsageError(
                "give the report its own options, after `report`: "
                "broker audit report --child SLUG [--since DAY] [--until DAY] --format ..."
            )
        if listing:
            raise click.UsageError(
                f"filters and output options belong to `broker audit`, not to "
                f"`broker audit {ctx.invoked_subcommand}` (it always checks the whole log)"
            )
        if home:
            # Let `broker audit --home DIR verify` mean the same as `... verify --home DIR`.
            ctx.default_map = {**(ctx.default_map or {}), ctx.invoked_subcommand: {"home": home}}
        return
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    if since and until and since > until:
        raise click.BadParameter(
            f"--since {since} is after --until {until}", param_hint="--since/--until"
        )
    options: dict[str, Any] = {
        "child": child, "since": since, "until": until, "record": record,
        "show_all": show_all, "as_json": as_json, "as_csv": as_csv, "limit": limit,
    }
    if not show_fast(home, **options):
        with_broker(show)(home=home, **options)


@audit.command("verify")
@with_broker
def verify(broker: Broker) -> None:
    """Walk the whole hash chain; exit 1 and name the first bad event if it was altered."""
    from broker.audit.log import verify_log

    # A long log is hashed by one process per CPU (a million events: seconds, not tens).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with broker.db.read_session() as s:
        verdict = verify_log(s, workers=cpus or 1)
    if verdict.ok:
        click.echo(f"audit log OK: {verdict.checked} events")
        return
    # The verdict is the command's answer, so it goes to stdout like the OK line.
    click.echo(f"audit log BROKEN at seq {verdict.first_bad_seq}: {verdict.reason}")
    click.get_current_context().exit(1)


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _write_private(path: str, data: bytes) -> None:
    """The report quotes record content (subjects, file names): a new file is made 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


@audit.command("report")
@click.option("--child", required=True, help="The child (slug, e.g. sam).")
@click.option("--since", type=DateParam(), help="From this UTC day on (YYYY-MM-DD).")
@click.option("--until", type=DateParam(), help="Up to and including this UTC day.")
@click.option(
    "--format", "fmt", type=click.Choice(["html", "pdf", "csv"]), required=True,
    help="html and pdf: the formal document; csv: one row per released copy.",
)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, writable=True),
    help="Write to this file (default: stdout for html and csv; pdf needs a file or a pipe).",
)
@with_broker
def report(
    broker: Broker,
    child: str,
    since: dt.date | None,
    until: dt.date | None,
    fmt: str,
    output: str | None,
) -> None:
    """The accounting of disclosures: every copy released about one child, for a hearing
    officer, school or court.

    For each copy: when and to whom it went, who asked (the record's sender), what was
    sent (subject, document type, attachments and hashes), the purpose and basis (consent
    or the parent's explicit approval), who approved and how the reply was authenticated,
    what was redacted, the notice attached and whether it was sent, failed or cancelled.
    The header states whether the audit log's hash chain verifies. Dates are whole UTC
    days, both ends included. Exits 1, after writing the report, if the chain is broken.
    """
    from broker.audit import report_render
    from broker.audit.report import load_report

    if since and until and since > until:
        raise click.BadParameter(
            f"--since {since} is after --until {until}", param_hint="--since/--until"
        )
    if fmt == "pdf" and output is None and _stdout_is_terminal():
        raise click.UsageError(
            "a PDF is binary: give --output FILE (or pipe it: ... --format pdf > report.pdf)"
        )
    with broker.db.read_session() as s:
        check_child(s, child)
        doc = load_report(s, child, since, until)
    if fmt == "pdf":
        data = report_render.to_pdf(doc)
    elif fmt == "html":
        data = report_render.to_html(doc).encode("utf-8")
    else:
        data = report_render.to_csv(doc).encode("utf-8")
    if output is None:
        click.echo(data, nl=False)  # bytes: written as they are
    else:
        _write_private(output, data)
        click.echo(f"wrote {output}: {len(doc.disclosures)} disclosure(s), "
                   f"audit chain {doc.chain.status.lower()}", err=True)
    if not doc.chain.ok:
        click.echo(f"warning: audit log BROKEN at seq {doc.chain.first_bad_seq}: "
                   f"{doc.chain.reason} (the report says so)", err=True)
        click.get_current_context().exit(1)
