"""Audit events name the caller's groups, client kind and source address.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("actor_groups", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("client_kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("source", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("source")
        batch.drop_column("client_kind")
        batch.drop_column("actor_groups")
