"""`broker init` and `broker migrate`: create a home, bring its database up to date."""

from __future__ import annotations

import os
from pathlib import Path

import click

from broker import config
from broker.db.migrate import upgrade


@click.command()
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False), required=True,
              help="Directory to create the broker's home in (or set BROKER_HOME).")
@click.option("--domain", required=True, help="The mail domain the broker owns.")
@click.option("--listen", default="127.0.0.1:2525", show_default=True,
              help="HOST:PORT for the SMTP intake.")
@click.option("--relay", default="127.0.0.1:25", show_default=True,
              help="HOST:PORT of the SMTP relay for outbound mail.")
@click.option("--auth", "auth", type=click.Choice(config.AUTH_MODES), default="dkim",
              show_default=True, help="How guardians' replies are authenticated.")
def init(home: str, domain: str, listen: str, relay: str, auth: str) -> None:
    """Create a broker home: broker.toml, the database, spool and content folders."""
    path = Path(home).expanduser().resolve()
    cfg = path / config.CONFIG_NAME
    if cfg.exists():
        raise click.ClickException(f"{cfg} already exists; not overwriting it")
    try:
        text = config.render_config(domain=domain, listen=listen, relay=relay, auth=auth)
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    cfg.write_text(text, encoding="utf-8")
    cfg.chmod(0o600)
    settings = config.load(path)
    for folder in (settings.spool_dir, settings.content_dir):
        folder.mkdir(exist_ok=True, mode=0o700)
    upgrade(settings.database_url)
    from broker.crypto import vault as vaults

    content_key = vaults.key_path(path)
    if not os.environ.get(vaults.ENV_VAR) and not content_key.exists():
        vaults.create_keyring(path)  # encryption at rest: keys/content.key, mode 0600
    click.echo(f"  content key: {content_key if content_key.exists() else vaults.ENV_VAR}")
    from broker.crypto.keys import create_broker_key, key_paths

    if not key_paths(path)[0].exists():
        create_broker_key(path, settings.domain)
    click.echo(f"created {path}")
    click.echo(f"  settings: {cfg}")
    click.echo(f"  OpenPGP key: {key_paths(path)[0]} (`broker key export` prints the public key)")
    click.echo(f"  database: {_safe_url(settings.database_url)}")
    click.echo("next: describe a child's team in a file and run `broker apply team.toml`")


@click.command()
@click.option("--home", envvar="BROKER_HOME", type=click.Path(file_okay=False),
              help="The broker's home directory (or set BROKER_HOME).")
def migrate(home: str | None) -> None:
    """Bring the database schema up to date (safe to run again)."""
    try:
        settings = config.load(config.resolve_home(home))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    upgrade(settings.database_url)
    click.echo(f"database up to date: {_safe_url(settings.database_url)}")


def _safe_url(url: str) -> str:
    """The URL without a password, for printing."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
