"""FastAPI dependencies as ``Annotated`` aliases: the app's Broker, a DB session, the caller's Identity."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from pcigate.models import Identity

from .. import audit_context
from ..auth import IdpUnavailable, TokenInvalid
from ..errors import ApiError
from ..state import Broker, utcnow
from ..store import repo

log = logging.getLogger(__name__)

_BEARER = "bearer "
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pcigate"'}


def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


def get_db(broker: BrokerDep) -> Iterator[Session]:
    with broker.sessions() as db:
        yield db


DbDep = Annotated[Session, Depends(get_db)]


def get_request_id(request: Request) -> str | None:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else None


RequestId = Annotated[str | None, Depends(get_request_id)]


def current_identity(
    broker: BrokerDep,
    request_id: RequestId,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Identity:
    """Validate ``Authorization: Bearer <jwt>`` (sync: JWKS fetches block;
    runs in a worker thread)."""
    if not authorization or not hmac.compare_digest(authorization[: len(_BEARER)].lower(), _BEARER):
        raise ApiError(401, "unauthenticated", "missing bearer token", headers=_CHALLENGE)
    token = authorization[len(_BEARER) :].strip()
    if not token:
        raise ApiError(401, "unauthenticated", "missing bearer token", headers=_CHALLENGE)
    try:
        identity = broker.validator.validate(token)
    except TokenInvalid as exc:
        reason = str(exc)
        log.info("token refused: %s (request %s)", reason, request_id)
        try:
            with broker.sessions() as db:
                repo.audit(
                    db,
                    at=utcnow(),
                    action="auth.refused",
                    outcome="denied",
                    request_id=request_id,
                    message=reason,
                )
                db.commit()
        except Exception:
            log.exception("could not write the auth.refused audit event")
        raise ApiError(401, "token_invalid", reason, headers=_CHALLENGE) from None
    except IdpUnavailable as exc:
        log.warning("cannot validate tokens: %s", exc)
        raise ApiError(
            503, "idp_unavailable", "identity provider unreachable: cannot check tokens now"
        ) from None
    caller = audit_context.current.get()
    if caller is not None:  # shared with the endpoint's thread: every audit event it writes names the caller
        caller.subject = identity.subject
        caller.groups = list(identity.groups)
        caller.client_kind = identity.client_kind
    _login_seen(broker, identity, request_id)
    return identity


CurrentIdentity = Annotated[Identity, Depends(current_identity)]

_SEEN_MAX = 10_000


def _login_seen(broker: Broker, identity: Identity, request_id: str | None) -> None:
    """The first call with a new token (a sign-in or a refresh) is an ``auth.login`` event: when a person or
    workload started using the broker, with what groups. Remembered per replica (bounded)."""
    seen = broker.extra.setdefault("tokens_seen", {})
    assert isinstance(seen, dict)
    key = (identity.subject, identity.expires_at.isoformat())
    if key in seen:
        return
    if len(seen) >= _SEEN_MAX:
        seen.clear()
    seen[key] = True
    try:
        with broker.sessions() as db:
            repo.audit(db, at=utcnow(), action="auth.login", outcome="success", actor=identity.subject,
                       request_id=request_id,
                       detail={"groups": list(identity.groups), "client_kind": identity.client_kind,
                               "token_expires_at": identity.expires_at.isoformat(),
                               "amr": list(identity.amr)})
            db.commit()
    except Exception:
        log.exception("could not write the auth.login audit event")
