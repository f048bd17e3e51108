"""audit indexes for `broker audit` filters

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 23:20:00.000000

The audit log only grows; these let a parent's questions ("who got Sam's records in
March?") be answered from an index instead of a scan of the whole log.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES: dict[str, list[str]] = {
    "ix_audit_events_child_action_at": ["child", "action", "at"],
    "ix_audit_events_action_at": ["action", "at"],
    "ix_audit_events_child_at": ["child", "at"],
    "ix_audit_events_at": ["at"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "audit_events", columns, unique=False)


def downgrade() -> None:
    for name in reversed(INDEXES):
        op.drop_index(name, table_name="audit_events")
