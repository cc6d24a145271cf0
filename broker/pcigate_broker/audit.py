"""The tamper-evident audit log: a hash chain over ``audit_events``, signed checkpoints, verification.

Events are written by :func:`repo.audit` inside each request's own transaction, without a chain position.
The *sealer* (:func:`seal`, run by the reaper every pass and before every read of the log) then gives the
unsealed events, oldest id first, the next positions ``seq`` = 1, 2, 3 … and

    hash_n = sha256(hash_{n-1} || canonical(event_n))      (hex; hash_0 = "")

where ``canonical`` is the sorted-key compact JSON of the event's content with its ``seq``. Only one sealer
runs at a time (a PostgreSQL advisory lock; a process lock on SQLite), so several broker replicas writing to
one PostgreSQL keep one chain: no forks, no gaps. An event is protected from the moment it is sealed; until
then (at most one reaper interval) it is only in the database.

Checkpoints: when the chain has grown and the last checkpoint is older than ``audit.checkpoint_seconds``,
the sealer signs ``pcigate-audit-checkpoint:v1:<seq>:<hash>:<at>`` with the broker's ed25519 key
(``audit.signing_key_file``). Someone who can write the database but does not hold the key can edit events
and recompute every hash after them, but not the signatures: verification then fails at the checkpoint.

:func:`verify` walks the chain in order (streaming), recomputes every hash, checks that positions have no gaps
and that each event's ``prev_hash`` is its predecessor's hash, checks every checkpoint's signature and that
the chain has that hash at that position (a chain shorter than a checkpoint lost events), and re-hashes
every stored recording whose digest the chain holds (``recording.upload`` events). The first failure is
reported with its position.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from pcigate.audit_models import AuditEventInfo, AuditVerification

from .store.repo import _rowcount
from .store.tables import AuditCheckpoint, AuditEvent

_SQLITE_LOCK = threading.Lock()
_ADVISORY_KEY = 0x70636761  # "pcga": the sealer's PostgreSQL advisory lock
SEAL_BATCH = 5000
HASH_CHUNK = 1 << 20


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content(row: AuditEvent) -> dict[str, Any]:
    """What an event's hash covers: everything it says, and its position."""
    return {
        "seq": row.seq,
        "id": row.id,
        "at": row.at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "detail": row.detail or {},
        "request_id": row.request_id,
        "session_id": row.session_id,
        "message": row.message,
        "actor_groups": row.actor_groups,
        "client_kind": row.client_kind,
        "source": row.source,
    }


def link(prev: str, row: AuditEvent) -> str:
    return hashlib.sha256(prev.encode() + canonical(content(row))).hexdigest()


def checkpoint_message(seq: int, chain_hash: str, at: datetime) -> bytes:
    return f"pcigate-audit-checkpoint:v1:{seq}:{chain_hash}:{at.astimezone(UTC).isoformat()}".encode()


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey | None
    public: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an ed25519 private key")
        return cls(key, key.public_key())


@contextlib.contextmanager
def _sealer(db: Session, wait: bool = False) -> Iterator[bool]:
    """The sealer's lock for this transaction (a process lock on SQLite, an advisory lock on PostgreSQL):
    yields False when another replica holds it, or with ``wait`` waits for it. Rolls back on an exception."""
    sqlite = db.get_bind().dialect.name == "sqlite"
    if sqlite:
        _SQLITE_LOCK.acquire()
    try:
        if sqlite:
            got = True
        elif wait:
            db.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
            got = True
        else:
            got = bool(db.execute(text("SELECT pg_try_advisory_xact_lock(:k)"),
                                  {"k": _ADVISORY_KEY}).scalar())
        if not got:
            db.rollback()
        yield got
    except Exception:
        db.rollback()
        raise
    finally:
        if sqlite:
            _SQLITE_LOCK.release()


def _sign(db: Session, key: SigningKey, seq: int, chain_hash: str, now: datetime) -> None:
    assert key.private is not None
    sig = key.private.sign(checkpoint_message(seq, chain_hash, now))
    db.add(AuditCheckpoint(seq=seq, hash=chain_hash, at=now, key_id=key.key_id, signature=sig.hex()))


def _head(db: Session) -> tuple[int, str]:
    """The chain's last position and hash: its newest event, or the checkpoint a retention cut left when no
    event after it exists yet (the chain goes on from there, never from 1 again)."""
    row = db.execute(
        select(AuditEvent.seq, AuditEvent.hash).where(AuditEvent.seq.is_not(None))
        .order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, h = (int(row[0]), str(row[1])) if row is not None and row[0] is not None else (0, "")
    cp = db.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.seq.desc()).limit(1)).first()
    if cp is not None and cp.seq > seq:
        return cp.seq, cp.hash
    return seq, h


def seal(db: Session, *, key: SigningKey | None = None, checkpoint_seconds: int = 300,
         now: datetime | None = None, force_checkpoint: bool = False, wait: bool = False) -> int:
    """Chain every unsealed event (oldest id first) and, when due, sign a checkpoint. Returns how many events
    were sealed. Commits. While another replica seals, returns 0 at once (it takes these events too), or with
    ``wait`` waits for it to commit and then seals what is left: what a caller then reads is all sealed."""
    with _sealer(db, wait) as mine:
        if not mine:
            return 0  # another replica is sealing right now; it will take ours too
        seq, prev = _head(db)
        sealed = 0
        while True:
            batch = list(db.scalars(select(AuditEvent).where(AuditEvent.seq.is_(None))
                                    .order_by(AuditEvent.id).limit(SEAL_BATCH)))
            if not batch:
                break
            for row in batch:
                seq += 1
                row.seq = seq
                row.prev_hash = prev
                prev = row.hash = link(prev, row)
            sealed += len(batch)
            db.flush()
        if key is not None and key.private is not None and seq > 0:
            last = db.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.seq.desc()).limit(1)).first()
            now = now or datetime.now(UTC)
            due = last is None or (last.seq < seq and (
                force_checkpoint or (now - last.at).total_seconds() >= checkpoint_seconds))
            if due:
                _sign(db, key, seq, prev, now)
        db.commit()
        return sealed


def _sealed(db: Session) -> Iterator[AuditEvent]:
    last = 0
    while True:
        rows = list(db.scalars(select(AuditEvent).where(AuditEvent.seq > last)
                               .order_by(AuditEvent.seq).limit(SEAL_BATCH)))
        if not rows:
            return
        yield from rows
        last = int(rows[-1].seq or 0)
        db.expunge_all()


def _signed(key: SigningKey, cp: AuditCheckpoint) -> bool:
    try:
        key.public.verify(bytes.fromhex(cp.signature), checkpoint_message(cp.seq, cp.hash, cp.at))
    except (InvalidSignature, ValueError):
        return False
    return cp.key_id == key.key_id


def _file_sha256(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def verify(db: Session, *, key: SigningKey | None, recording_path: Any | None = None,
           recordings_since: datetime | None = None) -> AuditVerification:
    """Check the whole sealed chain, the checkpoints and the stored recordings (``recording_path(sha256) ->
    Path``; with ``recordings_since`` only those uploaded since then are re-hashed, the chain is always
    checked whole). Read only."""
    checkpoints = {c.seq: c for c in db.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.seq))}
    expected = 1
    prev = ""
    n = recordings = 0
    signed_through = 0
    key_id = key.key_id if key is not None else None

    def result(bad: int | None = None, error: str | None = None) -> AuditVerification:
        return AuditVerification(ok=bad is None and error is None, events=n, last_seq=expected - 1,
                                 last_hash=prev, checkpoints=len(checkpoints), signed_through=signed_through,
                                 recordings=recordings, key_id=key_id, first_bad_seq=bad, error=error)

    first = db.execute(select(func.min(AuditEvent.seq))).scalar()
    if first is None and checkpoints:
        # every event was cut by retention: the newest checkpoint is the chain's head
        head = checkpoints[max(checkpoints)]
        expected, prev = head.seq + 1, head.hash
        if key is None or not _signed(key, head):
            return result(head.seq, f"checkpoint {head.seq} has an invalid signature")
        signed_through = head.seq
        return result()
    if first is not None and first > 1:
        # retention cut the chain's head: it goes on from the signed checkpoint left at the cut
        anchor = checkpoints.get(first - 1)
        expected = first
        if anchor is None or key is None or not _signed(key, anchor):
            return result(1, f"events 1 to {first - 1} are missing and no valid signed checkpoint marks a "
                             "retention cut there")
        prev, signed_through = anchor.hash, anchor.seq

    for row in _sealed(db):
        if row.seq != expected:
            return result(expected, f"event {expected} is missing (the next one is {row.seq})")
        if row.prev_hash != prev:
            return result(expected, f"event {expected} does not follow event {expected - 1} (prev_hash)")
        h = link(prev, row)
        if row.hash != h:
            return result(expected, f"event {expected} was altered (its hash does not match its content)")
        cp = checkpoints.get(expected)
        if cp is not None:
            if key is None:
                return result(expected, "signed checkpoints exist but no signing key is configured")
            if cp.key_id != key.key_id:
                return result(expected, f"checkpoint {expected} was signed by another key ({cp.key_id})")
            if not _signed(key, cp):
                return result(expected, f"checkpoint {expected} has an invalid signature")
            if cp.hash != h:
                return result(expected, f"the chain at event {expected} differs from its signed checkpoint")
            signed_through = expected
        if (recording_path is not None and row.action == "recording.upload" and row.outcome == "success"
                and isinstance((row.detail or {}).get("sha256"), str)
                and (recordings_since is None or row.at >= recordings_since)):
            digest = row.detail["sha256"]
            got = _file_sha256(recording_path(digest))
            if got != digest:
                what = "is missing" if got is None else "does not match its digest"
                return result(expected,
                              f"the recording of session {row.session_id} (event {expected}) {what}")
            recordings += 1
        prev = h
        n += 1
        expected += 1
    beyond = [c for c in checkpoints if c >= expected]
    if beyond:
        return result(expected,
                      f"events from {expected} on are missing: a checkpoint signed event {min(beyond)}")
    return result()


def to_info(row: AuditEvent) -> AuditEventInfo:
    return AuditEventInfo(seq=row.seq, at=row.at, actor=row.actor, action=row.action, target=row.target,
                          outcome=row.outcome, detail=row.detail or {}, request_id=row.request_id,
                          session_id=row.session_id, message=row.message, hash=row.hash,
                          actor_groups=row.actor_groups, client_kind=row.client_kind, source=row.source)


def count_unsealed(db: Session) -> int:
    return int(db.execute(select(func.count()).select_from(AuditEvent).where(AuditEvent.seq.is_(None)))
               .scalar() or 0)


@dataclass(frozen=True)
class RetentionResult:
    cut_seq: int  # events up to here were deleted (0: nothing was due)
    events: int
    recordings: int
    sessions: int


def apply_retention(db: Session, *, key: SigningKey | None, retention_seconds: int, recording_path: Any,
                    now: datetime | None = None) -> RetentionResult:
    """Delete what is past retention and keep the chain verifiable: seal, sign a checkpoint at the cut (the
    last event older than the cut, with every event before it older too), delete the events up to it (and
    checkpoints before it), the sessions that ended before the cut with their recordings, and record what was
    deleted as an audit event. Without a signing key nothing is deleted (the cut could not be proven)."""
    from .store.tables import SessionRow

    now = now or datetime.now(UTC)
    cut_time = now - timedelta(seconds=retention_seconds)
    if key is None or key.private is None:
        return RetentionResult(0, 0, 0, 0)
    seal(db, key=key)
    with _sealer(db) as mine:
        if not mine:
            return RetentionResult(0, 0, 0, 0)
        newer = db.execute(select(func.min(AuditEvent.seq)).where(AuditEvent.seq.is_not(None),
                                                               AuditEvent.at >= cut_time)).scalar()
        head_seq, _head_hash = _head(db)
        cut = (newer - 1) if newer is not None else head_seq
        low = db.execute(select(func.min(AuditEvent.seq))).scalar()
        if cut <= 0 or low is None or cut < low:
            db.rollback()
            return RetentionResult(0, 0, 0, 0)
        row = db.scalars(select(AuditEvent).where(AuditEvent.seq == cut)).first()
        assert row is not None
        assert row.hash is not None
        if db.get(AuditCheckpoint, cut) is None:
            _sign(db, key, cut, row.hash, now)
        events = _rowcount(db.execute(delete(AuditEvent).where(AuditEvent.seq <= cut)))
        db.execute(delete(AuditCheckpoint).where(AuditCheckpoint.seq < cut))
        old = list(db.execute(select(SessionRow.id, SessionRow.recording_sha256).where(
            SessionRow.status != "active", SessionRow.ended_at < cut_time)))
        files = 0
        for _sid, sha in old:
            if sha:
                path = recording_path(sha)
                try:
                    path.unlink()
                    files += 1
                except FileNotFoundError:
                    pass
        sessions = _rowcount(db.execute(delete(SessionRow).where(SessionRow.status != "active",
                                                                 SessionRow.ended_at < cut_time)))
        db.add(AuditEvent(at=now, actor="broker", action="retention.run", outcome="success",
                          detail={"cut_seq": cut, "cut_hash": row.hash, "cut_time": cut_time.isoformat(),
                                  "events_deleted": events, "recordings_deleted": files,
                                  "sessions_deleted": sessions, "retention_seconds": retention_seconds}))
        db.commit()
        return RetentionResult(cut, events, files, sessions)
