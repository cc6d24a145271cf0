"""Error mapping of ``BrokerClient``.

These tests use ``httpx.MockTransport``: they check only the pure HTTP → exception mapping done in one place
in the client (status codes, error bodies, transport failures). Real broker behaviour is covered by
``tests/integration/test_cli_*.py`` against the real stack.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest

from pcigate.client import BrokerClient
from pcigate.errors import (
    AccessDenied,
    AuthRequired,
    BrokerUnavailable,
    Conflict,
    DatabaseUnavailable,
    ExitCode,
    NotFound,
    PcigateError,
    RecordingError,
    UsageError,
    VaultUnavailable,
)

URL = "http://broker.test:8600"


def client_for(handler, dropped: list[bool] | None = None) -> BrokerClient:
    def drop() -> None:
        if dropped is not None:
            dropped.append(True)

    return BrokerClient(
        URL, token=lambda: "tok", on_unauthorized=drop, transport=httpx.MockTransport(handler)
    )


def error(status: int, code: str, message: str = "nope") -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


@pytest.mark.parametrize(
    ("status", "code", "exc", "exit_code"),
    [
        (403, "forbidden", AccessDenied, ExitCode.DENIED),
        (403, "level_not_allowed", AccessDenied, ExitCode.DENIED),
        (404, "unknown_target", NotFound, ExitCode.NOT_FOUND),
        (404, "not_found", NotFound, ExitCode.NOT_FOUND),
        (503, "vault_unavailable", VaultUnavailable, ExitCode.VAULT_UNAVAILABLE),
        (503, "database_unavailable", DatabaseUnavailable, ExitCode.DATABASE_UNAVAILABLE),
        (422, "digest_mismatch", RecordingError, ExitCode.RECORDING_ERROR),
        (422, "validation_error", UsageError, ExitCode.USAGE),
        (409, "conflict", Conflict, ExitCode.CONFLICT),  # a state conflict (recordings: below)
        (403, "grant_required", AccessDenied, ExitCode.DENIED),
        (403, "mfa_required", AuthRequired, ExitCode.AUTH_REQUIRED),
        (500, "internal", BrokerUnavailable, ExitCode.BROKER_UNAVAILABLE),
    ],
)
def test_error_body_mapping(status: int, code: str, exc: type[PcigateError], exit_code: ExitCode) -> None:
    with client_for(lambda r: error(status, code, "the message")) as c, pytest.raises(exc) as err:
        c.targets()
    assert err.value.exit_code == exit_code
    assert err.value.message == "the message"


def test_conflict_on_a_recording_upload_is_a_recording_error(tmp_path: Path) -> None:
    rec = tmp_path / "r.rec"
    rec.write_bytes(b"x")
    with client_for(lambda r: error(409, "conflict", "another recording")) as c, \
            pytest.raises(RecordingError) as err:
        c.upload_recording("s1", rec, "0" * 64)
    assert err.value.exit_code == ExitCode.RECORDING_ERROR


@pytest.mark.parametrize(("status", "exc"), [(502, BrokerUnavailable), (404, NotFound), (403, AccessDenied)])
def test_status_without_body(status: int, exc: type[PcigateError]) -> None:
    with client_for(lambda r: httpx.Response(status, text="<html>proxy</html>")) as c, pytest.raises(exc):
        c.whoami()


def test_401_drops_token_and_hints_login() -> None:
    dropped: list[bool] = []
    with (
        client_for(lambda r: error(401, "token_invalid", "token expired"), dropped) as c,
        pytest.raises(AuthRequired) as err,
    ):
        c.whoami()
    assert dropped == [True]
    assert err.value.hint == "run: pcigate login"
    assert err.value.exit_code == ExitCode.AUTH_REQUIRED


def test_connection_refused_is_broker_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with client_for(refuse) as c, pytest.raises(BrokerUnavailable) as err:
        c.targets()
    assert str(err.value) == f"cannot reach the broker at {URL}"


def test_timeout_is_broker_unavailable() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with client_for(slow) as c, pytest.raises(BrokerUnavailable):
        c.heartbeat("s1")


def test_garbled_success_body() -> None:
    with client_for(lambda r: httpx.Response(200, json={"nope": 1})) as c, pytest.raises(BrokerUnavailable):
        c.whoami()


def test_bearer_and_unauthenticated_config() -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.path] = request.headers.get("authorization")
        if request.url.path == "/v1/config/oidc":
            return httpx.Response(
                200,
                json={"issuer": "http://idp", "client_id": "pcigate", "scopes": ["openid"], "audience": "x"},
            )
        return httpx.Response(200, json=[])

    with client_for(handler) as c:
        c.oidc_config()
        assert c.targets() == []
    assert seen == {"/v1/config/oidc": None, "/v1/targets": "Bearer tok"}


def test_no_token_provider_is_auth_required() -> None:
    client = BrokerClient(URL, transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    with client as c, pytest.raises(AuthRequired):
        c.whoami()


def test_upload_streams_with_digest(tmp_path: Path) -> None:
    data = b"".join(b'{"e":"stmt","n":%d}\n' % i for i in range(50_000))
    path = tmp_path / "s.rec"
    path.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    got: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        got["len"] = request.headers["content-length"]
        got["sha"] = request.headers["x-content-sha256"]
        got["ok"] = hashlib.sha256(body).hexdigest() == sha
        return httpx.Response(
            200, json={"session_id": "s", "sha256": sha, "size": len(body), "events": 50_000}
        )

    progress: list[int] = []
    with client_for(handler) as c:
        receipt = c.upload_recording("s", path, sha, progress.append)
    assert receipt.events == 50_000
    assert got == {"len": str(len(data)), "sha": sha, "ok": True}
    assert sum(progress) == len(data)
    assert len(progress) > 1  # read in chunks from the file, not in one piece


def test_list_sessions_query() -> None:
    from datetime import UTC, datetime

    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return httpx.Response(200, content=json.dumps({"items": [], "next_cursor": None}))

    with client_for(handler) as c:
        c.list_sessions(user="alice", since=datetime(2025, 1, 1, tzinfo=UTC), limit=5)
    assert seen[0].params["user"] == "alice"
    assert seen[0].params["since"] == "2025-01-01T00:00:00+00:00"
    assert seen[0].params["limit"] == "5"
