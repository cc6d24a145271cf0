"""Just-in-time access: access_requests, request_reviews, sessions.grant_id.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "access_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("requester", sa.String(255), nullable=False),
        sa.Column("requester_name", sa.String(255), nullable=True),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("level", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("duration_seconds", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("expires_at", ts, nullable=False),
        sa.Column("decided_at", ts, nullable=True),
        sa.Column("decided_by", sa.String(255), nullable=True),
        sa.Column("grant_starts_at", ts, nullable=True),
        sa.Column("grant_ends_at", ts, nullable=True),
        sa.Column("revoked_at", ts, nullable=True),
        sa.Column("revoked_by", sa.String(255), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
    )
    op.create_index("ix_access_requests_requester", "access_requests", ["requester"])
    op.create_index("ix_access_requests_target", "access_requests", ["target"])
    op.create_index("ix_access_requests_status", "access_requests", ["status"])
    op.create_index("ix_access_requests_created_at", "access_requests", ["created_at"])
    op.create_index("ix_access_requests_grant", "access_requests", ["requester", "target", "level", "status"])
    op.create_table(
        "request_reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), sa.ForeignKey("access_requests.id"), nullable=False),
        sa.Column("reviewer", sa.String(255), nullable=False),
        sa.Column("reviewer_groups", sa.JSON(), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("at", ts, nullable=False),
        sa.UniqueConstraint("request_id", "reviewer", name="uq_request_reviews_reviewer"),
    )
    op.create_index("ix_request_reviews_request_id", "request_reviews", ["request_id"])
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("grant_id", sa.String(64), nullable=True))
        batch.create_index("ix_sessions_grant_id", ["grant_id"])


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_index("ix_sessions_grant_id")
        batch.drop_column("grant_id")
    op.drop_table("request_reviews")
    op.drop_table("access_requests")
