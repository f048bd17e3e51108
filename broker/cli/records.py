"""`broker records`: what is held, quarantined or released, and why, for one child or all.

Record content is private (DESIGN.md promise 7), so `records show` prints only
metadata unless asked for the document with --content.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

import click
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit import queries
from broker.cli.audit import check_child, console, event_table, when
from broker.cli.context import Broker, home_option, with_broker
from broker.content.codec import document_from_bytes
from broker.content.store import ContentMissing
from broker.db.models import Child, Delivery, Record
from broker.mail.document import Document, Paragraph
from broker.records import states

STATES = tuple(states.ALLOWED)


def iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def hold_reasons(record: Record) -> list[Any]:
    """The JSON list column, tolerating a bad value: a listing must never crash on one row."""
    try:
        value = json.loads(record.hold_reasons or "[]")
    except ValueError:
        return [record.hold_reasons]
    return value if isinstance(value, list) else [value]


def record_dict(record: Record, child: str) -> dict[str, Any]:
    """The JSON form of a record; also what the tables are built from."""
    return {
        "id": record.id,
        "child": child,
        "state": record.state,
        "received_at": iso(record.received_at),
        "sender": record.sender_email,
        "subject": record.subject,
        "expires_at": iso(record.expires_at),
        "decided_at": iso(record.decided_at),
        "decided_by": record.decided_by,
        "version": record.version,
        "hold_reasons": hold_reasons(record),
        "quarantine_reason": record.quarantine_reason,
        "raw_sha256": record.raw_sha256,
        "has_document": record.doc_ref is not None,
    }


def delivery_dict(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "kind": d.kind,
        "recipient": d.recipient,
        "state": d.state,
        "attempts": d.attempts,
        "created_at": iso(d.created_at),
        "sent_at": iso(d.sent_at),
        "last_error": d.last_error,
    }


def _paras(items: Sequence[Paragraph] | None) -> list[dict[str, str]] | None:
    return None if items is None else [{"id": p.id, "text": p.text} for p in items]


def document_dict(doc: Document) -> dict[str, Any]:
    """The parsed document without attachment bytes: ids are what the parent types."""
    return {
        "subject": doc.subject,
        "sender": doc.sender,
        "sender_name": doc.sender_name,
        "date": doc.date,
        "paragraphs": _paras(doc.paragraphs),
        "attachments": [
            {
                "label": a.label,
                "filename": a.filename,
                "content_type": a.content_type,
                "size": a.size,
                "paragraphs": _paras(a.paragraphs),
                "note": a.note,
            }
            for a in doc.attachments
        ],
    }


def load_document(broker: Broker, record: Record) -> Document | None:
    """The parsed document, or None when there is none (e.g. quarantined before parsing)."""
    if record.doc_ref is None:
        return None
    try:
        return document_from_bytes(broker.content.get(record.doc_ref),
                                   get_blob=broker.content.get)
    except ContentMissing as exc:
        raise click.ClickException(
            f"record {record.id}: its document {record.doc_ref} is missing from the content store"
        ) from exc


def list_records(
    broker: Broker, *, child: str | None, state: tuple[str, ...], as_json: bool
) -> None:
    """The listing, oldest first."""
    with broker.db.read_session() as s:
        check_child(s, child)
        query = select(Record, Child.slug).join(Child, Record.child_id == Child.id)
        if child is not None:
            query = query.where(Child.slug == child)
        if state:
            query = query.where(Record.state.in_(state))
        rows = [record_dict(r, slug) for r, slug in s.execute(query.order_by(Record.id))]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        click.echo("no records match")
        return
    table = Table(title="Records")
    for name in ("id", "child", "state", "received", "sender", "subject", "expires"):
        table.add_column(name, justify="right" if name == "id" else "left")
    for r in rows:
        cells = (
            str(r["id"]),
            r["child"],
            r["state"],
            _day(r["received_at"]),
            r["sender"],
            r["subject"],
            # Only an open hold can still expire; a date on a finished record misleads.
            _day(r["expires_at"]) if r["state"] in states.OPEN else "",
        )
        table.add_row(*(Text(c) for c in cells))  # Text: never read user data as markup
    console().print(table)


def _day(value: str | None) -> str:
    return "" if value is None else when(dt.datetime.fromisoformat(value))


@click.group(invoke_without_command=True)
@home_option
@click.option("--child", help="Only this child (slug, e.g. sam).")
@click.option(
    "--state",
    "state",
    multiple=True,
    type=click.Choice(STATES, case_sensitive=False),
    help="Only records in this state (repeat for several).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def records(
    ctx: click.Context,
    home: str | None,
    child: str | None,
    state: tuple[str, ...],
    as_json: bool,
) -> None:
    """List records: held, awaiting review, released, quarantined..."""
    if ctx.invoked_subcommand is not None:
        if child or state or as_json:
            raise click.UsageError(
                f"--child, --state and --json before `{ctx.invoked_subcommand}` belong to "
                f"the listing; put options after the subcommand"
            )
        if home:
            # Let `broker records --home DIR show 3` mean `broker records show 3 --home DIR`.
            ctx.default_map = {**(ctx.default_map or {}), ctx.invoked_subcommand: {"home": home}}
        return
    states_wanted = tuple(dict.fromkeys(s.lower() for s in state))
    with_broker(list_records)(home=home, child=child, state=states_wanted, as_json=as_json)


def _get_record(s: Session, record_id: int) -> tuple[Record, str]:
    row = s.execute(
        select(Record, Child.slug)
        .join(Child, Record.child_id == Child.id)
        .where(Record.id == record_id)
    ).first()
    if row is None:
        raise click.ClickException(f"no record {record_id}")
    return row[0], row[1]


@records.command("show")
@click.argument("record_id", metavar="ID", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--content", is_flag=True, help="Also print the document's paragraphs (private content)."
)
@with_broker
def show(broker: Broker, record_id: int, as_json: bool, content: bool) -> None:
    """One record: its fields, why it was held, its deliveries and its audit trail."""
    with broker.db.session() as s:
        record, slug = _get_record(s, record_id)
        info = record_dict(record, slug)
        deliveries = [
            delivery_dict(d)
            for d in s.scalars(
                select(Delivery).where(Delivery.record_id == record_id).order_by(Delivery.id)
            )
        ]
        trail = queries.events(s, record_id=record_id)
    doc = load_document(broker, record) if content else None
    if as_json:
        out: dict[str, Any] = {
            "record": info,
            "deliveries": deliveries,
            "events": [e.as_dict() for e in trail],
        }
        if content:
            out["content"] = None if doc is None else document_dict(doc)
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    print_record(info, deliveries, trail, doc, content)


def print_record(
    info: dict[str, Any],
    deliveries: Sequence[dict[str, Any]],
    trail: Sequence[queries.EventRow],
    doc: Document | None,
    content: bool,
) -> None:
    """The human view of `records show`, section by section."""
    out = console()
    fields = Table(title=f"Record {info['id']}", show_header=False)
    fields.add_column("field", style="bold")
    fields.add_column("value")
    labels = {
        "child": "child",
        "state": "state",
        "sender": "sender",
        "subject": "subject",
        "received_at": "received",
        "expires_at": "expires",
        "decided_at": "decided",
        "decided_by": "decided by",
        "version": "draft version",
        "raw_sha256": "raw sha256",
    }
    for key, label in labels.items():
        value = info[key]
        if key.endswith("_at"):
            value = _day(value)
        fields.add_row(label, Text("" if value is None else str(value)))
    reasons = info["hold_reasons"]
    fields.add_row("hold reasons", Text("\n".join(f"- {r}" for r in reasons) or "(none)"))
    if info["quarantine_reason"]:
        fields.add_row("quarantine reason", Text(info["quarantine_reason"]))
    out.print(fields)

    if deliveries:
        table = Table(title="Deliveries")
        for name in ("kind", "recipient", "state", "attempts", "sent", "last error"):
            table.add_column(name)
        for d in deliveries:
            cells = (
                d["kind"],
                d["recipient"],
                d["state"],
                str(d["attempts"]),
                _day(d["sent_at"]),
                d["last_error"],
            )
            table.add_row(*(Text(c) for c in cells))
        out.print(table)
    else:
        out.print("no deliveries")

    if trail:
        out.print(event_table(trail))
    else:
        out.print("no audit events")

    if content:
        if doc is None:
            out.print("no parsed document for this record")
        else:
            print_document(doc)


def print_document(doc: Document) -> None:
    """Paragraphs with the ids the parent uses in REDACT and DROP."""
    out = console()
    out.rule("Content")
    out.print(Text(f"From: {doc.sender_name} <{doc.sender}>\nSubject: {doc.subject}\n"))
    for p in doc.paragraphs:
        out.print(Text(f"[{p.id}] {p.text}"))
    for a in doc.attachments:
        out.print(Text(f"\n{a.label} {a.filename} ({a.content_type}, {a.size} bytes) {a.note}"))
        if a.paragraphs is None:
            out.print("   (no text: can only be released whole or dropped)")
        for p in a.paragraphs or ():
            out.print(Text(f"[{p.id}] {p.text}"))
