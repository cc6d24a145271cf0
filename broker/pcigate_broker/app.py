"""``create_app(settings)``: wiring only. Builds the Broker state, routers, error handlers, middleware,
reaper.

Every error leaves as ``{"error": {"code", "message"}}`` (pcigate.models.ErrorBody): API errors, request
validation (422 ``validation_error``), unknown routes (404 ``not_found``), oversized bodies
(413 ``too_large``)
and unexpected exceptions (500 ``internal``, with the request id, never the exception text).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcigate.models import ErrorBody, ErrorCode, ErrorDetail

from . import __version__, audit_context
from .api.routes import audit, identity, meta, recordings, requests, sessions
from .audit import SigningKey
from .auth import TokenValidator
from .errors import ApiError
from .notify import Notifier
from .reaper import run_forwarder, run_reaper
from .recordings import RecordingStore
from .settings import ConfigError, Settings
from .state import Broker, utcnow
from .store.db import make_engine, make_sessionmaker
from .vault import Vault

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # every request body except recording uploads (capped by max_recording_bytes)
_RECORDING_PUT = re.compile(r"^/v1/sessions/[^/]+/recording$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def error_response(
    status: int,
    code: ErrorCode,
    message: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``; FastAPI re-raises HTTPExceptions from body reading; the handler: 413."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class EdgeMiddleware:
    """Request ids (``X-Request-ID`` in and out) and the request body cap, as plain ASGI
    (streams untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid
        client = scope.get("client")
        audit_context.current.set(audit_context.Caller(
            source=f"{client[0]}:{client[1]}" if client else None))
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        limited = not (scope["method"] == "PUT" and _RECORDING_PUT.match(scope["path"]))
        if limited:
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                await error_response(413, "too_large", "request body too large")(scope, receive, send_with_id)
                return
            seen = 0

            async def limited_receive() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > MAX_BODY_BYTES:
                        raise _BodyTooLarge()
                return message

            try:
                await self.app(scope, limited_receive, send_with_id)
            except _BodyTooLarge:
                if not started:
                    await error_response(413, "too_large", "request body too large")(
                        scope, receive, send_with_id
                    )
            return
        await self.app(scope, receive, send_with_id)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",)) or "request"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {first.get('msg', 'invalid')}{more}".replace("\n", " ")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "validation_error", _validation_message(exc))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        code: ErrorCode
        if status == 404:
            code, msg = "not_found", "no such route"
        elif status == 405:
            code, msg = "validation_error", "method not allowed"
        elif status == 401:
            code, msg = "unauthenticated", "authentication required"
        elif status == 413:
            code, msg = "too_large", "request body too large"
        elif 400 <= status < 500:
            code, msg = "validation_error", str(exc.detail)
        else:
            code, msg = "internal", "internal error"
        return error_response(status, code, msg, dict(exc.headers) if exc.headers else None)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "?")
        log.error(
            "unhandled %s in %s %s (request %s)",
            type(exc).__name__,
            request.method,
            request.url.path,
            rid,
            exc_info=exc,
        )
        return error_response(500, "internal", f"internal error (request {rid})")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _audit_key(settings: Settings) -> SigningKey | None:
    path = settings.audit.signing_key_file
    if path is None:
        return None
    try:
        return SigningKey.load(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError([f"audit.signing_key_file: cannot load an ed25519 private key from {path}: "
                           f"{getattr(exc, 'strerror', None) or exc}"]) from None


def _audit_start(broker: Broker) -> None:
    """A ``broker.start`` event: which configuration (policy) this replica runs with, by digest."""
    from .policy import canonical
    from .store import repo

    cfg = broker.settings.model_dump(mode="json", exclude={"vault": {"token", "secret_id"}})
    digest = hashlib.sha256(canonical(cfg)).hexdigest()
    try:
        with broker.sessions() as db:
            repo.audit(db, at=utcnow(), action="broker.start", outcome="success", actor="broker",
                       detail={"version": __version__, "config_sha256": digest,
                               "targets": sorted(broker.settings.targets),
                               "audit_key": broker.audit_key.key_id if broker.audit_key else None})
            db.commit()
    except Exception:
        log.exception("could not write the broker.start audit event")


def build_broker(settings: Settings) -> Broker:
    audit_key = _audit_key(settings)
    engine = make_engine(settings.storage.database_url)
    return Broker(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        validator=TokenValidator(settings.oidc),
        vault=Vault(settings.vault),
        recordings=RecordingStore(settings.storage.recordings_dir),
        notifier=Notifier(settings.notifications.webhooks) if settings.notifications.webhooks else None,
        audit_key=audit_key,
    )


def create_app(settings: Settings, *, broker: Broker | None = None, run_reaper_task: bool = True) -> FastAPI:
    """The ASGI app. Migrations are not run here (``pcigate-broker serve``/``migrate`` do that)."""
    state = broker or build_broker(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        _audit_start(state)
        tasks: list[asyncio.Task[Any]] = []
        if run_reaper_task:
            tasks.append(asyncio.create_task(run_reaper(state), name="pcigate-reaper"))
            if state.settings.audit.forward:
                tasks.append(asyncio.create_task(run_forwarder(state), name="pcigate-siem"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if broker is None:
                state.close()

    app = FastAPI(title="pcigate broker", version=__version__, lifespan=lifespan)
    app.state.broker = state
    _install_error_handlers(app)
    app.include_router(meta.router)
    app.include_router(identity.router)
    app.include_router(sessions.router)
    app.include_router(recordings.router)
    app.include_router(requests.router)
    app.include_router(audit.router)
    app.add_middleware(EdgeMiddleware)
    return app
