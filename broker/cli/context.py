"""What every command needs: the home, its settings, the database, the content store."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from broker import config
from broker.content.store import ContentStore
from broker.db.engine import Database


@dataclass
class Broker:
    settings: config.Settings
    db: Database
    content: ContentStore


def open_broker(home: str | None) -> Broker:
    try:
        settings = config.load(config.resolve_home(home))
    except config.ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    from broker.crypto.vault import VaultError
    from broker.runtime import open_vault

    try:
        vault = open_vault(settings)
    except VaultError as exc:
        raise click.ClickException(str(exc)) from exc
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
