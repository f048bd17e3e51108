"""`broker audit`: who received what and when, every event, and proof the log is intact.

This is how a parent answers "who has seen Sam's records?" (DESIGN.md promise 5), so
the default view is disclosures only; `--all` shows the whole trail. JSON and CSV are
for exporting, so their field names are a stable format.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from broker.audit import listing
from broker.audit.listing import (  # noqa: F401 - the listing's names, as they always were here
    DISCLOSURE_COLUMNS,
    DISCLOSURE_FIELDS,
    EVENT_COLUMNS,
    EVENT_FIELDS,
    TABLE_LIMIT,
    console,
    disclosure_table,
    event_table,
    listing_limit,
    plain_table,
    print_listing,
    print_table,
    short,
    when,
    write_csv,
)
from broker.cli.context import Broker, home_option, with_broker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


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
    """The listing without SQLAlchemy (broker.audit.listing), so a new process answers
    in tens of milliseconds. False, having printed nothing, when this database cannot be
    read that way: then `show` answers (or fails) exactly as it always has."""
    from broker.audit import fastread
    from broker.cli.context import load_settings, load_vault

    settings = load_settings(home)
    vault = load_vault(settings)
    want = listing.Listing(child=child, since=since, until=until, record=record,
                           show_all=show_all, as_json=as_json, as_csv=as_csv, limit=limit)
    try:
        items, total = listing.read_fast(settings, vault, want)
    except fastread.Unavailable:
        return False
    except listing.UnknownChild as exc:
        require_child(exc.child, exc.known)
        raise
    print_listing(items, total, show_all=show_all, as_json=as_json, as_csv=as_csv)
    return True


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
