"""content_blobs: small sealed content kept in the database

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 00:30:00.000000

Parsed documents, drafts and outbound copies are small; keeping them (sealed) in the
database writes them in the same transaction as the rows that point at them, and lets
several broker processes on one PostgreSQL read each other's content.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "content_blobs",
        sa.Column("ref", sa.String(length=64), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("ref"),
    )


def downgrade() -> None:
    op.drop_table("content_blobs")
