"""policy: consents, approvals, sent reminders; children.approval and .delegated;
records.policy; tokens.purpose; deliveries.consent_id

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 01:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "consents",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("child_id", sa.Integer(), sa.ForeignKey("children.id"), nullable=False),
        sa.Column("disclosers", sa.Text(), nullable=False),
        sa.Column("recipients", sa.Text(), nullable=False),
        sa.Column("categories", sa.Text(), nullable=False),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("valid_from", sa.Date(), nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=False),
        sa.Column("signed_by", sa.Text(), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("form_ref", sa.String(length=128), nullable=True),
        sa.Column("form_sha256", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=320), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_by", sa.String(length=320), nullable=False),
        sa.Column("renews_id", sa.Integer(), sa.ForeignKey("consents.id"), nullable=True),
    )
    op.create_index("ix_consents_child_id", "consents", ["child_id"])
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("record_id", sa.Integer(), sa.ForeignKey("records.id"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("person_id", sa.Integer(), sa.ForeignKey("people.id"), nullable=False),
        sa.Column("decision", sa.String(length=8), nullable=False),
        sa.Column("auth", sa.String(length=80), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("record_id", "version", "person_id",
                            name="uq_approvals_record_version_person"),
    )
    op.create_index("ix_approvals_record_id", "approvals", ["record_id"])
    op.create_table(
        "sent_reminders",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(length=200), nullable=False, unique=True),
        sa.Column("at", sa.DateTime(), nullable=False),
    )
    with op.batch_alter_table("children") as batch:
        batch.add_column(sa.Column("approval", sa.String(length=8), nullable=False,
                                   server_default="any"))
        batch.add_column(sa.Column("delegated", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table("records") as batch:
        batch.add_column(sa.Column("policy", sa.Text(), nullable=False, server_default="{}"))
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("purpose", sa.String(length=8), nullable=False,
                                   server_default="review"))
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("consent_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_deliveries_consent_id", "consents", ["consent_id"], ["id"])
        batch.create_index("ix_deliveries_consent_id", ["consent_id"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_consent_id")
        batch.drop_constraint("fk_deliveries_consent_id", type_="foreignkey")
        batch.drop_column("consent_id")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("purpose")
    with op.batch_alter_table("records") as batch:
        batch.drop_column("policy")
    with op.batch_alter_table("children") as batch:
        batch.drop_column("delegated")
        batch.drop_column("approval")
    op.drop_table("sent_reminders")
    op.drop_index("ix_approvals_record_id", table_name="approvals")
    op.drop_table("approvals")
    op.drop_index("ix_consents_child_id", table_name="consents")
    op.drop_table("consents")
