"""Initial schema: sessions and audit_events.

Revision ID: 0001
Revises:
Create Date: 2025-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user", sa.String(255), nullable=False),
        sa.Column("user_name", sa.String(255), nullable=True),
        sa.Column("client_kind", sa.String(16), nullable=False),
        sa.Column("groups", sa.JSON(), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("level", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("ended_at", ts, nullable=True),
        sa.Column("end_reason", sa.String(64), nullable=True),
        sa.Column("lease_id", sa.String(255), nullable=False),
        sa.Column("lease_revoked", sa.Boolean(), nullable=False),
        sa.Column("last_heartbeat_at", ts, nullable=False),
        sa.Column("client_hostname", sa.String(255), nullable=True),
        sa.Column("client_version", sa.String(64), nullable=True),
        sa.Column("recording_sha256", sa.String(64), nullable=True),
        sa.Column("recording_size", sa.Integer(), nullable=True),
        sa.Column("recording_events", sa.Integer(), nullable=True),
    )
    op.create_index("ix_sessions_user", "sessions", ["user"])
    op.create_index("ix_sessions_target", "sessions", ["target"])
    op.create_index("ix_sessions_status", "sessions", ["status"])
    op.create_index("ix_sessions_started_at", "sessions", ["started_at"])
    op.create_index("ix_sessions_started_id", "sessions", ["started_at", "id"])
    op.create_index("ix_sessions_status_revoked", "sessions", ["status", "lease_revoked"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", ts, nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("session_id", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_actor", "audit_events", ["actor"])
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    op.create_index("ix_audit_events_session_id", "audit_events", ["session_id"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("sessions")
