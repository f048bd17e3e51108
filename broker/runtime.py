"""The broker's moving parts, opened once from a home: settings, database, content, spool.

Opening a home also opens its content keyring (broker.crypto.vault): the content store and
the spool seal with it, and it is registered for the home's database so sealed columns
(records.subject, deliveries.summary) seal and open through any session on that database.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.config import Settings
from broker.content.store import ContentStore
from broker.crypto import vault as vaults
from broker.db.engine import Database
from broker.intake.spool import Spool


def open_vault(settings: Settings) -> vaults.Vault:
    """The home's keyring, registered for its database. A fresh home (no content yet)
    without a key file gets one; see vault.load_vault."""
    vault = vaults.load_vault(settings.home, create_if_fresh=True)
    vaults.register(settings.database_url, vault)
    return vault


@dataclass
class Runtime:
    settings: Settings
    db: Database
    content: ContentStore
    spool: Spool
    vault: vaults.Vault

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        vault = open_vault(settings)
        db = Database(settings.database_url)
        return cls(
            settings=settings,
            db=db,
            content=ContentStore(settings.content_dir, vault, db),
            spool=Spool(settings.spool_dir, vault=vault),
            vault=vault,
        )

    def close(self) -> None:
        self.db.dispose()
