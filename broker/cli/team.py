"""`broker apply team.toml` and `broker team show SLUG`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from broker.cli.context import Broker, with_broker
from broker.db.models import Child, Person
from broker.team.apply import apply_team
from broker.team.spec import TeamFileError, parse_team


@click.command("apply")
@click.argument("team_file", type=click.Path(exists=True, dir_okay=False))
@with_broker
def apply_cmd(broker: Broker, team_file: str) -> None:
    """Create or update one child's team from TEAM_FILE (idempotent, audited)."""
    path = Path(team_file)
    try:
        spec = parse_team(path.read_text(encoding="utf-8"), source=path.name,
                          base=path.resolve().parent)
    except TeamFileError as exc:
        raise click.ClickException(str(exc)) from exc
    with broker.db.session() as s:
        changes = apply_team(s, spec)
    if not changes:
        click.echo(f"{spec.slug}: no changes")
    for line in changes:
        click.echo(f"{spec.slug}: {line}")
    click.echo(f"list address: {spec.slug}@{broker.settings.domain}")


@click.group()
def team() -> None:
    """Look at children's teams."""


@team.command("show")
@click.argument("slug")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_broker
def show(broker: Broker, slug: str, as_json: bool) -> None:
    """Print SLUG's child, guardians and team members."""
    with broker.db.read_session() as s:
        child = s.scalar(select(Child).where(Child.slug == slug))
        if child is None:
            raise click.ClickException(f"no child {slug!r}; `broker apply` creates one")
        people = s.scalars(
            select(Person).where(Person.child_id == child.id).order_by(Person.id)
        ).all()
        data = {
            "child": {
                "slug": child.slug,
                "name": child.name,
                "birthdate": child.birthdate.isoformat() if child.birthdate else None,
                "jurisdiction": child.jurisdiction,
                "address": f"{child.slug}@{broker.settings.domain}",
                "approval": child.approval,
                "delegated": child.delegated,
            },
            "guardians": [
                {"name": p.name, "email": p.email, "active": p.active}
                for p in people if p.role == "guardian"
            ],
            "members": [
                {"name": p.name, "email": p.email, "role": p.role,
                 "tags": json.loads(p.tags), "active": p.active}
                for p in people if p.role != "guardian"
            ],
        }
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    console = Console()
    c = data["child"]
    console.print(f"[bold]{c['name']}[/bold] ({c['slug']}) - list address {c['address']}")
    if c["birthdate"] or c["jurisdiction"]:
        console.print(f"born {c['birthdate'] or '?'}, jurisdiction {c['jurisdiction'] or '?'}")
    console.print(f"approval: {c['approval']} (a release needs "
                  f"{'every guardian' if c['approval'] == 'all' else 'one guardian'})"
                  + ("; the student has delegated decisions to the guardians"
                     if c["delegated"] else ""))
    table = Table("role", "name", "email", "tags", "active")
    for g in data["guardians"]:
        table.add_row("guardian", g["name"], g["email"], "", "yes" if g["active"] else "no")
    for m in data["members"]:
        table.add_row(m["role"], m["name"], m["email"], ", ".join(m["tags"]),
                      "yes" if m["active"] else "no")
    console.print(table)


@team.command("delegate")
@click.argument("slug")
@click.option("--undo", is_flag=True,
              help="The student takes the decisions back (the default at the age of majority).")
@click.option("--requested-by", metavar="ADDRESS",
              help="The student's address, as it appears on their written request (audited).")
@with_broker
def delegate(broker: Broker, slug: str, undo: bool, requested_by: str | None) -> None:
    """Record that SLUG's student, of age, hands decisions back to the guardians.

    From the age of majority of the child's jurisdiction the student decides alone and the
    guardians become ordinary team members; run this on the student's written request to
    let the guardians decide again (--undo to take it back). Audited."""
    from broker.audit.log import record_event

    with broker.db.session() as s:
        child = s.scalar(select(Child).where(Child.slug == slug))
        if child is None:
            raise click.ClickException(f"no child {slug!r}; `broker apply` creates one")
        student = s.scalar(select(Person).where(Person.child_id == child.id,
                                                Person.role == "student",
                                                Person.active.is_(True)))
        if student is None:
            raise click.ClickException(f"{slug} has no [student] in the team file: add the "
                                       "student's address first (`broker apply`)")
        if requested_by and requested_by.strip().lower() != student.email:
            raise click.ClickException(f"{requested_by} is not the student's address "
                                       f"({student.email})")
        want = not undo
        if child.delegated == want:
            click.echo(f"{slug}: no change (decisions are already with the "
                       f"{'guardians' if want else 'student'})")
            return
        child.delegated = want
        record_event(s, action="decisions_delegated" if want else "delegation_withdrawn",
                     actor="operator", actor_role="operator", child=slug,
                     description={"student": student.email,
                                  "requested_by": (requested_by or "").lower() or None})
    click.echo(f"{slug}: decisions are now with the "
               f"{'guardians (delegated by the student)' if want else 'student'}")
