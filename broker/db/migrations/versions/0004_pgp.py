"""people: OpenPGP key, revoked flag, require_encryption

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 00:10:00.000000

The team file may give guardians and members an OpenPGP public key (stored armored),
mark it revoked (pgpy does not evaluate revocations), and require that a member never
receives plaintext.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("people") as batch:
        batch.add_column(sa.Column("pgp_key", sa.Text(), nullable=True))
        batch.add_column(sa.Column("pgp_key_revoked", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("require_encryption", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("people") as batch:
        batch.drop_column("require_encryption")
        batch.drop_column("pgp_key_revoked")
        batch.drop_column("pgp_key")
