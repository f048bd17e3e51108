"""The `broker` command. Each command group lives in its own module."""

from __future__ import annotations

import importlib

import click

from broker import __version__

# Command name -> (module, attribute). A module is imported only when its command runs:
# importing every command (the mail pipeline, PDF and PGP libraries) took over a second,
# and `broker audit --child sam` needs none of it.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("broker.cli.setup", "init"),
    "migrate": ("broker.cli.setup", "migrate"),
    "apply": ("broker.cli.team", "apply_cmd"),
    "team": ("broker.cli.team", "team"),
    "serve": ("broker.cli.serve", "serve"),
    "demo": ("broker.cli.demo", "demo"),
    "audit": ("broker.cli.audit", "audit"),
    "records": ("broker.cli.records", "records"),
    "key": ("broker.cli.key", "key"),
    "rules": ("broker.cli.rules", "rules"),
    "consent": ("broker.cli.consent", "consent"),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (`--help` imports them all)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module, attr = COMMANDS[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="broker")
def cli() -> None:
    """Disclosure broker: holds every record until a guardian decides by email reply."""


if __name__ == "__main__":
    cli()
