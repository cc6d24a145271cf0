"""The caller: who they are and which targets they reach."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from pcigate.models import Identity, TargetInfo

from ... import policy
from ...state import utcnow
from ...store import repo
from ..deps import BrokerDep, CurrentIdentity, RequestId

router = APIRouter(prefix="/v1")


@router.get("/whoami", response_model=Identity)
def whoami(identity: CurrentIdentity) -> Identity:
    return identity


@router.get("/targets", response_model=list[TargetInfo])
def targets(
    broker: BrokerDep,
    identity: CurrentIdentity,
    request_id: RequestId,
    include_policy: Annotated[bool, Query(description="fill each level's data-path policy")] = False,
) -> JSONResponse:
    """Without ``include_policy`` the levels carry no ``policy`` key at all (the wire format of clients that
    predate it, whose models forbid unknown keys)."""
    items = policy.visible_targets(broker.settings, identity, include_policy=include_policy)
    with broker.sessions() as db:
        repo.audit(db, at=utcnow(), action="targets.list", outcome="success", actor=identity.subject,
                   request_id=request_id, detail={"targets": [t.name for t in items]})
        db.commit()
    exclude = None if include_policy else {"levels": {"__all__": {"policy"}}}
    return JSONResponse([t.model_dump(mode="json", exclude=exclude) for t in items])
