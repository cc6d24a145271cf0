"""The test IdP (npm oidc-provider, tests/stack/idp/server.mjs) behaves like the real OP the CLI and broker
expect: auth code + PKCE S256 (enforced), device flow, refresh tokens, groups in the ID token, workload
JWTs."""

from __future__ import annotations

import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet
from tests.stack.idp import (
    DEVICE_GRANT,
    WORKLOAD_AUDIENCE,
    Idp,
    IdpError,
    decode_header,
    new_rsa_key,
    pkce_pair,
    start_idp,
)
from tests.stack.ports import free_port


def verify(idp: Idp, token: str) -> dict[str, Any]:
    """Check the signature against the IdP's published JWKS (as the broker does); return the claims."""
    jwks = httpx.get(str(idp.discovery["jwks_uri"]), timeout=5).json()
    tok = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256"])
    return dict(tok.claims)


def query(url: str) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


# ------------------------------------------------------------------------------------------------ discovery
def test_discovery(idp: Idp) -> None:
    d = idp.discovery
    assert d["issuer"] == idp.issuer
    assert idp.issuer.startswith("http://127.0.0.1:")
    assert d["code_challenge_methods_supported"] == ["S256"]
    assert "device_authorization_endpoint" in d
    assert {"authorization_code", "refresh_token", DEVICE_GRANT, "client_credentials"} <= set(
        d["grant_types_supported"])
    assert {"openid", "groups", "offline_access", "email", "profile"} <= set(d["scopes_supported"])
    assert "groups" in d["claims_supported"]
    jwks = httpx.get(d["jwks_uri"], timeout=5).json()
    assert [k["kid"] for k in jwks["keys"]] == [idp.kid]
    assert all("d" not in k for k in jwks["keys"]), "private key material published"


# ------------------------------------------------------------------------------------- auth code + PKCE
def test_auth_code_pkce_id_token_claims(idp: Idp) -> None:
    t0 = time.monotonic()
    tokens = idp.login("alice")
    elapsed = time.monotonic() - t0
    assert elapsed < 5
    assert {"id_token", "access_token", "refresh_token"} <= set(tokens)
    claims = verify(idp, tokens["id_token"])
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == "pcigate"
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["dba"]
    assert claims["email"] == "alice@example.test"
    assert claims["name"] == "Alice Anders"
    assert claims["preferred_username"] == "alice"
    assert claims["exp"] - claims["iat"] == idp.id_token_ttl
    assert decode_header(tokens["id_token"])["kid"] == idp.kid


@pytest.mark.parametrize(("user", "groups"), [
    ("bob", ["developers"]), ("carol", ["dba", "approvers"]), ("audrey", ["auditors"]),
])
def test_groups_per_user(idp: Idp, user: str, groups: list[str]) -> None:
    assert verify(idp, idp.id_token(user))["groups"] == groups


def test_callback_is_delivered_to_loopback_listener_on_any_port(idp: Idp) -> None:
    got: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            got.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"signed in")

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.handle_request, daemon=True)
    t.start()
    try:
        verifier, challenge = pkce_pair()
        redirect = f"http://127.0.0.1:{server.server_port}/callback"
        url = idp.authorize_url(redirect_uri=redirect, code_challenge=challenge, state="st4te")
        cb = idp.complete_auth_code(url, "alice")
        t.join(5)
    finally:
        server.server_close()
    assert cb.startswith(redirect + "?")
    assert len(got) == 1
    q = query(got[0])
    assert q["state"] == "st4te"
    assert q["iss"] == idp.issuer
    r = idp.token_request({"grant_type": "authorization_code", "code": q["code"], "redirect_uri": redirect,
                           "code_verifier": verifier, "client_id": "pcigate"})
    assert r.status_code == 200, r.text


def test_pkce_is_required(idp: Idp) -> None:
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    url = idp.authorize_url(redirect_uri=redirect, code_challenge=None)
    cb = idp.complete_auth_code(url, "alice", deliver=False)
    q = query(cb)
    assert q["error"] == "invalid_request"
    assert "PKCE" in q["error_description"]
    assert "code" not in q


def test_pkce_plain_is_refused(idp: Idp) -> None:
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    url = idp.authorize_url(redirect_uri=redirect, code_challenge="x" * 43,
                            extra={"code_challenge_method": "plain"})
    q = query(idp.complete_auth_code(url, "alice", deliver=False))
    assert q["error"] == "invalid_request"


def test_wrong_code_verifier_is_refused(idp: Idp) -> None:
    _verifier, challenge = pkce_pair()
    redirect = f"http://127.0.0.1:{free_port()}/callback"
    url = idp.authorize_url(redirect_uri=redirect, code_challenge=challenge)
    q = query(idp.complete_auth_code(url, "alice", deliver=False))
    other, _ = pkce_pair()
    r = idp.token_request({"grant_type": "authorization_code", "code": q["code"], "redirect_uri": redirect,
                           "code_verifier": other, "client_id": "pcigate"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"


def test_non_loopback_redirect_is_refused(idp: Idp) -> None:
    _, challenge = pkce_pair()
    url = idp.authorize_url(redirect_uri="http://attacker.example/callback", code_challenge=challenge)
    with pytest.raises(IdpError, match="redirect_uri"):
        idp.complete_auth_code(url, "alice", deliver=False)


def test_wrong_password_is_refused(idp: Idp) -> None:
    with pytest.raises(IdpError, match="login refused"):
        idp.login("alice", "not-the-password")
    with pytest.raises(IdpError, match="login refused"):
        idp.login("mallory", "whatever")


# -------------------------------------------------------------------------------------------- device flow
def test_device_flow(idp: Idp) -> None:
    r = httpx.post(str(idp.discovery["device_authorization_endpoint"]),
                   data={"client_id": "pcigate", "scope": "openid profile email groups offline_access"},
                   timeout=5)
    assert r.status_code == 200, r.text
    dev = r.json()
    assert dev["verification_uri"] == f"{idp.issuer}/device"
    assert dev["interval"] == 1
    poll = {"grant_type": DEVICE_GRANT, "device_code": dev["device_code"], "client_id": "pcigate"}
    pending = idp.token_request(poll)
    assert pending.status_code == 400
    assert pending.json()["error"] == "authorization_pending"

    idp.approve_device(dev["user_code"], "carol")
    r = idp.token_request(poll)
    assert r.status_code == 200, r.text
    tokens = r.json()
    claims = verify(idp, tokens["id_token"])
    assert claims["sub"] == "carol"
    assert claims["groups"] == ["dba", "approvers"]
    assert claims["aud"] == "pcigate"
    assert "refresh_token" in tokens
    # the device code is single use
    assert idp.token_request(poll).status_code == 400


def test_device_flow_wrong_code_and_wrong_password(idp: Idp) -> None:
    with pytest.raises(IdpError, match="refused"):
        idp.approve_device("BCDF-GHJK", "alice")
    r = httpx.post(str(idp.discovery["device_authorization_endpoint"]),
                   data={"client_id": "pcigate", "scope": "openid groups"}, timeout=5)
    with pytest.raises(IdpError, match="login refused"):
        idp.approve_device(r.json()["user_code"], "alice", "wrong")


# ------------------------------------------------------------------------------------------ refresh token
def test_refresh_token(idp: Idp) -> None:
    tokens = idp.login("bob")
    r = idp.token_request({"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                           "client_id": "pcigate"})
    assert r.status_code == 200, r.text
    fresh = r.json()
    claims = verify(idp, fresh["id_token"])
    assert claims["sub"] == "bob"
    assert claims["groups"] == ["developers"]
    assert fresh["refresh_token"] != tokens["refresh_token"]  # rotated for the public client
    # the rotated (old) refresh token is no longer usable
    again = idp.token_request({"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                               "client_id": "pcigate"})
    assert again.status_code == 400


def test_short_id_token_ttl(tmp_path: Path) -> None:
    t0 = time.monotonic()
    short = start_idp(tmp_path / "idp", id_token_ttl=3)
    started = time.monotonic() - t0
    try:
        claims = verify(short, short.id_token("alice"))
        assert claims["exp"] - claims["iat"] == 3
    finally:
        short.stop()
    assert started < 10
    assert not short.alive()


# ---------------------------------------------------------------------------------------- workload tokens
def test_workload_token(idp: Idp) -> None:
    token = idp.workload_token("ci-bot")
    header = decode_header(token)
    assert header["alg"] == "RS256"
    assert header["typ"] == "at+jwt"
    assert header["kid"] == idp.kid
    claims = verify(idp, token)
    assert claims["iss"] == idp.issuer
    assert claims["sub"] == "ci-bot"
    assert claims["client_id"] == "ci-bot"
    assert claims["aud"] == WORKLOAD_AUDIENCE == idp.workload_audience
    assert claims["groups"] == ["dba"]
    assert claims["pcigate_workload"] is True
    assert 0 < claims["exp"] - time.time() <= 300
    assert "email" not in claims

    dev = verify(idp, idp.workload_token("ci-dev"))
    assert dev["groups"] == ["developers"]


def test_workload_token_needs_the_secret(idp: Idp) -> None:
    with pytest.raises(IdpError, match="invalid_client"):
        idp.workload_token("ci-bot", "wrong-secret")
    r = idp.token_request({"grant_type": "client_credentials", "client_id": "pcigate"})
    assert r.status_code in (400, 401)


# ------------------------------------------------------------------------------------------------- mint
def test_mint(idp: Idp) -> None:
    now = int(time.time())
    expired = idp.mint(idp.claims_for("alice", iat=now - 600, exp=now - 300))
    claims = verify(idp, expired)  # signature valid; only the claims make it unacceptable
    assert claims["exp"] < now
    wrong_aud = idp.mint(idp.claims_for("alice", aud="someone-else"))
    assert verify(idp, wrong_aud)["aud"] == "someone-else"

    forged = idp.mint(idp.claims_for("alice"), key=new_rsa_key(kid=idp.kid))
    with pytest.raises(BadSignatureError):
        verify(idp, forged)

    unsigned = idp.mint(idp.claims_for("alice"), alg="none")
    assert unsigned.endswith(".")
    assert decode_header(unsigned)["alg"] == "none"
    hs = idp.mint(idp.claims_for("alice"), key=b"k" * 32, alg="HS256")
    assert decode_header(hs)["alg"] == "HS256"
