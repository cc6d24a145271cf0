"""Data access: keyword-only functions over a SQLAlchemy ``Session``. Callers commit.

State changes that several broker replicas could race on are *claims*: one ``UPDATE … WHERE status='active'``
(or ``recording_sha256 IS NULL``) whose row count says who won, so two reapers never process one session
twice.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from pcigate.models import GrantRef, SessionSummary

from .. import audit_context
from .tables import AccessRequestRow, AuditEvent, ReviewRow, SessionRow


class BadCursor(ValueError):
    pass


def grant_ref(db: Session, request_id: str | None) -> GrantRef | None:
    """The grant a session ran under (request, reason, approvers), for its summary."""
    if request_id is None:
        return None
    req = db.get(AccessRequestRow, request_id)
    if req is None:
        return None
    q = select(ReviewRow.reviewer).where(ReviewRow.request_id == request_id, ReviewRow.decision == "approve")
    approvers = list(db.scalars(q.order_by(ReviewRow.id)))
    return GrantRef(request_id=req.id, reason=req.reason, approved_by=approvers,
                    grant_ends_at=req.grant_ends_at)


def to_summary(row: SessionRow, db: Session | None = None) -> SessionSummary:
    """``db`` given: the grant of a session under an access request is filled in too."""
    return SessionSummary(
        session_id=row.id,
        user=row.user,
        client_kind="workload" if row.client_kind == "workload" else "human",
        target=row.target,
        level=row.level,
        status=row.status,
        started_at=row.started_at,
        expires_at=row.expires_at,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
        lease_id=row.lease_id,
        lease_revoked=row.lease_revoked,
        recording_sha256=row.recording_sha256,
        recording_size=row.recording_size,
        client_hostname=row.client_hostname,
        grant=grant_ref(db, row.grant_id) if db is not None else None,
        cert_serial=row.cert_serial,
        cert_key_id=row.cert_key_id,
    )


def add_session(db: Session, row: SessionRow) -> None:
    db.add(row)
    db.flush()


def get_session(db: Session, session_id: str) -> SessionRow | None:
    return db.get(SessionRow, session_id)


def encode_cursor(started_at: datetime, session_id: str) -> str:
    raw = json.dumps([started_at.isoformat(), session_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        started, sid = json.loads(raw)
        when = datetime.fromisoformat(started)
        if not isinstance(sid, str) or when.tzinfo is None:
            raise BadCursor("bad cursor")
        return when, sid
    except (binascii.Error, ValueError, TypeError) as exc:
        raise BadCursor("bad cursor") from exc


def list_sessions(
    db: Session,
    *,
    user: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[SessionRow], str | None]:
    """Newest first (started_at, id descending); ``since``/``until`` bound ``started_at``
    (inclusive/exclusive)."""
    q = select(SessionRow)
    if user is not None:
        q = q.where(SessionRow.user == user)
    if target is not None:
        q = q.where(SessionRow.target == target)
    if since is not None:
        q = q.where(SessionRow.started_at >= since)
    if until is not None:
        q = q.where(SessionRow.started_at < until)
    if cursor is not None:
        c_at, c_id = decode_cursor(cursor)
        q = q.where(
            or_(SessionRow.started_at < c_at, and_(SessionRow.started_at == c_at, SessionRow.id < c_id))
        )
    q = q.order_by(SessionRow.started_at.desc(), SessionRow.id.desc()).limit(limit + 1)
    rows = list(db.scalars(q))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(last.started_at, last.id)
    return rows, next_cursor


def _rowcount(result: Any) -> int:
    assert isinstance(result, CursorResult)
    return int(result.rowcount)


def claim_end(db: Session, *, session_id: str, status: str, reason: str, now: datetime) -> bool:
    """Move an active session to ``status``; True only for the caller that actually did it."""
    result = db.execute(
        update(SessionRow)
        .where(SessionRow.id == session_id, SessionRow.status == "active")
        .values(status=status, end_reason=reason, ended_at=now)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def mark_lease_revoked(db: Session, *, session_id: str) -> None:
    db.execute(
        update(SessionRow)
        .where(SessionRow.id == session_id)
        .values(lease_revoked=True)
        .execution_options(synchronize_session=False)
    )


def touch_heartbeat(db: Session, *, session_id: str, now: datetime) -> bool:
    result = db.execute(
        update(SessionRow)
        .where(SessionRow.id == session_id, SessionRow.status == "active")
        .values(last_heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def claim_recording(db: Session, *, session_id: str, sha256: str, size: int, events: int) -> bool:
    result = db.execute(
        update(SessionRow)
        .where(SessionRow.id == session_id, SessionRow.recording_sha256.is_(None))
        .values(recording_sha256=sha256, recording_size=size, recording_events=events)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


@dataclass(frozen=True)
class Due:
    session_id: str
    status: str
    reason: str


def sessions_due(db: Session, *, now: datetime, grace_seconds: int, limit: int = 500) -> list[Due]:
    """Active sessions past their expiry or silent for longer than the heartbeat grace."""
    stale = now - timedelta(seconds=grace_seconds)
    q = (
        select(SessionRow.id, SessionRow.expires_at, SessionRow.last_heartbeat_at)
        .where(SessionRow.status == "active")
        .where(or_(SessionRow.expires_at <= now, SessionRow.last_heartbeat_at < stale))
        .limit(limit)
    )
    out = []
    for sid, _expires, _hb in db.execute(q):
        expired = _expires <= now
        out.append(Due(sid, "expired" if expired else "revoked", "expired" if expired else "heartbeat_lost"))
    return out


def unrevoked_leases(db: Session, *, limit: int = 500) -> list[tuple[str, str]]:
    """(session id, lease id) of ended sessions whose lease revocation is still owed."""
    q = (
        select(SessionRow.id, SessionRow.lease_id)
        .where(SessionRow.status != "active", SessionRow.lease_revoked.is_(False))
        .limit(limit)
    )
    return [(sid, lease) for sid, lease in db.execute(q)]


def audit(
    db: Session,
    *,
    at: datetime,
    action: str,
    outcome: str,
    actor: str | None = None,
    target: str | None = None,
    session_id: str | None = None,
    request_id: str | None = None,
    detail: dict[str, Any] | None = None,
    message: str | None = None,
) -> None:
    caller = audit_context.current.get()
    # the caller's groups and kind describe the actor only when the actor is the caller
    who = caller if caller is not None and (actor is None or actor == caller.subject) else None
    db.add(
        AuditEvent(
            at=at,
            actor=actor,
            actor_groups=list(who.groups) if who is not None and who.subject else None,
            client_kind=who.client_kind if who is not None else None,
            source=caller.source if caller is not None else None,
            action=action,
            target=target,
            outcome=outcome,
            detail=detail or {},
            request_id=request_id,
            session_id=session_id,
            message=message,
        )
    )


def audit_events(
    db: Session, *, session_id: str | None = None, action: str | None = None
) -> list[AuditEvent]:
    q = select(AuditEvent)
    if session_id is not None:
        q = q.where(AuditEvent.session_id == session_id)
    if action is not None:
        q = q.where(AuditEvent.action == action)
    return list(db.scalars(q.order_by(AuditEvent.id)))
