"""``/v1/sessions``: open, heartbeat, end, list, show."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, status

from pcigate.models import SessionCreate, SessionOpened, SessionPage, SessionSummary

from ... import policy, sessions
from ...errors import ApiError
from ...store import repo
from ..deps import BrokerDep, CurrentIdentity, DbDep, RequestId

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

MAX_PAGE = 200


@router.post("", response_model=SessionOpened, status_code=status.HTTP_201_CREATED)
def open_session(
    body: SessionCreate, broker: BrokerDep, db: DbDep, identity: CurrentIdentity, request_id: RequestId
) -> SessionOpened:
    return sessions.open_session(broker, db, identity, body, request_id)


@router.post("/{session_id}/heartbeat", response_model=SessionSummary)
def heartbeat(session_id: str, broker: BrokerDep, db: DbDep, identity: CurrentIdentity) -> SessionSummary:
    return sessions.heartbeat(broker, db, identity, session_id)


@router.post("/{session_id}/end", response_model=SessionSummary)
def end(
    session_id: str, broker: BrokerDep, db: DbDep, identity: CurrentIdentity, request_id: RequestId
) -> SessionSummary:
    return sessions.end_session(broker, db, identity, session_id, request_id)


@router.get("", response_model=SessionPage)
def list_sessions(
    broker: BrokerDep,
    db: DbDep,
    identity: CurrentIdentity,
    user: Annotated[str | None, Query(max_length=255)] = None,
    target: Annotated[str | None, Query(max_length=128)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> SessionPage:
    """Newest first. Auditors see every session; anyone else only their own (``user=`` someone else → 403)."""
    if not policy.is_auditor(broker.settings, identity):
        if user is not None and user != identity.subject:
            raise ApiError(403, "forbidden", "only auditors may list other users' sessions")
        user = identity.subject
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ApiError(422, "validation_error", f"{name}: a timezone is required (e.g. Z)")
    try:
        rows, next_cursor = repo.list_sessions(
            db, user=user, target=target, since=since, until=until, limit=limit, cursor=cursor
        )
    except repo.BadCursor:
        raise ApiError(422, "validation_error", "cursor: not a cursor from this API") from None
    return SessionPage(items=[repo.to_summary(r, db) for r in rows], next_cursor=next_cursor)


@router.get("/{session_id}", response_model=SessionSummary)
def show(session_id: str, broker: BrokerDep, db: DbDep, identity: CurrentIdentity) -> SessionSummary:
    return repo.to_summary(sessions.visible_session(broker, db, identity, session_id), db)
