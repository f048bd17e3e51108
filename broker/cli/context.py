"""What every command needs: the home, its settings, the database, the content store.

The database and content store (SQLAlchemy) are imported only when a command opens
them: `broker audit`'s listing reads the database without SQLAlchemy (audit.fastread)
and needs only the settings and the content key, which load_settings and load_vault give.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from broker import config

if TYPE_CHECKING:
    from broker.content.store import ContentStore
    from broker.crypto.vault import Vault
    from broker.db.engine import Database


@dataclass
class Broker:
    settings: config.Settings
    db: Database
    content: ContentStore


def load_settings(home: str | None) -> config.Settings:
    """The home's settings; a missing or wrong broker.toml is a clear error."""
    try:
        return config.load(config.resolve_home(home))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def load_vault(settings: config.Settings) -> Vault:
    """The home's content keyring (registered for its database); a keyring that cannot be
    read is a clear error. The vault module needs no SQLAlchemy: `broker audit` uses this
    before deciding whether it needs the database layer at all."""
    from broker.crypto import vault as vaults

    try:
        return vaults.open_home_vault(settings.home, settings.database_url)
    except vaults.VaultError as exc:
        raise click.ClickException(str(exc)) from exc


def open_broker(home: str | None) -> Broker:
    settings = load_settings(home)
    vault = load_vault(settings)
    from broker.content.store import ContentStore
    from broker.db.engine import Database

    db = Database(settings.database_url)
    return Broker(settings, db, ContentStore(settings.content_dir, vault, db))


home_option = click.option(
    "--home",
    envvar="BROKER_HOME",
    type=click.Path(file_okay=False),
    help="The broker's home directory (or set BROKER_HOME).",
)


def with_broker(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --home and passes an opened Broker as the first argument."""

    @home_option
    @functools.wraps(fn)
    def wrapper(home: str | None, **kwargs: Any) -> Any:
        broker = open_broker(home)
        try:
            return fn(broker, **kwargs)
        finally:
            broker.db.dispose()

    return wrapper
