"""`broker rules ...`: the policy files (rules/, DESIGN.md section 6). No database needed."""

from __future__ import annotations

from pathlib import Path

import click

from broker.runtime import SHIPPED_RULES, rules_folder

__all__ = ["SHIPPED_RULES", "default_rules_dir", "explain", "rules"]


def default_rules_dir(home: str | None) -> Path:
    """`<home>/rules` when the home has one, else the shipped rules/."""
    return rules_folder(home)


@click.group()
def rules() -> None:
    """The policy files: categories, routing, holds, patterns, jurisdictions."""


@rules.command("check")
@click.option("--rules", "rules_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The rules folder (default: <home>/rules if present, else the shipped one).")
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
              help="The broker's home directory (or set BROKER_HOME).")
def check(rules_dir: Path | None, home: str | None) -> None:
    """Check the rules files; print each mistake as file:line: message."""
    from broker.policy.rules import check_rules, load_rules

    folder = rules_dir or default_rules_dir(home)
    errors = check_rules(folder)
    if errors:
        for error in errors:
            click.echo(error, err=True)
        click.echo(f"{len(errors)} error{'s' if len(errors) != 1 else ''} in {folder}", err=True)
        raise SystemExit(1)
    loaded = load_rules(folder)
    click.echo(f"{folder}: ok ({len(loaded.categories)} categories, "
               f"{len(loaded.jurisdictions)} jurisdictions: "
               f"{', '.join(sorted(loaded.jurisdictions)) or 'none'})")


@rules.command("explain")
@click.argument("record_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
              help="The broker's home directory (or set BROKER_HOME).")
def explain(record_id: int, as_json: bool, home: str | None) -> None:
    """Show what the rules found in RECORD_ID and what they mean today.

    The categories and each rule that matched (with its reason), the routing, the
    suggested recipients and the basis each would be released under today (a consent on
    file, or a parent-directed disclosure), who decides today, the notices a release carries,
    and what is always removed or only suggested. It prints words of the message (the
    matched words and suggestions): it is for the family and the operator."""
    import json

    from sqlalchemy import select

    from broker.cli.context import open_broker
    from broker.db.models import Person, Record
    from broker.policy.context import authority_for, evaluation_of
    from broker.policy.rules import RulesError, load_rules
    from broker.release.approve import release_check

    broker = open_broker(home)
    try:
        try:
            policy = load_rules(rules_folder(broker.settings.home))
        except RulesError as exc:
            raise click.ClickException(f"the rules have mistakes:\n{exc}") from exc
        with broker.db.read_session() as s:
            record = s.get(Record, record_id)
            if record is None:
                raise click.ClickException(f"no record {record_id}")
            ev = evaluation_of(record)
            if ev is None:
                raise click.ClickException(
                    f"record {record_id} was {record.state} before the rules were applied "
                    f"to it; its hold reasons: {'; '.join(json.loads(record.hold_reasons))}")
            people = {p.email: p for p in s.scalars(select(Person).where(
                Person.child_id == record.child_id))}
            suggested = [people[e] for e in ev.recipients if e in people]
            today = release_check(s, policy, record, suggested)
            authority = authority_for(s, policy, record.child, ev.categories)
            data = {
                "record": record.id, "child": record.child.slug, "state": record.state,
                "jurisdiction": ev.jurisdiction,
                "categories": list(ev.categories), "sensitive": list(ev.sensitive),
                "matched": [m["reason"] for m in ev.matches],
                "routing": list(ev.routing),
                "recipients": [{"email": e, "name": people[e].name if e in people else "",
                                "at_intake": next((c.label for c in ev.coverage
                                                   if c.email == e), ""),
                                "today": today[e].label if e in today else ""}
                               for e in ev.recipients],
                "automatic": {"consent": ev.auto_consent, "why": ev.auto_reason},
                "who_decides_today": {"deciders": [f"{d.name} <{d.email}> ({d.role})"
                                                   for d in authority.deciders],
                                      "reasons": list(authority.reasons),
                                      "blocked": authority.blocked},
                "notices": list(ev.notices),
                "always_removed": dict(ev.always_redacted),
                "suggested_removals": [f"{x['name']}: {x['text']}" for x in ev.suggestions],
            }
    finally:
        broker.db.dispose()
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    out = [f"record {data['record']} ({data['child']}, {data['state']}), jurisdiction "
           f"{data['jurisdiction'] or '?'}",
           "categories: " + (", ".join(data["categories"]) or "none"),
           "matched:"]
    out += [f"  - {line}" for line in data["matched"] or ["no category rule matched"]]
    out += ["routing:"] + [f"  - {line}" for line in data["routing"] or ["(none)"]]
    out += ["recipients (basis at intake / today):"]
    out += [f"  - {r['name']} <{r['email']}>: {r['at_intake']} / {r['today']}"
            for r in data["recipients"]] or ["  (nobody suggested: the parent chooses)"]
    if data["automatic"]["why"]:
        out.append(f"automatic: {data['automatic']['why']}")
    out += ["who decides today:"] + [f"  - {d}" for d in data["who_decides_today"]["deciders"]]
    out += [f"    ({r})" for r in data["who_decides_today"]["reasons"]]
    if data["who_decides_today"]["blocked"]:
        out.append(f"  BLOCKED: {data['who_decides_today']['blocked']}")
    out += [f"notice on release: {n}" for n in data["notices"]]
    out += [f"always removed: {n} x {k}" for k, n in data["always_removed"].items()]
    out += [f"suggested to the parent: {x}" for x in data["suggested_removals"]]
    click.echo("\n".join(out))
