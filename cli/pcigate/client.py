"""``BrokerClient``: the broker HTTP API as typed methods; transport and HTTP errors are mapped here, once.

* connection refused / timeout / network failure → :class:`BrokerUnavailable` ("cannot reach the broker")
* an error body ``{"error": {"code", "message"}}`` → ``errors.BROKER_ERROR_CLASSES[code]``
* HTTP 401 → the bearer is refreshed once (``on_refresh``) and the call retried; a second 401 (or nothing to
  refresh with) drops the stored sign-in (``on_unauthorized``) and raises :class:`AuthRequired`
* the broker's error code is kept on the raised exception as ``broker_code`` (e.g. ``session_closed``)
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from pcigate import __version__
from pcigate.config import SESSION_ID
from pcigate.errors import (
    BROKER_ERROR_CLASSES,
    AccessDenied,
    AuthRequired,
    BrokerUnavailable,
    Conflict,
    NotFound,
    PcigateError,
    RecordingError,
    UsageError,
)
from pcigate.models import (
    ErrorBody,
    Identity,
    OidcClientConfig,
    RecordingReceipt,
    SessionCreate,
    SessionOpened,
    SessionPage,
    SessionSummary,
    TargetInfo,
)

if TYPE_CHECKING:
    from pcigate.access_models import AccessRequestCreate, AccessRequestInfo, RequestPage
    from pcigate.audit_models import AuditPage, AuditVerification

M = TypeVar("M", bound=BaseModel)
TokenProvider = Callable[[], str]
LOGIN_HINT = "run: pcigate login"
UPLOAD_CHUNK = 256 * 1024


@functools.cache
def _targets_adapter() -> TypeAdapter[list[TargetInfo]]:
    """Made on first use: building it builds TargetInfo's schema (~7 ms), which connect never needs."""
    return TypeAdapter(list[TargetInfo])


def _sid(session_id: str) -> str:
    """A session id as one URL path segment. Ids are URL-safe tokens; anything else a user may type (empty,
    ``..``, ``?a=b``, ``../targets``) names no session, and must not become another route."""
    if not SESSION_ID.fullmatch(session_id) or session_id in (".", ".."):
        raise NotFound("no such session")
    return session_id


def _seg(value: str) -> str:
    """One URL path segment (an id typed by the user may hold anything)."""
    from urllib.parse import quote

    return quote(value, safe="")


def _tls_context(base_url: str) -> ssl.SSLContext | bool:
    """httpx's default (the CA bundle) for an https:// broker. A plain http:// broker (loopback only, see
    ``config.check_broker_url``) never sees TLS: no redirects are followed and every request is relative to
    ``base_url``. It gets a context that trusts no certificate, not one loading the bundle (~25 ms)."""
    if base_url.lower().startswith("http://"):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return True


class BrokerClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: TokenProvider | None = None,
        on_unauthorized: Callable[[], None] | None = None,
        on_refresh: Callable[[], bool] | None = None,
        timeout: float = 15.0,
        connect_timeout: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        auth_hint: str = LOGIN_HINT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._on_unauthorized = on_unauthorized
        self._on_refresh = on_refresh
        self._auth_hint = auth_hint
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            headers={"User-Agent": f"pcigate/{__version__}"},
            transport=transport,
            follow_redirects=False,
            verify=_tls_context(self.base_url),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def bearer(self) -> str:
        """The bearer the next call sends (a stored sign-in is read from the keyring, refreshed when due)."""
        if self._token is None:
            raise AuthRequired("not signed in", hint=self._auth_hint)
        return self._token()

    # the one place errors are mapped ----------------------------------------------------------------------
    def _request(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        """``content`` may be a callable returning the body (a fresh stream for a retry)."""
        headers: dict[str, str] = dict(kwargs.pop("headers", None) or {})
        content = kwargs.pop("content", None)
        retried = False
        while True:
            if auth:
                headers["Authorization"] = f"Bearer {self.bearer()}"
            body = content() if callable(content) else content
            try:
                response = self._http.request(method, path, headers=headers, content=body, **kwargs)
            except httpx.TransportError as exc:  # connect/read/write errors, timeouts, protocol errors
                raise BrokerUnavailable(f"cannot reach the broker at {self.base_url}") from exc
            if (
                response.status_code == 401
                and auth
                and not retried
                and self._on_refresh is not None
                and (content is None or callable(content))
                and self._on_refresh()
            ):
                retried = True  # a fresh bearer, once; only then is the sign-in dropped
                continue
            if response.status_code >= 400:
                self._raise_for(response)
            return response

    def _raise_for(self, response: httpx.Response) -> None:
        status = response.status_code
        code: str | None = None
        message = f"the broker answered HTTP {status}"
        try:
            body = ErrorBody.model_validate_json(response.content)
        except ValidationError:
            pass
        else:
            code, message = body.error.code, body.error.message
        if status == 401:
            if self._on_unauthorized is not None:
                self._on_unauthorized()
            raise AuthRequired(message if code else "the broker refused the sign-in", hint=self._auth_hint)
        cls: type[PcigateError] | None = BROKER_ERROR_CLASSES.get(code) if code else None
        if cls is None:
            if code == "conflict":
                # a different recording already stored for the session; otherwise a state conflict
                cls = RecordingError if response.request.url.path.endswith("/recording") else Conflict
            elif status >= 500:
                cls = BrokerUnavailable
                if not code:
                    message = f"the broker at {self.base_url} failed (HTTP {status})"
            elif status == 403:
                cls = AccessDenied
            elif status == 404:
                cls = NotFound
            elif status in (400, 422):
                cls = UsageError
            else:
                cls = PcigateError
        hint = "see: pcigate targets" if code in ("level_not_allowed", "unknown_target") else None
        if code == "mfa_required":
            hint = "sign in again with a second factor: pcigate login"
        error = cls(message, hint=hint)
        error.broker_code = code  # type: ignore[attr-defined]
        raise error

    def _model(self, model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise BrokerUnavailable(
                f"the broker at {self.base_url} sent an unexpected answer to {response.request.url.path}"
            ) from exc

    # endpoints ---------------------------------------------------------------------------------------------
    def healthz(self) -> bool:
        return self._request("GET", "/healthz", auth=False).status_code == 200

    def oidc_config(self) -> OidcClientConfig:
        return self._model(OidcClientConfig, self._request("GET", "/v1/config/oidc", auth=False))

    def whoami(self) -> Identity:
        return self._model(Identity, self._request("GET", "/v1/whoami"))

    def targets(self, *, include_policy: bool = False) -> list[TargetInfo]:
        """Reachable targets; with ``include_policy`` each level carries the data-path policy it would get."""
        params = {"include_policy": "true"} if include_policy else None
        response = self._request("GET", "/v1/targets", params=params)
        try:
            items = _targets_adapter().validate_json(response.content)
        except ValidationError as exc:
            raise BrokerUnavailable(f"the broker at {self.base_url} sent an unexpected target list") from exc
        if include_policy and any(lv.policy is None for t in items for lv in t.levels):
            raise BrokerUnavailable(f"the broker at {self.base_url} does not report data-path policies")
        return items

    def open_session(self, request: SessionCreate) -> SessionOpened:
        body = request.model_dump(mode="json", exclude_none=True)
        return self._model(SessionOpened, self._request("POST", "/v1/sessions", json=body))

    def heartbeat(self, session_id: str) -> SessionSummary:
        path = f"/v1/sessions/{_sid(session_id)}/heartbeat"
        return self._model(SessionSummary, self._request("POST", path))

    def end_session(self, session_id: str) -> SessionSummary:
        return self._model(SessionSummary, self._request("POST", f"/v1/sessions/{_sid(session_id)}/end"))

    def upload_recording(
        self,
        session_id: str,
        path: Path,
        sha256: str,
        progress: Callable[[int], None] | None = None,
    ) -> RecordingReceipt:
        """Stream the file (never fully in memory) with its digest in ``X-Content-SHA256``."""
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(UPLOAD_CHUNK):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

        response = self._request(
            "PUT",
            f"/v1/sessions/{_sid(session_id)}/recording",
            content=chunks,
            headers={
                "X-Content-SHA256": sha256,
                "Content-Type": "application/x-ndjson",
                "Content-Length": str(size),
            },
        )
        return self._model(RecordingReceipt, response)

    def list_sessions(
        self,
        *,
        user: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        params: dict[str, str] = {}
        if user:
            params["user"] = user
        if target:
            params["target"] = target
        if since:
            params["since"] = since.isoformat()
        if until:
            params["until"] = until.isoformat()
        if limit:
            params["limit"] = str(limit)
        if cursor:
            params["cursor"] = cursor
        return self._model(SessionPage, self._request("GET", "/v1/sessions", params=params))

    def get_session(self, session_id: str) -> SessionSummary:
        return self._model(SessionSummary, self._request("GET", f"/v1/sessions/{_sid(session_id)}"))

    # audit log (pcigate.audit_models) -------------------------------------------------------------------
    def audit_events(self, *, since: datetime | None = None, until: datetime | None = None,
                     actor: str | None = None, target: str | None = None, action: str | None = None,
                     after: int = 0, limit: int = 500) -> AuditPage:
        from pcigate.audit_models import AuditPage

        params: dict[str, str] = {"after": str(after), "limit": str(limit)}
        for key, value in (("since", since), ("until", until)):
            if value is not None:
                params[key] = value.isoformat()
        for key, text in (("actor", actor), ("target", target), ("action", action)):
            if text:
                params[key] = text
        return self._model(AuditPage, self._request("GET", "/v1/audit", params=params))

    def download_recording(self, session_id: str, sink: Callable[[bytes], object],
                           format: str = "pcigate") -> tuple[int, str]:
        """Stream a session's recording into ``sink`` (never whole in memory). Returns (bytes, sha256 hex).
        ``format="asciicast"``: a terminal session as a plain asciicast v2 file (for asciinema's players)."""
        import hashlib

        headers = {"Authorization": f"Bearer {self.bearer()}"}
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream("GET", f"/v1/sessions/{_sid(session_id)}/recording", headers=headers,
                                   params={"format": format} if format != "pcigate" else None) as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise_for(r)
                for chunk in r.iter_bytes(UPLOAD_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    sink(chunk)
        except httpx.TransportError as exc:
            raise BrokerUnavailable(f"cannot reach the broker at {self.base_url}") from exc
        return size, digest.hexdigest()

    def audit_verify(self, since: datetime | None = None) -> AuditVerification:
        from pcigate.audit_models import AuditVerification

        params = {"since": since.isoformat()} if since is not None else None
        return self._model(AuditVerification,
                           self._request("POST", "/v1/audit/verify", params=params, timeout=600))

    # just-in-time access (pcigate.access_models) ---------------------------------------------------------
    def create_request(self, request: AccessRequestCreate) -> AccessRequestInfo:
        from pcigate.access_models import AccessRequestInfo

        body = request.model_dump(mode="json", exclude_none=True)
        return self._model(AccessRequestInfo, self._request("POST", "/v1/requests", json=body))

    def list_requests(self, *, pending: bool = False, mine: bool = False) -> RequestPage:
        from pcigate.access_models import RequestPage

        params = {"pending": str(pending).lower(), "mine": str(mine).lower(), "limit": "200"}
        return self._model(RequestPage, self._request("GET", "/v1/requests", params=params))

    def get_request(self, request_id: str) -> AccessRequestInfo:
        from pcigate.access_models import AccessRequestInfo

        return self._model(AccessRequestInfo, self._request("GET", f"/v1/requests/{_seg(request_id)}"))

    def request_action(self, request_id: str, action: str, comment: str | None = None) -> AccessRequestInfo:
        """``action``: approve, deny, cancel or revoke."""
        from pcigate.access_models import AccessRequestInfo

        body = {} if action == "cancel" else {"comment": comment}
        path = f"/v1/requests/{_seg(request_id)}/{action}"
        return self._model(AccessRequestInfo, self._request("POST", path, json=body if body else None))
