"""The `broker` command. Each command group lives in its own module."""

from __future__ import annotations

import click

from broker import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="broker")
def cli() -> None:
    """Disclosure broker: holds every record until a guardian decides by email reply."""


def _register() -> None:
    from broker.cli import audit, consent, demo, key, records, rules, serve, setup, team

    cli.add_command(setup.init)
    cli.add_command(setup.migrate)
    cli.add_command(team.apply_cmd)
    cli.add_command(team.team)
    cli.add_command(serve.serve)
    cli.add_command(demo.demo)
    cli.add_command(audit.audit)
    cli.add_command(records.records)
    cli.add_command(key.key)
    cli.add_command(rules.rules)
    cli.add_command(consent.consent)


_register()


if __name__ == "__main__":
    cli()
