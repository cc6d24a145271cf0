"""``/v1/audit``: the audit log for auditors: list (filters, paging), verify the chain."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from pcigate.audit_models import AuditPage, AuditVerification
from pcigate.models import Identity

from ... import audit, policy
from ...errors import ApiError
from ...state import Broker, utcnow
from ...store import repo
from ...store.tables import AuditEvent
from ..deps import BrokerDep, CurrentIdentity, DbDep, RequestId

router = APIRouter(prefix="/v1/audit", tags=["audit"])

MAX_PAGE = 1000


def _auditor(broker: Broker, identity: Identity) -> None:
    if not policy.is_auditor(broker.settings, identity):
        raise ApiError(403, "forbidden", "only members of the auditor groups may read the audit log")


@router.get("", response_model=AuditPage)
def list_events(
    broker: BrokerDep,
    db: DbDep,
    identity: CurrentIdentity,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: Annotated[str | None, Query(max_length=255)] = None,
    target: Annotated[str | None, Query(max_length=255)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[int, Query(ge=0, description="events after this chain position (paging)")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 200,
) -> AuditPage:
    """Sealed events in chain order (oldest first); ``next_cursor`` is the next page's ``after``."""
    _auditor(broker, identity)
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ApiError(422, "validation_error", f"{name}: a timezone is required (e.g. Z)")
    audit.seal(db, key=broker.audit_key, checkpoint_seconds=broker.settings.audit.checkpoint_seconds,
               wait=True)
    q = select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(limit)
    if since is not None:
        q = q.where(AuditEvent.at >= since)
    if until is not None:
        q = q.where(AuditEvent.at < until)
    if actor is not None:
        q = q.where(AuditEvent.actor == actor)
    if target is not None:
        q = q.where(AuditEvent.target == target)
    if action is not None:
        q = q.where(AuditEvent.action == action)
    rows = list(db.scalars(q))
    nxt = str(rows[-1].seq) if len(rows) == limit and rows[-1].seq is not None else None
    return AuditPage(items=[audit.to_info(r) for r in rows], next_cursor=nxt)


@router.post("/verify", response_model=AuditVerification)
def verify(
    broker: BrokerDep, db: DbDep, identity: CurrentIdentity, request_id: RequestId,
    since: Annotated[datetime | None, Query(description="re-hash only recordings uploaded since")] = None,
) -> AuditVerification:
    """Seal what is pending, then check the whole chain, its signed checkpoints and the stored recordings.
    The check itself is an audit event (sealed by the next pass)."""
    _auditor(broker, identity)
    # wait for a sealing replica: otherwise its uncommitted part of the chain would be missing from the check
    audit.seal(db, key=broker.audit_key, checkpoint_seconds=broker.settings.audit.checkpoint_seconds,
               wait=True)
    if since is not None and since.tzinfo is None:
        raise ApiError(422, "validation_error", "since: a timezone is required (e.g. Z)")
    result = audit.verify(db, key=broker.audit_key, recording_path=broker.recordings.path_for,
                          recordings_since=since)
    db.rollback()
    repo.audit(db, at=utcnow(), action="audit.verify", outcome="success" if result.ok else "failure",
               actor=identity.subject, request_id=request_id,
               detail={"events": result.events, "last_seq": result.last_seq,
                       "first_bad_seq": result.first_bad_seq},
               message=result.error)
    db.commit()
    return result
