"""inbound.peer: the address that handed the message to the intake

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 23:55:00.000000

Authentication-Results headers are believed only on mail that came from a relay the
operator trusts; the connecting address decides that.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inbound") as batch:
        batch.add_column(sa.Column("peer", sa.String(length=64), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("inbound") as batch:
        batch.drop_column("peer")
