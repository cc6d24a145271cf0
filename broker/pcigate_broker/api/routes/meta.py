"""Unauthenticated endpoints: health and the OIDC client configuration for CLIs."""

from __future__ import annotations

from fastapi import APIRouter

from pcigate.models import OidcClientConfig

from ..deps import BrokerDep

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/config/oidc", response_model=OidcClientConfig)
def oidc_config(broker: BrokerDep) -> OidcClientConfig:
    o = broker.settings.oidc
    return OidcClientConfig(
        issuer=o.issuer, client_id=o.effective_client_id, scopes=list(o.scopes), audience=o.audience
    )
