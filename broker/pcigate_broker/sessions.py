"""Session life cycle: open (policy → OpenBao credentials → row), heartbeat, end (revoke now), reap.

Blocking (database + hvac): call from worker threads. Status after the end of a session:
``ended`` (the client ended it), ``expired`` (past ``expires_at``, reaper), ``revoked`` (heartbeat lost,
reaper).
``lease_revoked`` stays false while OpenBao could not be reached; the reaper retries those.
"""

from __future__ import annotations

import base64
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.exceptions import UnsupportedAlgorithm
from sqlalchemy.orm import Session

from pcigate.models import (
    DatabaseCredentials,
    DataPathPolicy,
    Identity,
    SessionCreate,
    SessionOpened,
    SessionSummary,
    SshCredentials,
)

from . import access, policy
from .errors import ApiError, DatabaseUnavailable, NotFoundError, VaultUnavailable
from .policy import canonical as canonical  # re-exported; the session's policy is built in policy.py
from .policy import data_path_policy as data_path_policy
from .settings import Settings
from .state import Broker, utcnow
from .store import repo
from .store.tables import SessionRow
from .vault import IssuedCreds

log = logging.getLogger(__name__)


def new_session_id() -> str:
    """24 URL-safe characters (144 random bits), never starting with "-" or "_": an id typed on a command
    line (``pcigate sessions show ID``) must not read as an option."""
    while True:
        sid = secrets.token_urlsafe(18)
        if sid[0].isalnum():
            return sid


def vault_error(exc: Exception) -> ApiError:
    if isinstance(exc, DatabaseUnavailable):
        return ApiError(503, "database_unavailable", str(exc))
    return ApiError(503, "vault_unavailable", str(exc) or "OpenBao unavailable")


def open_session(
    broker: Broker, db: Session, identity: Identity, req: SessionCreate, request_id: str | None
) -> SessionOpened:
    settings = broker.settings
    now = utcnow()
    try:
        grant = policy.decide(settings, identity, req.target, req.level, req.ttl_seconds)
    except ApiError as err:
        repo.audit(
            db,
            at=now,
            action="session.open",
            outcome="denied",
            actor=identity.subject,
            target=req.target,
            request_id=request_id,
            message=err.message,
            detail={"level": req.level, "code": err.code},
        )
        db.commit()
        raise
    # A request-only level needs a live grant, and the session may not outlive it.
    jit = settings.targets[grant.target].levels[grant.level].request
    live = None
    if jit is not None:
        live = access.live_grant(db, user=identity.subject, target=grant.target, level=grant.level, now=now)
        if live is None or live.grant_ends_at is None:
            message = (f"level {grant.level!r} on {grant.target} needs an approved access request: run "
                       f"pcigate request {grant.target} --level {grant.level} --reason '...'")
            repo.audit(db, at=now, action="session.open", outcome="denied", actor=identity.subject,
                       target=grant.target, request_id=request_id, message=message,
                       detail={"level": grant.level, "code": "grant_required"})
            db.commit()
            raise ApiError(403, "grant_required", message)
        if jit.require_mfa and not access.has_mfa(identity, jit):
            message = f"level {grant.level!r} on {grant.target} needs a sign-in with MFA (pcigate login)"
            repo.audit(db, at=now, action="session.open", outcome="denied", actor=identity.subject,
                       target=grant.target, request_id=request_id, message=message,
                       detail={"level": grant.level, "code": "mfa_required"})
            db.commit()
            raise ApiError(403, "mfa_required", message)
    tgt = settings.targets[grant.target]
    if req.kind is not None and req.kind != tgt.kind:
        hint = "pcigate ssh" if tgt.kind == "ssh" else "pcigate connect"
        raise _refuse(f"{grant.target} is a {tgt.kind} target (use {hint})")
    # Built before any credential exists: a policy problem must not leave a lease behind.
    session_policy = data_path_policy(settings, grant.target, grant.level)
    session_id = new_session_id()
    creds: IssuedCreds | None = None
    cert: SignedCert | None = None
    try:
        if tgt.kind == "ssh":
            ttl = grant.ttl_seconds
            if live is not None and live.grant_ends_at is not None:
                ttl = min(ttl, max(1, int((live.grant_ends_at - utcnow()).total_seconds())))
            cert = sign_certificate(broker, grant, identity, req, session_id, ttl)
        else:
            creds = broker.vault.issue_db_creds(grant.vault_mount, grant.vault_role)
    except (VaultUnavailable, DatabaseUnavailable) as exc:
        verr = vault_error(exc)
        repo.audit(
            db,
            at=now,
            action="session.open",
            outcome="error",
            actor=identity.subject,
            target=grant.target,
            request_id=request_id,
            message=verr.message,
            detail={"level": grant.level, "code": verr.code},
        )
        db.commit()
        raise verr from None
    ttl = grant.ttl_seconds
    if creds is not None and creds.lease_duration > 0:
        ttl = min(ttl, creds.lease_duration)  # never promise more than the lease itself lives
    started = utcnow()
    if live is not None and live.grant_ends_at is not None:
        ttl = min(ttl, max(1, int((live.grant_ends_at - started).total_seconds())))  # never past the grant
    expires_at = started + timedelta(seconds=ttl)
    if cert is not None:
        expires_at = min(expires_at, cert.valid_before)  # the session ends when its certificate does
    lease_id = creds.lease_id if creds is not None else ""
    row = SessionRow(
        id=session_id,
        user=identity.subject,
        user_name=identity.name or identity.email,
        client_kind=identity.client_kind,
        groups=list(identity.groups),
        target=grant.target,
        level=grant.level,
        status="active",
        started_at=started,
        expires_at=expires_at,
        lease_id=lease_id,
        lease_revoked=False,
        last_heartbeat_at=started,
        client_hostname=req.client_hostname,
        client_version=req.client_version,
        grant_id=live.id if live is not None else None,
        cert_serial=cert.serial if cert is not None else None,
        cert_key_id=cert.key_id if cert is not None else None,
    )
    try:
        repo.add_session(db, row)
        repo.audit(
            db,
            at=started,
            action="session.open",
            outcome="success",
            actor=identity.subject,
            target=grant.target,
            session_id=row.id,
            request_id=request_id,
            detail={
                "level": grant.level,
                "ttl_seconds": ttl,
                "lease_id": lease_id,
                **(cert.audit_detail() if cert is not None else {}),
                "client_kind": identity.client_kind,
                "client_hostname": req.client_hostname,
                "access_request": live.id if live is not None else None,
            },
        )
        db.commit()
    except Exception:
        db.rollback()
        if creds is not None:
            log.error("could not record a new session; revoking its lease")
            try:
                broker.vault.revoke_lease(creds.lease_id)
            except VaultUnavailable:
                log.error("lease %s could not be revoked after a failed session insert", creds.lease_id)
        raise
    return SessionOpened(
        session_id=row.id,
        target=grant.target,
        level=grant.level,
        user=identity.subject,
        started_at=row.started_at,
        expires_at=row.expires_at,
        lease_id=lease_id,
        heartbeat_seconds=settings.sessions.heartbeat_seconds,
        kind=tgt.kind,
        credentials=DatabaseCredentials(
            host=tgt.host,
            port=tgt.effective_port,
            database=tgt.database or "",
            username=creds.username,
            password=creds.password,
            sslmode=tgt.sslmode,
        ) if creds is not None else None,
        ssh=SshCredentials(
            host=tgt.host,
            port=tgt.effective_port,
            principal=cert.principals[0],
            principals=cert.principals,
            certificate=cert.certificate,
            known_hosts=tgt.known_hosts(),
            serial=cert.serial,
            key_id=cert.key_id,
            valid_before=cert.valid_before,
        ) if cert is not None else None,
        policy=session_policy,
        masking_key=target_masking_key(settings, grant.target) if _has_hash_rules(session_policy) else None,
    )


@dataclass(frozen=True)
class SignedCert:
    certificate: str
    serial: str
    key_id: str
    principals: list[str]
    valid_before: datetime

    def audit_detail(self) -> dict[str, object]:
        return {"cert_serial": self.serial, "cert_key_id": self.key_id, "principals": self.principals,
                "valid_before": self.valid_before.isoformat()}


def _refuse(message: str) -> ApiError:
    return ApiError(422, "validation_error", message)


def sign_certificate(broker: Broker, grant: policy.Grant, identity: Identity, req: SessionCreate,
                     session_id: str, ttl: int) -> SignedCert:
    """Have OpenBao's SSH CA sign the CLI's ephemeral ed25519 key for the level's principals, for ``ttl``
    seconds at most, with a key id naming the session and the user; then read back what was signed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not req.public_key:
        raise ApiError(422, "ssh_key_required",
                       f"{grant.target} is an ssh target: the session needs the client's public key")
    try:
        key = serialization.load_ssh_public_key(req.public_key.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        raise _refuse("public_key is not an OpenSSH public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise _refuse("public_key must be an ed25519 key")
    level = broker.settings.targets[grant.target].levels[grant.level]
    principals = list(level.principals)
    if req.port_forwarding and not level.port_forwarding:
        raise ApiError(403, "level_not_allowed",
                       f"port forwarding is not allowed at level {grant.level!r} on {grant.target}")
    # Least privilege: a terminal session's certificate permits a pty only, a forward session's forwarding
    # only.
    extensions = ["permit-port-forwarding"] if req.port_forwarding else ["permit-pty"]
    key_id = f"pcigate:{identity.subject}:{session_id}"[:255]
    text = broker.vault.sign_ssh_key(grant.vault_mount, grant.vault_role, req.public_key.strip(), principals,
                                     ttl, key_id, extensions)
    try:
        cert = serialization.load_ssh_public_identity(text.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise VaultUnavailable("OpenBao returned something that is not an SSH certificate") from None
    signed = cert.public_key() if isinstance(cert, serialization.SSHCertificate) else None
    if not isinstance(cert, serialization.SSHCertificate) or not isinstance(signed, Ed25519PublicKey) \
            or signed.public_bytes_raw() != key.public_bytes_raw() \
            or sorted(p.decode() for p in cert.valid_principals) != sorted(principals):
        raise VaultUnavailable("OpenBao signed a certificate other than the one asked for")
    return SignedCert(certificate=text, serial=str(cert.serial), key_id=cert.key_id.decode(errors="replace"),
                      principals=principals,
                      valid_before=datetime.fromtimestamp(cert.valid_before, UTC))


def _has_hash_rules(pol: DataPathPolicy) -> bool:
    return pol.masking is not None and any(r.action == "hash" for r in pol.masking.columns)


def target_masking_key(settings: Settings, target: str) -> str | None:
    """The target's key for keyed-hash masking: HMAC-SHA256(deployment key, "pcigate-masking:" + target),
    base64url. The same for every session on the target (hashed values join), another for every target."""
    key = settings.masking.key
    if key is None:
        return None
    info = b"pcigate-masking:" + target.encode()
    derived = hmac.new(key.get_secret_value().encode(), info, "sha256").digest()
    return base64.urlsafe_b64encode(derived).decode()


def visible_session(broker: Broker, db: Session, identity: Identity, session_id: str) -> SessionRow:
    """The session if the caller owns it or is an auditor; otherwise 404 (existence is not revealed)."""
    row = repo.get_session(db, session_id)
    if row is None or (row.user != identity.subject and not policy.is_auditor(broker.settings, identity)):
        raise NotFoundError()
    return row


def owned_session(broker: Broker, db: Session, identity: Identity, session_id: str, what: str) -> SessionRow:
    row = visible_session(broker, db, identity, session_id)
    if row.user != identity.subject:
        raise ApiError(403, "forbidden", f"only the session's owner may {what}")
    return row


def heartbeat(broker: Broker, db: Session, identity: Identity, session_id: str) -> SessionSummary:
    row = owned_session(broker, db, identity, session_id, "heart-beat it")
    now = utcnow()
    if (
        row.status != "active"
        or row.expires_at <= now
        or not repo.touch_heartbeat(db, session_id=row.id, now=now)
    ):
        raise ApiError(
            409, "session_closed", f"session is {row.status if row.status != 'active' else 'expired'}"
        )
    db.commit()
    db.refresh(row)
    return repo.to_summary(row, db)


def revoke_owed(
    broker: Broker, db: Session, row_id: str, lease_id: str, *, actor: str, request_id: str | None
) -> bool:
    """Revoke a lease and record it; False (and an audit event) when OpenBao could not do it now.

    An ssh session has no lease (``""``): its certificate cannot be revoked and simply expires."""
    if not lease_id:
        repo.mark_lease_revoked(db, session_id=row_id)
        db.commit()
        return True
    try:
        broker.vault.revoke_lease(lease_id)
    except VaultUnavailable as exc:
        repo.audit(
            db,
            at=utcnow(),
            action="lease.revoke",
            outcome="error",
            actor=actor,
            session_id=row_id,
            request_id=request_id,
            message=str(exc),
            detail={"lease_id": lease_id},
        )
        db.commit()
        return False
    repo.mark_lease_revoked(db, session_id=row_id)
    repo.audit(
        db,
        at=utcnow(),
        action="lease.revoke",
        outcome="success",
        actor=actor,
        session_id=row_id,
        request_id=request_id,
        detail={"lease_id": lease_id},
    )
    db.commit()
    return True


def end_session(
    broker: Broker, db: Session, identity: Identity, session_id: str, request_id: str | None
) -> SessionSummary:
    row = owned_session(broker, db, identity, session_id, "end it")
    now = utcnow()
    if repo.claim_end(db, session_id=row.id, status="ended", reason="client", now=now):
        repo.audit(
            db,
            at=now,
            action="session.end",
            outcome="success",
            actor=identity.subject,
            target=row.target,
            session_id=row.id,
            request_id=request_id,
            detail={"reason": "client"},
        )
        db.commit()
    db.refresh(row)
    if not row.lease_revoked and not revoke_owed(
        broker, db, row.id, row.lease_id, actor=identity.subject, request_id=request_id
    ):
        raise ApiError(
            503,
            "vault_unavailable",
            "session ended but OpenBao could not revoke the lease now; the broker will retry",
        )
    db.refresh(row)
    return repo.to_summary(row, db)


def reap_once(broker: Broker, db: Session, *, now: datetime | None = None) -> int:
    """One reaper pass; returns how many sessions it ended. Safe with concurrent replicas (claims)."""
    now = now or utcnow()
    ended = 0
    for due in repo.sessions_due(db, now=now, grace_seconds=broker.settings.sessions.heartbeat_grace_seconds):
        if not repo.claim_end(db, session_id=due.session_id, status=due.status, reason=due.reason, now=now):
            db.rollback()
            continue  # another replica (or the client) got there first
        row = repo.get_session(db, due.session_id)
        repo.audit(
            db,
            at=now,
            action="session.end",
            outcome="success",
            actor="reaper",
            target=row.target if row else None,
            session_id=due.session_id,
            detail={"reason": due.reason},
        )
        db.commit()
        ended += 1
    for session_id, lease_id in repo.unrevoked_leases(db):
        revoke_owed(broker, db, session_id, lease_id, actor="reaper", request_id=None)
    return ended
