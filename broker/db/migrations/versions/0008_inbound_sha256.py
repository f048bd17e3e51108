"""inbound.sha256 index: a message sent again with the very same bytes (a sending MTA
that never heard the 250 before a crash) is found and not made a second record

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 05:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_inbound_sha256", "inbound", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_inbound_sha256", table_name="inbound")
