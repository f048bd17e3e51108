"""`broker serve`: run the daemon in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading

import click

from broker import config
from broker.service import ROLES, Service


@click.command()
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
              help="The broker's home directory (or set BROKER_HOME).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--role", "roles", multiple=True, type=click.Choice(ROLES),
              help="Run only these parts (repeatable); default: all of them.")
def serve(home: str | None, log_level: str, roles: tuple[str, ...]) -> None:
    """Run the SMTP intake, pipeline, outbox sender and expiry timer."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = config.load(config.resolve_home(home))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    service = Service(settings, roles=roles or ROLES)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        service.start()
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {settings.listen_host}:{settings.listen_port}: {exc}"
        ) from exc
    where = f" on {settings.listen_host}:{service.port}" if "intake" in service.roles else ""
    click.echo(f"broker serving {settings.domain}{where} ({', '.join(service.roles)})",
               err=True)
    stop.wait()
    click.echo("stopping", err=True)
    service.stop()
