"""ssh sessions record the certificate the broker had signed: its serial and key id.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("cert_serial", sa.String(32), nullable=True))
        batch.add_column(sa.Column("cert_key_id", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("cert_key_id")
        batch.drop_column("cert_serial")
