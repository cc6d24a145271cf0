"""Recordings and session ends the broker has not acknowledged yet.

``spool/<id>.rec`` is the recording, ``spool/<id>.json`` says which broker it belongs to, its SHA-256
(once closed) and whether the session end call is still owed. ``spool/<id>.lock`` is ``flock``-ed by
whoever works on the session (the running ``connect``, or a sync), so a sync never touches a live session.

Every broker-using command first calls :func:`flush_quietly` (short timeout, silent); ``pcigate sessions
sync`` calls :func:`flush` and reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

from pcigate.config import SESSION_ID, Settings, spool_dir
from pcigate.errors import (
    AuthRequired,
    BrokerUnavailable,
    NotFound,
    PcigateError,
    RecordingError,
    VaultUnavailable,
)

if TYPE_CHECKING:
    from pcigate.auth.credentials import Credentials
    from pcigate.client import BrokerClient
    from pcigate.models import RecordingReceipt

Progress = Callable[[str, int], contextlib.AbstractContextManager[Callable[[int], None]]]


class SpoolEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    session_id: str
    broker: str
    sha256: str | None = None
    end_owed: bool = True
    created_at: datetime
    rejected: str | None = None  # the broker refused the recording for good; kept for an operator
    # whether the session records (its policy's ``record``), so a recording missing from the spool is told
    # from a session that never had one; None: an entry from an earlier CLI, which did not say
    recorded: bool | None = None


class SyncResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str
    ended: bool = False
    uploaded: bool = False
    events: int | None = None
    sha256: str | None = None
    kept: bool = False
    error: str | None = None


def _safe_id(session_id: str) -> str:
    """``session_id``, if it can name spool files and a broker URL path; RecordingError otherwise."""
    if not SESSION_ID.fullmatch(session_id):
        raise RecordingError(f"refusing an unsafe session id {session_id!r}")
    return session_id


def _paths(session_id: str, directory: Path | None = None) -> tuple[Path, Path, Path]:
    _safe_id(session_id)
    d = directory or spool_dir()
    return d / f"{session_id}.rec", d / f"{session_id}.json", d / f"{session_id}.lock"


def recording_path(session_id: str, *, create: bool = True) -> Path:
    """Where the session's recording is spooled (``create`` False: without making the directory, e.g. to
    name it in a message)."""
    return _paths(session_id, None if create else spool_dir(create=False))[0]


def write_entry(entry: SpoolEntry) -> None:
    """Atomically (re)write ``<id>.json`` (0600)."""
    _, meta, _ = _paths(entry.session_id)
    tmp = meta.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(entry.model_dump_json())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(meta)


def new_entry(session_id: str, broker: str, *, recorded: bool | None = None) -> SpoolEntry:
    entry = SpoolEntry(session_id=session_id, broker=broker.rstrip("/"), created_at=datetime.now(UTC),
                       recorded=recorded)
    write_entry(entry)
    return entry


def read_entry(meta: Path) -> SpoolEntry | None:
    try:
        return SpoolEntry.model_validate_json(meta.read_bytes())
    except (OSError, ValidationError):
        return None


def forget(session_id: str) -> None:
    rec, meta, lock = _paths(session_id)
    for path in (rec, meta, lock):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def session_lock(session_id: str, *, wait: bool = True) -> Iterator[bool]:
    """``flock`` on ``<id>.lock``; yields False when ``wait`` is off and someone else holds it."""
    _, _, lock = _paths(session_id)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def state_error(exc: OSError) -> RecordingError:
    """The state directory (the spool) cannot be written or read: one line naming it (the same words for
    both: a sync's failure may be either)."""
    where = exc.filename or spool_dir(create=False)
    return RecordingError(
        f"cannot use the session state in {where}: {exc.strerror or exc}",
        hint="free some disk space or fix the permissions of the state directory (PCIGATE_STATE_DIR)",
    )


def _scan(broker: str | None) -> tuple[list[SpoolEntry], list[Path]]:
    """One pass over the spool: the entries (of ``broker``, if given), and the ``<id>.json`` files that do not
    parse (no sync can settle them: an operator must look)."""
    entries: list[SpoolEntry] = []
    unreadable: list[Path] = []
    for meta in sorted(spool_dir().glob("*.json")):
        entry = read_entry(meta)
        if entry is None:
            unreadable.append(meta)
        elif broker is None or entry.broker == broker.rstrip("/"):
            entries.append(entry)
    return entries, unreadable


def pending(broker: str | None = None) -> list[SpoolEntry]:
    return _scan(broker)[0]


def settle(
    client: BrokerClient,
    entry: SpoolEntry,
    *,
    progress: Progress | None = None,
) -> tuple[SyncResult, RecordingReceipt | None]:
    """End the session if owed, upload the recording, delete both from the spool.

    The caller holds the session lock. Transport failures propagate (:class:`BrokerUnavailable`); a recording
    the broker refuses for good is kept and marked ``rejected``.
    """
    _safe_id(entry.session_id)  # before the broker is asked anything
    result = SyncResult(session_id=entry.session_id, sha256=entry.sha256)
    if entry.end_owed:
        # First, before touching the spool directory: a broken spool (full disk, bad permissions) must never
        # keep the lease alive.
        try:
            with contextlib.suppress(NotFound):  # the broker does not know it (any more): nothing to end
                client.end_session(entry.session_id)
        except VaultUnavailable:
            # the broker has ended the session and owes the revocation, which it retries on its own: the
            # recording is still to upload
            result.error = "OpenBao could not revoke the lease yet; the broker retries"
        entry = entry.model_copy(update={"end_owed": False})
        with contextlib.suppress(OSError):  # best effort: a repeated end is harmless
            write_entry(entry)
        result.ended = True
    rec, _, _ = _paths(entry.session_id)
    receipt: RecordingReceipt | None = None
    if entry.recorded and not rec.exists():
        # The session recorded, and its recording is gone from the spool (deleted by hand, or the CLI was
        # killed in the microseconds between writing this entry and creating the file). Never quietly: kept
        # and reported on every sync until an operator has looked, so the gap in the evidence is known.
        missing = f"its recording {rec} is missing from the spool (deleted?); nothing to upload"
        write_entry(entry.model_copy(update={"rejected": missing}))
        result.kept = True
        result.error = missing
        return result, None
    if rec.exists() and entry.sha256 is None and rec.stat().st_size == 0:
        # Killed between creating the file and writing its header (a few µs): nothing was recorded, so
        # there is nothing to upload or keep; kept, it would fail every sync for good.
        rec.unlink()
        result.error = "nothing was recorded (the CLI was stopped before its recording had a header)"
    elif rec.exists():
        if entry.sha256 is None:
            # Never closed: its writer died (we hold the session lock, so no live process owns it). Seal it
            # so what was recorded before the crash verifies and is not lost.
            from pcigate.recording import seal_recording

            seal_recording(rec, reason="client_lost")
        sha = entry.sha256 or file_sha256(rec)
        result.sha256 = sha
        try:
            if progress is not None:
                with progress(f"uploading {entry.session_id}", rec.stat().st_size) as advance:
                    receipt = client.upload_recording(entry.session_id, rec, sha, advance)
            else:
                receipt = client.upload_recording(entry.session_id, rec, sha)
        except (RecordingError, NotFound) as exc:
            write_entry(entry.model_copy(update={"rejected": exc.message, "sha256": sha}))
            result.kept = True
            result.error = exc.message
            return result, None
        result.uploaded = True
        result.events = receipt.events
    forget(entry.session_id)
    return result, receipt


def flush(
    client: BrokerClient,
    settings: Settings,
    *,
    include_rejected: bool = True,
    progress: Progress | None = None,
) -> list[SyncResult]:
    """Settle this broker's spooled sessions, each on its own: one that cannot be settled (a recording the
    broker refuses, a damaged file) is kept with its error and the others go on. Only what stops them all
    propagates: the broker unreachable, the sign-in refused. Unreadable entries are reported as kept."""
    results: list[SyncResult] = []
    entries, unreadable = _scan(settings.broker_url)
    for entry in entries:
        if entry.rejected and not include_rejected:
            continue
        try:
            with session_lock(entry.session_id, wait=False) as locked:
                if not locked:
                    continue  # a live session (or another sync) owns it
                fresh = read_entry(_paths(entry.session_id)[1])
                if fresh is None:
                    continue  # settled meanwhile
                result, _ = settle(client, fresh, progress=progress)
        except (BrokerUnavailable, AuthRequired):
            raise
        except PcigateError as exc:
            result = SyncResult(session_id=entry.session_id, kept=True, error=exc.message)
        except OSError as exc:
            result = SyncResult(session_id=entry.session_id, kept=True, error=state_error(exc).message)
        results.append(result)
    for meta in unreadable:
        results.append(SyncResult(session_id=meta.stem, kept=True,
                                  error=f"unreadable spool entry {meta}: left for an operator"))
    return results


def flush_quietly(settings: Settings, creds: Credentials, *, timeout: float) -> None:
    """Best effort, silent: never delays a command by more than ``timeout`` per call, never fails it."""
    try:
        if not any(not e.rejected for e in pending(settings.broker_url)):
            return
        from pcigate.client import BrokerClient

        with BrokerClient(
            settings.broker_url,
            token=creds.bearer,
            on_refresh=creds.refresh,
            on_unauthorized=creds.drop,
            auth_hint=creds.hint,
            timeout=timeout,
            connect_timeout=timeout,
        ) as client:
            flush(client, settings, include_rejected=False)
    except Exception:  # noqa: S110 - quiet by contract; `pcigate sessions sync` reports
        pass
