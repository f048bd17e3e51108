"""deliveries indexes: by record (a record's copies, read when a copy is sent and when a
decision arrives) and by recipient and time (the daily cap on notices). Without them each
of those read the whole outbox history, which only grows

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 22:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_deliveries_record_kind", "deliveries", ["record_id", "kind"])
    op.create_index("ix_deliveries_recipient_created", "deliveries",
                    ["recipient", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_recipient_created", table_name="deliveries")
    op.drop_index("ix_deliveries_record_kind", table_name="deliveries")
