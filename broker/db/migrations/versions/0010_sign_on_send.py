"""deliveries.sign_on_send: the outbox signs the copy (OpenPGP, the broker's key) just
before it first sends it, and keeps the signed bytes as the copy's content from then on,
so the pipeline's transaction no longer spends its time signing

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 11:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("sign_on_send", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("sign_on_send")
