"""``/v1/requests``: just-in-time access requests, their reviews and grants (``pcigate_broker.access``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from pcigate.access_models import AccessRequestCreate, AccessRequestInfo, RequestPage, ReviewCreate

from ... import access
from ..deps import BrokerDep, CurrentIdentity, DbDep, RequestId

router = APIRouter(prefix="/v1/requests", tags=["requests"])


@router.post("", response_model=AccessRequestInfo, status_code=status.HTTP_201_CREATED)
def create(
    body: AccessRequestCreate, broker: BrokerDep, db: DbDep, identity: CurrentIdentity, request_id: RequestId
) -> AccessRequestInfo:
    return access.create_request(broker, db, identity, body, request_id)


@router.get("", response_model=RequestPage)
def list_requests(
    broker: BrokerDep,
    db: DbDep,
    identity: CurrentIdentity,
    pending: Annotated[bool, Query(description="only requests waiting for a decision")] = False,
    mine: Annotated[bool, Query(description="only the caller's own requests")] = False,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> RequestPage:
    """Newest first: the caller's own requests, those they may review, and everything for auditors."""
    items = access.list_requests(broker, db, identity, pending=pending, mine=mine, limit=limit)
    return RequestPage(items=items)


@router.get("/{access_request}", response_model=AccessRequestInfo)
def show(access_request: str, broker: BrokerDep, db: DbDep, identity: CurrentIdentity) -> AccessRequestInfo:
    row = access.visible_request(broker.settings, db, identity, access_request)
    return access.to_info(broker.settings, db, row, identity)


@router.post("/{access_request}/approve", response_model=AccessRequestInfo)
def approve(
    access_request: str, body: ReviewCreate, broker: BrokerDep, db: DbDep, identity: CurrentIdentity,
    request_id: RequestId,
) -> AccessRequestInfo:
    return access.review(broker, db, identity, access_request, "approve", body.comment, request_id)


@router.post("/{access_request}/deny", response_model=AccessRequestInfo)
def deny(
    access_request: str, body: ReviewCreate, broker: BrokerDep, db: DbDep, identity: CurrentIdentity,
    request_id: RequestId,
) -> AccessRequestInfo:
    return access.review(broker, db, identity, access_request, "deny", body.comment, request_id)


@router.post("/{access_request}/cancel", response_model=AccessRequestInfo)
def cancel(
    access_request: str, broker: BrokerDep, db: DbDep, identity: CurrentIdentity, request_id: RequestId
) -> AccessRequestInfo:
    return access.cancel(broker, db, identity, access_request, request_id)


@router.post("/{access_request}/revoke", response_model=AccessRequestInfo)
def revoke(
    access_request: str, body: ReviewCreate, broker: BrokerDep, db: DbDep, identity: CurrentIdentity,
    request_id: RequestId,
) -> AccessRequestInfo:
    return access.revoke(broker, db, identity, access_request, body.comment, request_id)
