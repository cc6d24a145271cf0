"""The caller: who they are and which targets they reach."""

from __future__ import annotations

from fastapi import APIRouter

from pcigate.models import Identity, TargetInfo

from ... import policy
from ..deps import BrokerDep, CurrentIdentity

router = APIRouter(prefix="/v1")


@router.get("/whoami", response_model=Identity)
def whoami(identity: CurrentIdentity) -> Identity:
    return identity


@router.get("/targets", response_model=list[TargetInfo])
def targets(broker: BrokerDep, identity: CurrentIdentity) -> list[TargetInfo]:
    return policy.visible_targets(broker.settings, identity)
