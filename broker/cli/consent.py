"""`broker consent ...`: the releases on file (DESIGN.md section 6).

A consent says who may disclose (providers, by address or tag:NAME), to whom (named team
members or tags, never everyone), what (rules categories), for what purpose, from when
until when, and who signed it. `add` checks it against the team and the rules and lists
every problem; `revoke` stops at once every copy still queued under it (what was already
delivered cannot be recalled, and it says how much); `renew` files the same terms for
another period. JSON output is a stable format: ISO dates, the same fields everywhere.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import click
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from broker import config
from broker.cli.audit import DateParam, console
from broker.cli.context import home_option
from broker.consents.manage import (
    ConsentError,
    add_consent,
    renew_consent,
    revoke_consent,
    signers_of,
    status_on,
    today,
)
from broker.content.store import ContentMissing
from broker.crypto.keys import KeyFileError
from broker.crypto.vault import SealError, VaultError
from broker.db.models import Child, Consent, Delivery
from broker.policy.consent import MODES
from broker.policy.rules import RulesError
from broker.runtime import Runtime

OPERATOR = "operator"
SHOWN_BY_DEFAULT = ("active", "not yet valid")


class Problems(click.ClickException):
    """One or more problems, each printed on its own `Error:` line; exit code 1."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems) or ["failed"]
        super().__init__("; ".join(self.problems))

    def show(self, file: IO[Any] | None = None) -> None:
        for problem in self.problems:
            click.echo(f"Error: {problem}", err=True)


def open_runtime(home: str | None) -> Runtime:
    try:
        return Runtime.open(config.load(config.resolve_home(home)))
    except (config.ConfigError, VaultError, KeyFileError) as exc:
        raise Problems([str(exc)]) from exc
    except RulesError as exc:
        raise Problems([f"the rules have {len(exc.errors)} mistake(s); "
                        "`broker rules check` lists them"]) from exc


def with_runtime(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --home, passes an opened Runtime, and turns every expected failure into a
    one-line error (exit 1) instead of a traceback."""

    @home_option
    @functools.wraps(fn)
    def wrapper(home: str | None, **kwargs: Any) -> Any:
        rt = open_runtime(home)
        try:
            return fn(rt, **kwargs)
        except ConsentError as exc:
            raise Problems(exc.problems) from exc
        except KeyFileError as exc:
            raise Problems([str(exc)]) from exc
        except (ContentMissing, SealError) as exc:
            raise Problems([f"the signed form cannot be read from the content store: "
                            f"{type(exc).__name__} {exc}"]) from exc
        except SQLAlchemyError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise Problems([f"database error ({type(exc).__name__}): {first}"]) from exc
        finally:
            rt.close()

    return wrapper


# -- the JSON form ------------------------------------------------------------------------


def _iso(value: dt.date | dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _list(text: str) -> list[str]:
    value = json.loads(text or "[]")
    return [str(v) for v in value] if isinstance(value, list) else []


def consent_dict(row: Consent, child: str, renewed_by: int | None, on: dt.date) -> dict:
    """The JSON form of a consent: what `list`, `show`, `add` and `renew` print."""
    return {
        "id": row.id,
        "child": child,
        "disclosers": _list(row.disclosers),
        "recipients": _list(row.recipients),
        "categories": _list(row.categories),
        "purpose": row.purpose,
        "valid_from": _iso(row.valid_from),
        "valid_until": _iso(row.valid_until),
        "mode": row.mode,
        "status": status_on(row, on),
        "signed_by": signers_of(row),
        "form": row.form_ref is not None,
        "form_sha256": row.form_sha256,
        "created_at": _iso(row.created_at),
        "created_by": row.created_by,
        "revoked_at": _iso(row.revoked_at),
        "revoked_by": row.revoked_by or None,
        "renews": row.renews_id,
        "renewed_by": renewed_by,
    }


def _renewals(s: Session, ids: Sequence[int]) -> dict[int, int]:
    """old consent id -> the (first) consent renewing it."""
    if not ids:
        return {}
    rows = s.execute(select(Consent.renews_id, func.min(Consent.id))
                     .where(Consent.renews_id.in_(list(ids))).group_by(Consent.renews_id))
    return {old: new for old, new in rows}


def _get(s: Session, consent_id: int) -> tuple[Consent, str]:
    row = s.execute(select(Consent, Child.slug).join(Child, Consent.child_id == Child.id)
                    .where(Consent.id == consent_id)).first()
    if row is None:
        raise Problems([f"no consent #{consent_id} (`broker consent list --all` lists them)"])
    return row[0], row[1]


def _dump(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _summary(d: dict) -> str:
    return (f"{', '.join(d['disclosers'])} -> {', '.join(d['recipients'])}: "
            f"{', '.join(d['categories'])} ({d['purpose']}); valid {d['valid_from']} to "
            f"{d['valid_until']}; mode {d['mode']}")


def _read_form(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise Problems([f"cannot read the form {path}: {exc.strerror or exc}"]) from exc


# -- commands -----------------------------------------------------------------------------


@click.group()
def consent() -> None:
    """Consents on file: who may share what with whom, until when, signed by whom."""


@consent.command("add")
@click.option("--child", "child", required=True, metavar="SLUG",
              help="The child the consent is about (team slug, e.g. sam).")
@click.option("--from", "disclosers", multiple=True, metavar="ADDR|tag:NAME",
              help="Who may disclose: a provider's address or tag:NAME (repeatable).")
@click.option("--to", "recipients", multiple=True, metavar="ADDR|tag:NAME",
              help="Who may receive: a team member's address or tag:NAME (repeatable); "
                   "never everyone.")
@click.option("--category", "categories", multiple=True, metavar="NAME",
              help="A rules category the consent covers (repeatable), e.g. ot_progress.")
@click.option("--purpose", default="", metavar="TEXT",
              help="What the disclosure is for, as written on the form.")
@click.option("--valid-from", "valid_from", type=DateParam(),
              help="First day covered (YYYY-MM-DD; default: today, UTC).")
@click.option("--until", "valid_until", type=DateParam(),
              help="Last day covered (YYYY-MM-DD; default: a year; required where the "
                   "jurisdiction demands an expiry date).")
@click.option("--signed-by", "signed_by", multiple=True, metavar="ADDR",
              help="Who signed: a guardian's address, and the student's where the rules "
                   "require it (repeatable).")
@click.option("--mode", type=click.Choice(MODES), default="review", show_default=True,
              help="review: records are still held for the guardians; auto: released at "
                   "once with an FYI copy to them (never for sensitive categories).")
@click.option("--form", "form_path", type=click.Path(dir_okay=False), metavar="FILE.pdf",
              help="The signed form (PDF); stored encrypted with the consent.")
@click.option("--json", "as_json", is_flag=True, help="Print the consent as a JSON object.")
@with_runtime
def add(rt: Runtime, child: str, disclosers: tuple[str, ...], recipients: tuple[str, ...],
        categories: tuple[str, ...], purpose: str, valid_from: dt.date | None,
        valid_until: dt.date | None, signed_by: tuple[str, ...], mode: str,
        form_path: str | None, as_json: bool) -> None:
    """File a consent for a child; every problem with it is listed."""
    form = _read_form(form_path)
    with rt.db.session() as s:
        row = add_consent(s, rt, child_slug=child, disclosers=disclosers,
                          recipients=recipients, categories=categories, purpose=purpose,
                          valid_from=valid_from, valid_until=valid_until,
                          signed_by=signed_by, mode=mode, form=form, actor=OPERATOR)
        info = consent_dict(row, child, None, today())
    if as_json:
        _dump(info)
        return
    click.echo(f"consent #{info['id']} filed for {child}: {_summary(info)}")
    click.echo(f"signed by {', '.join(info['signed_by'])}; "
               + (f"signed form stored (sha256 {info['form_sha256']})" if info["form"]
                  else "no signed form on file"))


@consent.command("list")
@click.option("--child", metavar="SLUG", help="Only this child's consents (team slug).")
@click.option("--all", "show_all", is_flag=True,
              help="Also revoked and expired consents (default: active and not yet valid).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@with_runtime
def list_cmd(rt: Runtime, child: str | None, show_all: bool, as_json: bool) -> None:
    """List consents on file, oldest first, with their status today."""
    on = today()
    with rt.db.read_session() as s:
        if child is not None and s.scalar(select(Child.id).where(Child.slug == child)) is None:
            known = ", ".join(s.scalars(select(Child.slug).order_by(Child.slug))) or "none yet"
            raise Problems([f"no child {child!r} (known: {known})"])
        query = select(Consent, Child.slug).join(Child, Consent.child_id == Child.id)
        if child is not None:
            query = query.where(Child.slug == child)
        rows = s.execute(query.order_by(Consent.id)).all()
        renewed = _renewals(s, [r.id for r, _ in rows])
        items = [consent_dict(r, slug, renewed.get(r.id), on) for r, slug in rows]
    if not show_all:
        items = [i for i in items if i["status"] in SHOWN_BY_DEFAULT]
    if as_json:
        _dump(items)
        return
    if not items:
        click.echo("no consents on file" if show_all
                   else "no consents in force (--all also shows revoked and expired ones)")
        return
    table = Table(title="Consents")
    for name in ("id", "child", "from", "to", "categories", "purpose", "valid from",
                 "valid until", "mode", "status", "form"):
        table.add_column(name, justify="right" if name == "id" else "left")
    for i in items:
        status = i["status"] + (f" (renewed by #{i['renewed_by']})" if i["renewed_by"] else "")
        cells = (str(i["id"]), i["child"], "\n".join(i["disclosers"]),
                 "\n".join(i["recipients"]), "\n".join(i["categories"]), i["purpose"],
                 i["valid_from"], i["valid_until"], i["mode"], status,
                 "yes" if i["form"] else "no")
        table.add_row(*(Text(c) for c in cells))  # Text: never read user data as markup
    console().print(table)


@consent.command("show")
@click.argument("consent_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--form-out", "form_out", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the stored signed form (PDF) to FILE (created with mode 0600).")
@with_runtime
def show(rt: Runtime, consent_id: int, as_json: bool, form_out: str | None) -> None:
    """One consent: its terms, signatures, form, status, what it renews and what renewed
    it, and the copies sent or stopped under it."""
    with rt.db.read_session() as s:
        row, slug = _get(s, consent_id)
        info = consent_dict(row, slug, _renewals(s, [row.id]).get(row.id), today())
        counts = dict(s.execute(select(Delivery.state, func.count(Delivery.id))
                                .where(Delivery.consent_id == row.id)
                                .group_by(Delivery.state)).all())
        info["deliveries"] = {k: int(counts.get(k, 0))
                              for k in ("queued", "sent", "failed", "cancelled")}
        form = None
        if form_out is not None:
            if row.form_ref is None:
                raise Problems([f"consent #{row.id} has no signed form on file"])
            form = rt.content.get(row.form_ref, s)
    if form is not None and form_out is not None:
        _write_private(Path(form_out), form)
        click.echo(f"signed form of consent #{info['id']} written to {form_out} "
                   f"({len(form)} bytes)", err=as_json)
    if as_json:
        _dump(info)
        return
    fields = Table(title=f"Consent #{info['id']}", show_header=False)
    fields.add_column("field", style="bold")
    fields.add_column("value")
    d = info["deliveries"]
    lines = [
        ("child", info["child"]),
        ("status", info["status"]),
        ("from", ", ".join(info["disclosers"])),
        ("to", ", ".join(info["recipients"])),
        ("categories", ", ".join(info["categories"])),
        ("purpose", info["purpose"]),
        ("valid from", info["valid_from"]),
        ("valid until", info["valid_until"]),
        ("mode", info["mode"]),
        ("signed by", ", ".join(info["signed_by"])),
        ("signed form", f"yes (sha256 {info['form_sha256']})" if info["form"] else "no"),
        ("filed", f"{info['created_at']} by {info['created_by']}"),
    ]
    if info["revoked_at"]:
        lines.append(("revoked", f"{info['revoked_at']} by {info['revoked_by']}"))
    lines.append(("renews", f"#{info['renews']}" if info["renews"] else "-"))
    lines.append(("renewed by", f"#{info['renewed_by']}" if info["renewed_by"] else "-"))
    lines.append(("copies under it", f"{d['sent']} sent, {d['queued']} queued, "
                  f"{d['cancelled']} cancelled, {d['failed']} failed"))
    for label, value in lines:
        fields.add_row(label, Text(str(value)))
    console().print(fields)


def _write_private(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except OSError as exc:
        raise Problems([f"cannot write {path}: {exc.strerror or exc}"]) from exc


@consent.command("revoke")
@click.argument("consent_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--reason", default="", metavar="TEXT",
              help="Why (kept in the audit log), e.g. 'withdrawn by phone, 3 March'.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as a JSON object.")
@with_runtime
def revoke(rt: Runtime, consent_id: int, reason: str, as_json: bool) -> None:
    """Revoke a consent now: every copy still queued under it is stopped; copies
    already delivered cannot be recalled (the count is printed and audited). A renewal
    of it is revoked too."""
    with rt.db.session() as s:
        row, slug = _get(s, consent_id)
        result = revoke_consent(s, rt, row, actor=OPERATOR, actor_role="operator",
                                reason=reason)
    if as_json:
        _dump({"consent": result.consent, "child": slug, "status": "revoked",
               "cancelled": result.cancelled, "already_delivered": result.delivered,
               "stopped_records": result.stopped, "also_revoked": result.also_revoked})
        return
    n = len(result.cancelled)
    click.echo(f"consent #{result.consent} ({slug}) revoked: {n} queued "
               f"cop{'y' if n == 1 else 'ies'} stopped; {result.delivered} already "
               f"delivered cop{'y' if result.delivered == 1 else 'ies'} cannot be recalled")
    for renewal in result.also_revoked:
        click.echo(f"consent #{renewal} (its renewal) revoked with it")
    for record_id in result.stopped:
        click.echo(f"record {record_id} stopped: none of its copies was sent")


@consent.command("renew")
@click.argument("consent_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--until", "valid_until", type=DateParam(),
              help="Last day the renewal covers (YYYY-MM-DD; default: a year; required "
                   "where the jurisdiction demands an expiry date).")
@click.option("--signed-by", "signed_by", multiple=True, metavar="ADDR",
              help="Who signed the renewal (repeatable; default: the same signers).")
@click.option("--form", "form_path", type=click.Path(dir_okay=False), metavar="FILE.pdf",
              help="The newly signed form (PDF), stored encrypted with the renewal.")
@click.option("--json", "as_json", is_flag=True, help="Print the new consent as JSON.")
@with_runtime
def renew(rt: Runtime, consent_id: int, valid_until: dt.date | None,
          signed_by: tuple[str, ...], form_path: str | None, as_json: bool) -> None:
    """File the same terms for another period, from the day after ID ends (or today);
    ID itself runs out as it would have."""
    form = _read_form(form_path)
    with rt.db.session() as s:
        row, slug = _get(s, consent_id)
        new = renew_consent(s, rt, row, valid_until=valid_until, actor=OPERATOR,
                            signed_by=signed_by or None, form=form)
        info = consent_dict(new, slug, None, today())
    if as_json:
        _dump(info)
        return
    click.echo(f"consent #{info['id']} renews #{consent_id} for {slug}: "
               f"valid {info['valid_from']} to {info['valid_until']} ({info['status']})")
