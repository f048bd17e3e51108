"""The broker's moving parts, opened once from a home: settings, database, content, spool.

Opening a home also opens its content keyring (broker.crypto.vault): the content store and
the spool seal with it, and it is registered for the home's database so sealed columns
(records.subject, deliveries.summary) seal and open through any session on that database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from broker.config import Settings
from broker.content.store import ContentStore
from broker.crypto import vault as vaults
from broker.db.engine import Database
from broker.intake.spool import Spool
from broker.policy.rules import Rules, load_rules

# The rules shipped with the broker: the repository's top-level rules/ folder.
SHIPPED_RULES = Path(__file__).resolve().parents[1] / "rules"


def rules_folder(home: Path | str | None) -> Path:
    """`<home>/rules` when the home has one (the operator's copy), else the shipped rules/."""
    value = home or os.environ.get("BROKER_HOME")
    if value and (Path(value) / "rules").is_dir():
        return Path(value) / "rules"
    return SHIPPED_RULES


def open_vault(settings: Settings) -> vaults.Vault:
    """The home's keyring, registered for its database (see vault.open_home_vault)."""
    return vaults.open_home_vault(settings.home, settings.database_url)


@dataclass
class Runtime:
    settings: Settings
    db: Database
    content: ContentStore
    spool: Spool
    vault: vaults.Vault
    # The policy (rules/): read once when the runtime opens; RulesError if it is wrong.
    rules: Rules

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        vault = open_vault(settings)
        db = Database(settings.database_url)
        return cls(
            settings=settings,
            db=db,
            content=ContentStore(settings.content_dir, vault, db),
            # Small mail from the SMTP intake goes through the journal (see Spool).
            spool=Spool(settings.spool_dir, vault=vault, journal=True),
            vault=vault,
            rules=load_rules(rules_folder(settings.home)),
        )

    def close(self) -> None:
        self.db.dispose()
