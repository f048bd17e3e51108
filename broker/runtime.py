"""The broker's moving parts, opened once from a home: settings, database, content, spool."""

from __future__ import annotations

from dataclasses import dataclass

from broker.config import Settings
from broker.content.store import ContentStore
from broker.db.engine import Database
from broker.intake.spool import Spool


@dataclass
class Runtime:
    settings: Settings
    db: Database
    content: ContentStore
    spool: Spool

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        return cls(
            settings=settings,
            db=Database(settings.database_url),
            content=ContentStore(settings.content_dir),
            spool=Spool(settings.spool_dir),
        )

    def close(self) -> None:
        self.db.dispose()
