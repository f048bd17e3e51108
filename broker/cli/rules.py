"""`broker rules ...`: the policy files (rules/, DESIGN.md section 6). No database needed."""

from __future__ import annotations

from pathlib import Path

import click

from broker.runtime import SHIPPED_RULES, rules_folder

__all__ = ["SHIPPED_RULES", "default_rules_dir", "rules"]


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
