"""Just-in-time access: requests, reviews, grants (docs/configuration.md, "Access requests").

Blocking (database): call from worker threads. The rules, all enforced here:

* a level with a ``request`` table is request-only: who may *request* it is who the ``[[access]]`` rules give
  it to; a session at that level needs a live grant, and its credentials never outlive the grant;
* nobody reviews their own request; only members of the level's approver groups review; each person once;
* one denial ends a request; ``approvals`` distinct approvers (or one from each approver group) approve it;
* a review after the request's deadline expires it and changes nothing else; the grant runs from the
  approval for the requested duration;
* revoking a grant ends the sessions running under it (their leases revoked).

Concurrency: every review takes the request row with ``SELECT … FOR UPDATE`` (PostgreSQL; several replicas
serialize on it) or a process lock (SQLite, one broker process), then changes state with a conditional
``UPDATE … WHERE status = 'pending' AND version = v``: two approvers acting at once never make two grants,
and never leave an N-of-M request short of a decision.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import threading
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pcigate.access_models import (
    AccessRequestCreate,
    AccessRequestInfo,
    Decision,
    ReviewInfo,
)
from pcigate.models import Identity

from . import policy
from .errors import ApiError, NotFoundError
from .settings import RequestPolicy, Settings
from .state import Broker, utcnow
from .store import repo
from .store.tables import AccessRequestRow, ReviewRow, SessionRow

log = logging.getLogger(__name__)

_SQLITE_LOCK = threading.Lock()


def request_policy(settings: Settings, target: str, level: str) -> RequestPolicy | None:
    tgt = settings.targets.get(target)
    if tgt is None or level not in tgt.levels:
        return None
    return tgt.levels[level].request


def has_mfa(identity: Identity, pol: RequestPolicy) -> bool:
    if set(identity.amr) & set(pol.mfa_amr):
        return True
    return identity.acr is not None and identity.acr in pol.mfa_acr


def is_approver(identity: Identity, pol: RequestPolicy) -> bool:
    return any(g in pol.approver_groups for g in identity.groups)


def approvals_satisfied(pol: RequestPolicy, approvals: list[tuple[str, list[str]]]) -> bool:
    """``approvals``: (reviewer, their groups at review time), distinct reviewers."""
    counted = [(who, [g for g in groups if g in pol.approver_groups]) for who, groups in approvals]
    counted = [(who, groups) for who, groups in counted if groups]
    if not pol.one_per_group:
        return len(counted) >= pol.approvals
    need = pol.approver_groups
    if len(counted) < len(need):
        return False
    # one distinct approver per group: a small matching, tried exhaustively (groups and reviewers are few)
    for chosen in itertools.permutations(counted, len(need)):
        if all(group in groups for group, (_who, groups) in zip(need, chosen, strict=True)):
            return True
    return False


# ---- reading ---------------------------------------------------------------------------------------------


def reviews_of(db: Session, request_id: str) -> list[ReviewRow]:
    q = select(ReviewRow).where(ReviewRow.request_id == request_id).order_by(ReviewRow.id)
    return list(db.scalars(q))


def to_info(
    settings: Settings, db: Session, row: AccessRequestRow, viewer: Identity | None
) -> AccessRequestInfo:
    pol = request_policy(settings, row.target, row.level)
    reviews = reviews_of(db, row.id)
    can_review = (
        viewer is not None
        and pol is not None
        and row.status == "pending"
        and viewer.subject != row.requester
        and is_approver(viewer, pol)
        and all(r.reviewer != viewer.subject for r in reviews)
    )
    return AccessRequestInfo(
        request_id=row.id,
        requester=row.requester,
        requester_name=row.requester_name,
        target=row.target,
        level=row.level,
        reason=row.reason,
        duration_seconds=row.duration_seconds,
        status=row.status,
        created_at=row.created_at,
        expires_at=row.expires_at,
        decided_at=row.decided_at,
        decided_by=row.decided_by,
        grant_starts_at=row.grant_starts_at,
        grant_ends_at=row.grant_ends_at,
        revoked_at=row.revoked_at,
        revoked_by=row.revoked_by,
        comment=row.comment,
        approvals_needed=policy.describe_approvals(pol) or "",
        reviews=[
            ReviewInfo(reviewer=r.reviewer, decision=r.decision, comment=r.comment, at=r.at)
            for r in reviews
        ],
        can_review=can_review,
    )


def may_see(settings: Settings, identity: Identity, row: AccessRequestRow) -> bool:
    if row.requester == identity.subject or policy.is_auditor(settings, identity):
        return True
    pol = request_policy(settings, row.target, row.level)
    return pol is not None and is_approver(identity, pol)


def visible_request(settings: Settings, db: Session, identity: Identity, request_id: str) -> AccessRequestRow:
    row = db.get(AccessRequestRow, request_id)
    if row is None or not may_see(settings, identity, row):
        raise NotFoundError("no such request")
    return row


def list_requests(
    broker: Broker, db: Session, identity: Identity, *, pending: bool, mine: bool, limit: int = 200
) -> list[AccessRequestInfo]:
    settings = broker.settings
    expire_due(broker, db)
    q = select(AccessRequestRow).order_by(AccessRequestRow.created_at.desc()).limit(limit * 4)
    if pending:
        q = q.where(AccessRequestRow.status == "pending")
    if mine:
        q = q.where(AccessRequestRow.requester == identity.subject)
    out: list[AccessRequestInfo] = []
    for row in db.scalars(q):
        if may_see(settings, identity, row):
            out.append(to_info(settings, db, row, identity))
            if len(out) >= limit:
                break
    return out


def live_grant(db: Session, *, user: str, target: str, level: str, now: datetime) -> AccessRequestRow | None:
    q = (
        select(AccessRequestRow)
        .where(
            AccessRequestRow.requester == user,
            AccessRequestRow.target == target,
            AccessRequestRow.level == level,
            AccessRequestRow.status == "approved",
            AccessRequestRow.grant_ends_at > now,
        )
        .order_by(AccessRequestRow.grant_ends_at.desc())
        .limit(1)
    )
    return db.scalars(q).first()


# ---- changing ----------------------------------------------------------------------------------------------


def _notify(broker: Broker, event: str, info: AccessRequestInfo) -> None:
    notifier = broker.notifier
    if notifier is not None:
        notifier.emit(event, info)


def _claim(db: Session, row: AccessRequestRow, new_status: str, **values: object) -> bool:
    """Move ``row`` from its current (status, version) to ``new_status``; False if someone else moved it."""
    result = db.execute(
        update(AccessRequestRow)
        .where(
            AccessRequestRow.id == row.id,
            AccessRequestRow.status == row.status,
            AccessRequestRow.version == row.version,
        )
        .values(status=new_status, version=row.version + 1, **values)
        .execution_options(synchronize_session=False)
    )
    return repo._rowcount(result) == 1


def create_request(
    broker: Broker, db: Session, identity: Identity, body: AccessRequestCreate, request_id: str | None
) -> AccessRequestInfo:
    settings = broker.settings
    now = utcnow()

    def refuse(status: int, code: str, message: str) -> ApiError:
        repo.audit(db, at=now, action="request.create", outcome="denied", actor=identity.subject,
                   target=body.target, request_id=request_id, message=message,
                   detail={"level": body.level, "code": code})
        db.commit()
        return ApiError(status, code, message)  # type: ignore[arg-type]

    levels = policy.allowed_levels(settings, identity, body.target)
    if not levels:
        raise refuse(404, "unknown_target", f"unknown target {body.target!r}")
    if body.level not in levels:
        raise refuse(403, "level_not_allowed",
                     f"level {body.level!r} is not allowed on {body.target}; allowed: {', '.join(levels)}")
    pol = request_policy(settings, body.target, body.level)
    if pol is None:
        raise refuse(409, "conflict", f"level {body.level!r} on {body.target} needs no request: "
                                      f"pcigate connect {body.target} --level {body.level}")
    if identity.client_kind == "workload":
        raise refuse(403, "forbidden", "workload identities cannot request elevated access")
    if pol.require_mfa and not has_mfa(identity, pol):
        raise refuse(403, "mfa_required", f"level {body.level!r} on {body.target} needs a sign-in with MFA: "
                                          "log in again with a second factor (pcigate login)")
    reason = body.reason.strip()
    if pol.reason_required and not reason:
        raise refuse(422, "validation_error", "a reason is required (--reason)")
    if reason and pol.reason_pattern and not re.fullmatch(pol.reason_pattern, reason):
        raise refuse(422, "validation_error", f"the reason must match {pol.reason_pattern!r}")
    duration = body.duration_seconds or pol.max_duration
    if duration > pol.max_duration:
        raise refuse(422, "validation_error", f"at most {pol.max_duration}s may be asked for this level")
    open_q = select(AccessRequestRow).where(
        AccessRequestRow.requester == identity.subject,
        AccessRequestRow.target == body.target,
        AccessRequestRow.level == body.level,
        or_(
            and_(AccessRequestRow.status == "pending", AccessRequestRow.expires_at > now),
            and_(AccessRequestRow.status == "approved", AccessRequestRow.grant_ends_at > now),
        ),
    )
    existing = db.scalars(open_q).first()
    if existing is not None:
        what = "a pending request" if existing.status == "pending" else "a live grant"
        raise refuse(409, "conflict",
                     f"you already have {what} for {body.target}/{body.level}: {existing.id}")
    row = AccessRequestRow(
        id="req-" + secrets.token_hex(6),
        requester=identity.subject,
        requester_name=identity.name or identity.email,
        target=body.target,
        level=body.level,
        reason=reason,
        duration_seconds=duration,
        status="pending",
        version=0,
        created_at=now,
        expires_at=now + timedelta(seconds=pol.pending_ttl),
    )
    db.add(row)
    repo.audit(db, at=now, action="request.create", outcome="success", actor=identity.subject,
               target=body.target, request_id=request_id,
               detail={"access_request": row.id, "level": body.level, "reason": reason, "duration": duration})
    db.commit()
    info = to_info(settings, db, row, identity)
    _notify(broker, "request.created", info)
    return info


def _lock_request(db: Session, request_id: str) -> AccessRequestRow | None:
    q = select(AccessRequestRow).where(AccessRequestRow.id == request_id)
    if db.get_bind().dialect.name != "sqlite":
        q = q.with_for_update()
    return db.scalars(q).first()


def review(
    broker: Broker, db: Session, identity: Identity, access_request: str, decision: Decision,
    comment: str | None, request_id: str | None,
) -> AccessRequestInfo:
    settings = broker.settings
    lock = _SQLITE_LOCK if db.get_bind().dialect.name == "sqlite" else None
    if lock is not None:
        lock.acquire()
    try:
        return _review(broker, settings, db, identity, access_request, decision, comment, request_id)
    finally:
        if lock is not None:
            lock.release()


def _review(
    broker: Broker, settings: Settings, db: Session, identity: Identity, access_request: str,
    decision: Decision, comment: str | None, request_id: str | None,
) -> AccessRequestInfo:
    now = utcnow()
    action = f"request.{decision}"

    def refuse(status: int, code: str, message: str) -> ApiError:
        db.rollback()
        repo.audit(db, at=now, action=action, outcome="denied", actor=identity.subject,
                   request_id=request_id, message=message, detail={"access_request": access_request})
        db.commit()
        return ApiError(status, code, message)  # type: ignore[arg-type]

    row = _lock_request(db, access_request)
    if row is None or not may_see(settings, identity, row):
        db.rollback()
        raise NotFoundError("no such request")
    pol = request_policy(settings, row.target, row.level)
    if row.requester == identity.subject:
        raise refuse(403, "forbidden", "nobody may review their own request")
    if pol is None or not is_approver(identity, pol):
        groups = ", ".join(pol.approver_groups) if pol else "none"
        raise refuse(403, "forbidden",
                     f"only members of the approver groups ({groups}) may review this request")
    if row.status == "pending" and row.expires_at <= now:
        _claim(db, row, "expired", decided_at=now, decided_by="expiry")
        repo.audit(db, at=now, action="request.expire", outcome="success", actor="broker",
                   target=row.target, detail={"access_request": row.id})
        db.commit()
        db.refresh(row)
        _notify(broker, "request.decided", to_info(settings, db, row, None))
        raise refuse(409, "conflict",
                     f"request {row.id} expired at {row.expires_at.isoformat()}; nothing changed")
    if row.status != "pending":
        raise refuse(409, "conflict", f"request {row.id} is already {row.status}")
    if decision == "deny" and not (comment or "").strip():
        raise refuse(422, "validation_error", "a denial needs a reason (--reason)")
    rid = row.id
    already = f"you already reviewed request {rid}"
    if any(r.reviewer == identity.subject for r in reviews_of(db, rid)):
        raise refuse(409, "conflict", already)
    try:
        db.add(ReviewRow(request_id=rid, reviewer=identity.subject, reviewer_groups=list(identity.groups),
                         decision=decision, comment=comment, at=now))
        db.flush()
    except IntegrityError:  # the same reviewer racing themselves on another replica
        raise refuse(409, "conflict", already) from None
    decided = False
    if decision == "deny":
        decided = _claim(db, row, "denied", decided_at=now, decided_by=identity.subject, comment=comment)
    else:
        approvals = [(r.reviewer, list(r.reviewer_groups)) for r in reviews_of(db, row.id)
                     if r.decision == "approve"]
        assert pol is not None
        if approvals_satisfied(pol, approvals):
            decided = _claim(db, row, "approved", decided_at=now, decided_by=identity.subject,
                             grant_starts_at=now, grant_ends_at=now + timedelta(seconds=row.duration_seconds))
            if not decided:  # another replica moved it between our lock and here (cannot with the lock)
                raise refuse(409, "conflict", f"request {row.id} changed meanwhile; try again")
    repo.audit(db, at=now, action=action, outcome="success", actor=identity.subject, target=row.target,
               request_id=request_id,
               detail={"access_request": row.id, "level": row.level, "comment": comment,
                       "decided": decided})
    db.commit()
    db.refresh(row)
    info = to_info(settings, db, row, identity)
    if decided:
        _notify(broker, "request.decided", info)
    return info


def cancel(broker: Broker, db: Session, identity: Identity, access_request: str,
           request_id: str | None) -> AccessRequestInfo:
    row = visible_request(broker.settings, db, identity, access_request)
    if row.requester != identity.subject:
        raise ApiError(403, "forbidden", "only the requester may cancel a request")
    if row.status != "pending" or not _claim(db, row, "cancelled", decided_at=utcnow(),
                                              decided_by=identity.subject):
        db.rollback()
        raise ApiError(409, "conflict", f"request {row.id} is {row.status}, not pending")
    repo.audit(db, at=utcnow(), action="request.cancel", outcome="success", actor=identity.subject,
               target=row.target, request_id=request_id, detail={"access_request": row.id})
    db.commit()
    db.refresh(row)
    info = to_info(broker.settings, db, row, identity)
    _notify(broker, "request.decided", info)
    return info


def revoke(broker: Broker, db: Session, identity: Identity, access_request: str, comment: str | None,
           request_id: str | None) -> AccessRequestInfo:
    """End a grant now (the requester, an approver of the level or an auditor); its live sessions end."""
    from . import sessions  # sessions imports this module

    settings = broker.settings
    row = visible_request(settings, db, identity, access_request)
    pol = request_policy(settings, row.target, row.level)
    allowed = (row.requester == identity.subject or policy.is_auditor(settings, identity)
               or (pol is not None and is_approver(identity, pol)))
    if not allowed:
        raise ApiError(403, "forbidden", "only the requester, an approver or an auditor may revoke a grant")
    now = utcnow()
    if row.status == "pending":
        raise ApiError(409, "conflict", f"request {row.id} is pending: cancel or deny it instead")
    ends = min(row.grant_ends_at or now, now)
    if row.status != "approved" or not _claim(db, row, "revoked", revoked_at=now, revoked_by=identity.subject,
                                               comment=comment, grant_ends_at=ends):
        db.rollback()
        raise ApiError(409, "conflict", f"request {row.id} is {row.status}, not an approved grant")
    repo.audit(db, at=now, action="request.revoke", outcome="success", actor=identity.subject,
               target=row.target, request_id=request_id,
               detail={"access_request": row.id, "comment": comment})
    db.commit()
    live = list(db.scalars(select(SessionRow).where(SessionRow.grant_id == row.id,
                                                    SessionRow.status == "active")))
    for s in live:
        if repo.claim_end(db, session_id=s.id, status="revoked", reason="grant_revoked", now=now):
            repo.audit(db, at=now, action="session.end", outcome="success", actor=identity.subject,
                       target=s.target, session_id=s.id, request_id=request_id,
                       detail={"reason": "grant_revoked", "access_request": row.id})
            db.commit()
            sessions.revoke_owed(broker, db, s.id, s.lease_id, actor=identity.subject, request_id=request_id)
    db.refresh(row)
    info = to_info(settings, db, row, identity)
    _notify(broker, "request.decided", info)
    return info


def expire_due(broker: Broker, db: Session, *, now: datetime | None = None) -> int:
    """Pending requests past their deadline become ``expired`` (reaper, and before listing)."""
    now = now or utcnow()
    rows = list(db.scalars(select(AccessRequestRow).where(AccessRequestRow.status == "pending",
                                                         AccessRequestRow.expires_at <= now).limit(500)))
    n = 0
    for row in rows:
        if _claim(db, row, "expired", decided_at=now, decided_by="expiry"):
            repo.audit(db, at=now, action="request.expire", outcome="success", actor="broker",
                       target=row.target, detail={"access_request": row.id})
            db.commit()
            db.refresh(row)
            _notify(broker, "request.decided", to_info(broker.settings, db, row, None))
            n += 1
        else:
            db.rollback()
    return n
