"""Tables (SQLAlchemy 2 typed declarative). Timestamps are stored as UTC and always come back tz-aware."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive UTC text, PostgreSQL timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), index=True)
    user_name: Mapped[str | None] = mapped_column(String(255))
    client_kind: Mapped[str] = mapped_column(String(16))
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    target: Mapped[str] = mapped_column(String(128), index=True)
    level: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(64))
    lease_id: Mapped[str] = mapped_column(String(255))
    lease_revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    client_hostname: Mapped[str | None] = mapped_column(String(255))
    client_version: Mapped[str | None] = mapped_column(String(64))
    recording_sha256: Mapped[str | None] = mapped_column(String(64))
    recording_size: Mapped[int | None] = mapped_column(Integer)
    recording_events: Mapped[int | None] = mapped_column(Integer)
    grant_id: Mapped[str | None] = mapped_column(String(64), index=True)  # the access request it ran under
    cert_serial: Mapped[str | None] = mapped_column(String(32))  # ssh: the signed certificate's serial
    cert_key_id: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        Index("ix_sessions_started_id", "started_at", "id"),
        Index("ix_sessions_status_revoked", "status", "lease_revoked"),
    )


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str | None] = mapped_column(String(255), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    request_id: Mapped[str | None] = mapped_column(String(64))
    session_id: Mapped[str | None] = mapped_column(String(64), index=True)
    message: Mapped[str | None] = mapped_column(Text)
    # who, beyond the subject, and from where (filled from the request's caller; None outside requests)
    actor_groups: Mapped[list[str] | None] = mapped_column(JSON)
    client_kind: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(64))
    # the hash chain (pcigate_broker.audit): set by the sealer, in the order it seals (unique, no gaps)
    seq: Mapped[int | None] = mapped_column(Integer, unique=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A signed statement "the chain had this hash at this seq": history before it cannot be rewritten by
    someone who can write the database but does not hold the broker's signing key."""

    __tablename__ = "audit_checkpoints"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    key_id: Mapped[str] = mapped_column(String(64))  # sha256 of the raw public key, hex, first 16
    signature: Mapped[str] = mapped_column(String(128))  # ed25519, hex


class AccessRequestRow(Base):
    """A just-in-time access request and, once approved, its grant (``grant_starts_at``..``grant_ends_at``).

    ``status``: pending → approved | denied | expired | cancelled; approved → revoked. Every change is a
    conditional UPDATE on (id, status, version), so two replicas never both decide one request."""

    __tablename__ = "access_requests"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    requester: Mapped[str] = mapped_column(String(255), index=True)
    requester_name: Mapped[str | None] = mapped_column(String(255))
    target: Mapped[str] = mapped_column(String(128), index=True)
    level: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    duration_seconds: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)  # a pending request's deadline
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decided_by: Mapped[str | None] = mapped_column(String(255))
    grant_starts_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    grant_ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_by: Mapped[str | None] = mapped_column(String(255))
    comment: Mapped[str | None] = mapped_column(Text)  # the denial's or revocation's reason

    __table_args__ = (Index("ix_access_requests_grant", "requester", "target", "level", "status"),)


class ReviewRow(Base):
    """One reviewer's decision on a request (one per reviewer and request)."""

    __tablename__ = "request_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), ForeignKey("access_requests.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(255))
    reviewer_groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    decision: Mapped[str] = mapped_column(String(16))  # approve | deny
    comment: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("request_id", "reviewer", name="uq_request_reviews_reviewer"),)


class ForwardCursor(Base):
    """How far each SIEM destination has received the audit chain (its last acknowledged ``seq``)."""

    __tablename__ = "audit_forward_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
