"""``/v1/sessions/{id}/recording``: streamed, verified, content-addressed upload; streamed download."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, Literal

import anyio.to_thread
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from pcigate.models import Identity, RecordingReceipt
from pcigate.recording import asciicast_lines

from ... import sessions
from ...errors import ApiError
from ...recordings import SHA256_HEX, TooLarge, Upload, VerifiedUpload
from ...state import Broker, utcnow
from ...store import repo
from ..deps import BrokerDep, CurrentIdentity, RequestId

router = APIRouter(prefix="/v1/sessions", tags=["recordings"])

_BATCH = 1 << 20  # hand the verifier/hasher ~1 MiB at a time, in a worker thread


def _lookup(broker: Broker, identity: Identity, session_id: str) -> tuple[str | None, dict[str, str]]:
    """The stored digest (if any) and what the recording's header must say about the session."""
    with broker.sessions() as db:
        row = sessions.owned_session(broker, db, identity, session_id, "upload its recording")
        if row.status == "active" and row.recording_sha256 is None:
            # A recording is evidence of a finished session: accepting one early would let a client store a
            # clean-looking file first and have the real one refused as a conflict later.
            raise ApiError(409, "conflict", "the session is still active: end it before uploading")
        expected = {"session_id": row.id, "user": row.user, "target": row.target, "level": row.level,
                    "lease_id": row.lease_id}
        return row.recording_sha256, expected


def _store(
    broker: Broker, identity: Identity, session_id: str, up: VerifiedUpload, request_id: str | None
) -> tuple[RecordingReceipt, bool]:
    dest = broker.recordings.path_for(up.sha256)
    existed = dest.exists()
    broker.recordings.commit(up)
    with broker.sessions() as db:
        won = repo.claim_recording(
            db, session_id=session_id, sha256=up.sha256, size=up.size, events=up.events
        )
        if not won:
            db.rollback()
            row = repo.get_session(db, session_id)
            current = row.recording_sha256 if row else None
            if current != up.sha256:
                if not existed:
                    dest.unlink(missing_ok=True)
                raise ApiError(409, "conflict", "a different recording is already stored for this session")
            return RecordingReceipt(
                session_id=session_id, sha256=up.sha256, size=up.size, events=up.events, already_stored=True
            ), False
        repo.audit(
            db,
            at=utcnow(),
            action="recording.upload",
            outcome="success",
            actor=identity.subject,
            session_id=session_id,
            request_id=request_id,
            detail={"sha256": up.sha256, "size": up.size, "events": up.events, "blocked": len(up.blocked)},
        )
        row = repo.get_session(db, session_id)
        for t, rule, sql in up.blocked:  # what the tunnel kept from the database, as audit events too
            repo.audit(db, at=utcnow(), action="statement.blocked", outcome="denied", actor=identity.subject,
                       target=row.target if row else None, session_id=session_id, request_id=request_id,
                       detail={"rule": rule, "t": t, "sql": sql})
        db.commit()
    return RecordingReceipt(session_id=session_id, sha256=up.sha256, size=up.size, events=up.events), True


def _refuse(
    broker: Broker, identity: Identity, session_id: str, request_id: str | None, err: ApiError
) -> None:
    with broker.sessions() as db:
        repo.audit(
            db,
            at=utcnow(),
            action="recording.upload",
            outcome="denied",
            actor=identity.subject,
            session_id=session_id,
            request_id=request_id,
            message=err.message,
            detail={"code": err.code},
        )
        db.commit()


@router.put(
    "/{session_id}/recording",
    response_model=RecordingReceipt,
    status_code=201,
    responses={200: {"model": RecordingReceipt, "description": "already stored (same digest)"}},
    openapi_extra={
        "requestBody": {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}, "required": True}
    },
)
async def upload(
    session_id: str,
    request: Request,
    broker: BrokerDep,
    identity: CurrentIdentity,
    request_id: RequestId,
    x_content_sha256: Annotated[str, Header(alias="X-Content-SHA256", max_length=64, min_length=64)],
) -> Response:
    digest = x_content_sha256.lower()
    if not SHA256_HEX.match(digest):
        raise ApiError(422, "validation_error", "X-Content-SHA256: expected 64 hex digits")
    existing, expected = await anyio.to_thread.run_sync(_lookup, broker, identity, session_id)
    if existing is not None and existing != digest:
        raise ApiError(409, "conflict", "a different recording is already stored for this session")
    cap = broker.settings.server.max_recording_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise ApiError(413, "too_large", f"recording larger than the {cap}-byte limit")
    up: Upload = await anyio.to_thread.run_sync(broker.recordings.begin, cap)
    try:
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) >= _BATCH:
                await anyio.to_thread.run_sync(up.write, bytes(buf))
                buf.clear()
        if buf:
            await anyio.to_thread.run_sync(up.write, bytes(buf))
        result = await anyio.to_thread.run_sync(up.finish)
    except TooLarge:
        up.discard()
        raise ApiError(413, "too_large", f"recording larger than the {cap}-byte limit") from None
    except BaseException:
        up.discard()
        raise
    try:
        err: ApiError | None = None
        if result.sha256 != digest:
            err = ApiError(422, "digest_mismatch", "uploaded bytes do not hash to X-Content-SHA256")
        elif not result.ok:
            where = f" at line {result.line}" if result.line else ""
            err = ApiError(422, "recording_invalid", f"recording does not verify{where}: {result.error}")
        elif result.header is None or result.header.get("session_id") != session_id:
            err = ApiError(422, "recording_invalid", "recording header is for another session")
        elif mismatch := [k for k, v in expected.items() if result.header.get(k) != v]:
            err = ApiError(422, "recording_invalid", f"header does not match the session: {mismatch}")
        if err is not None:
            await anyio.to_thread.run_sync(_refuse, broker, identity, session_id, request_id, err)
            raise err
        receipt, created = await anyio.to_thread.run_sync(
            _store, broker, identity, session_id, result, request_id
        )
    finally:
        result.tmp_path.unlink(missing_ok=True)
    return JSONResponse(receipt.model_dump(mode="json"), status_code=201 if created else 200)


def _download_path(broker: Broker, identity: Identity, session_id: str) -> tuple[str, str]:
    with broker.sessions() as db:
        row = sessions.visible_session(broker, db, identity, session_id)
        if row.recording_sha256 is None:
            raise ApiError(404, "not_found", "no recording stored for this session")
        path = broker.recordings.path_for(row.recording_sha256)
        repo.audit(
            db,
            at=utcnow(),
            action="recording.download",
            outcome="success",
            actor=identity.subject,
            session_id=row.id,
            detail={"sha256": row.recording_sha256},
        )
        db.commit()
        return str(path), row.recording_sha256


@router.get(
    "/{session_id}/recording",
    response_class=FileResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def download(
    session_id: str,
    broker: BrokerDep,
    identity: CurrentIdentity,
    format: Annotated[Literal["pcigate", "asciicast"], Query()] = "pcigate",
) -> Response:
    """The recording as stored (``format=pcigate``: hash-chained, what ``pcigate replay`` and the audit
    verify), or, for a terminal session, as a plain asciicast v2 file for asciinema's players
    (``format=asciicast``: the chain's digests and pcigate's own events left out), streamed."""
    path, sha = await anyio.to_thread.run_sync(_download_path, broker, identity, session_id)
    if not await anyio.to_thread.run_sync(os.path.exists, path):
        raise ApiError(404, "not_found", "recording file missing from the store")
    if format == "asciicast":
        first = await anyio.to_thread.run_sync(_first_line, path)
        if b'"kind":"ssh"' not in first:
            raise ApiError(422, "validation_error", "only a terminal (ssh) session has an asciicast form")
        return StreamingResponse(
            iterate_in_threadpool(_cast_lines(path)),
            media_type="application/x-asciicast",
            headers={"Content-Disposition": f'attachment; filename="{session_id}.cast"'},
        )
    return FileResponse(
        path,
        media_type="application/x-ndjson",
        filename=f"{session_id}.rec",
        headers={"X-Content-SHA256": sha},
    )


def _first_line(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.readline(1 << 20)


def _cast_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from asciicast_lines(fh)
