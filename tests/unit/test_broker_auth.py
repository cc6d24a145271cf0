"""Bearer-token validation against a real (tiny) OIDC issuer over HTTP: keys, claims, algorithms, rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey
from tests.integration.test_broker_support import WORKLOAD_AUD, MiniIssuer, broker_toml

from pcigate.models import Identity
from pcigate_broker.app import create_app
from pcigate_broker.auth import IdpUnavailable, TokenInvalid, TokenValidator
from pcigate_broker.settings import load_settings
from pcigate_broker.store.db import make_engine, upgrade
from pcigate_broker.store.repo import audit_events


@pytest.fixture
def issuer() -> Iterator[MiniIssuer]:
    iss = MiniIssuer()
    yield iss
    iss.stop()


def _validator(issuer: MiniIssuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               **kw: Any) -> TokenValidator:
    monkeypatch.setenv("PCIGATE_BROKER_VAULT_TOKEN", "t")
    cfg = tmp_path / "broker.toml"
    cfg.write_text(broker_toml(issuer=issuer.url, db_url=f"sqlite:///{tmp_path}/b.db",
                               recordings_dir=tmp_path / "rec", **kw))
    return TokenValidator(load_settings(cfg).oidc)


@pytest.fixture
def validator(issuer: MiniIssuer, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[TokenValidator]:
    v = _validator(issuer, tmp_path, monkeypatch, jwks_min_refetch=0)
    yield v
    v.close()


def _refused(v: TokenValidator, token: str) -> str:
    with pytest.raises(TokenInvalid) as ei:
        v.validate(token)
    assert token not in str(ei.value)
    return str(ei.value)


def test_valid_token_gives_identity(issuer: MiniIssuer, validator: TokenValidator) -> None:
    ident = validator.validate(issuer.token("alice", ["dba", "ops"]))
    assert isinstance(ident, Identity)
    assert ident.subject == "alice"
    assert ident.name == "Alice"
    assert ident.email == "alice@example.com"
    assert ident.groups == ["dba", "ops"]
    assert ident.client_kind == "human"
    assert ident.issuer == issuer.url


def test_identity_variants(issuer: MiniIssuer, validator: TokenValidator) -> None:
    # audience as a list with the extra audience, workload claim, no groups claim, preferred_username fallback
    tok = issuer.token("bot-1", groups=None, aud=["other", WORKLOAD_AUD], pcigate_workload=True, name=None,
                       preferred_username="ci-bot", email=None)
    ident = validator.validate(tok)
    assert ident.client_kind == "workload"
    assert ident.name == "ci-bot"
    assert ident.email is None
    tok2 = issuer.token("carol", groups=None)
    c = issuer.claims("carol")
    del c["groups"]
    tok2 = jwt.encode({"alg": "RS256", "kid": "k1"}, c, issuer.keys[0])
    assert validator.validate(tok2).groups == []
    # a truthy-but-not-true workload claim does not make a workload
    assert validator.validate(issuer.token("x", pcigate_workload="yes")).client_kind == "human"


def test_expired_nbf_iat(issuer: MiniIssuer, validator: TokenValidator) -> None:
    now = int(time.time())
    assert _refused(validator, issuer.token(exp=now - 60)) == "token expired"
    assert validator.validate(issuer.token(exp=now - 2))  # within the 5 s leeway
    assert _refused(validator, issuer.token(nbf=now + 120)) == "token not valid yet"
    assert _refused(validator, issuer.token(iat=now + 120)) == "token issued in the future"
    assert _refused(validator, issuer.token(exp=None)) == "token has no expiry"
    assert _refused(validator, issuer.token(exp="soon")) == "token has no expiry"


def test_wrong_audience_issuer_subject(issuer: MiniIssuer, validator: TokenValidator) -> None:
    assert _refused(validator, issuer.token(aud="someone-else")) == "wrong audience"
    assert _refused(validator, issuer.token(aud=["a", "b"])) == "wrong audience"
    assert _refused(validator, issuer.token(iss=issuer.url + "/")) == "wrong issuer"
    assert _refused(validator, issuer.token(iss="https://evil.example")) == "wrong issuer"
    assert _refused(validator, issuer.token(sub="")) == "token has no subject"


def test_forged_signature_same_kid(issuer: MiniIssuer, validator: TokenValidator) -> None:
    other = RSAKey.generate_key(2048, parameters={"kid": "k1"})
    assert _refused(validator, issuer.token(key=other)) == "signature does not verify"
    # tampered payload
    good = issuer.token("alice", ["dba"])
    h, p, s = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["groups"] = ["auditors"]
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    assert _refused(validator, f"{h}.{p2}.{s}") == "signature does not verify"


def test_alg_none_and_hs256_refused(issuer: MiniIssuer, validator: TokenValidator) -> None:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    claims = issuer.claims("alice")
    for alg in ("none", "None", "NONE"):
        assert _refused(validator, f"{b64({'alg': alg, 'kid': 'k1'})}.{b64(claims)}.") in (
            "algorithm not allowed", "not a signed JWT")
        signed = f"{b64({'alg': alg, 'kid': 'k1'})}.{b64(claims)}.xx"
        assert _refused(validator, signed) == "algorithm not allowed"
    # HS256 keyed with the issuer's public key (the classic confusion attack)
    pem = issuer.keys[0].as_pem(private=False)
    signing_input = f"{b64({'alg': 'HS256', 'kid': 'k1'})}.{b64(claims)}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    forged = signing_input + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert _refused(validator, forged) == "algorithm not allowed"
    # an allowed-by-joserfc but not configured algorithm
    assert _refused(validator, issuer.token(alg="RS512")) == "algorithm not allowed"


def test_garbage_and_oversize(issuer: MiniIssuer, validator: TokenValidator) -> None:
    assert _refused(validator, "not-a-jwt") == "not a signed JWT"
    assert _refused(validator, "a.b.c") == "malformed token header"
    assert _refused(validator, "x" * 20000) == "token too large"
    big = issuer.token("alice", padding="y" * 17000)
    assert _refused(validator, big) == "token too large"


def test_unknown_kid_refetch_and_rotation(issuer: MiniIssuer, validator: TokenValidator) -> None:
    validator.validate(issuer.token())
    hits = issuer.jwks_hits
    # the issuer rotates: a new EC key appears; the validator learns it on the unknown kid
    new = ECKey.generate_key("P-256", parameters={"kid": "k2", "use": "sig"})
    issuer.keys.append(new)
    ident = validator.validate(issuer.token("bob", key=new))
    assert ident.subject == "bob"
    assert issuer.jwks_hits == hits + 1
    # a kid nobody knows: refused (and refetched once more, rate limit is 0 in this fixture)
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k9"})
    assert _refused(validator, issuer.token(key=stranger)) == "signing key not found (unknown kid)"


def test_unknown_kid_refetch_is_rate_limited(issuer: MiniIssuer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    v = _validator(issuer, tmp_path, monkeypatch, jwks_min_refetch=60)
    v.validate(issuer.token())
    hits = issuer.jwks_hits
    stranger = RSAKey.generate_key(2048, parameters={"kid": "k9"})
    for _ in range(5):
        _refused(v, issuer.token(key=stranger))
    assert issuer.jwks_hits == hits  # just fetched: no refetch storm
    v.close()


def test_idp_down_is_not_a_bad_token(issuer: MiniIssuer, validator: TokenValidator) -> None:
    issuer.down = True
    with pytest.raises(IdpUnavailable):
        validator.validate(issuer.token())
    issuer.down = False
    assert validator.validate(issuer.token()).subject == "alice"
    issuer.down = True  # cached keys keep working while the IdP is down
    assert validator.validate(issuer.token()).subject == "alice"


# --------------------------------------------------------------------------------------- through the HTTP API
@pytest.fixture
def client(issuer: MiniIssuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("PCIGATE_BROKER_VAULT_TOKEN", "t")
    cfg = tmp_path / "broker.toml"
    cfg.write_text(broker_toml(issuer=issuer.url, db_url=f"sqlite:///{tmp_path}/b.db",
                               recordings_dir=tmp_path / "rec"))
    settings = load_settings(cfg)
    engine = make_engine(settings.storage.database_url)
    upgrade(engine)
    engine.dispose()
    with TestClient(create_app(settings, run_reaper_task=False), raise_server_exceptions=False) as c:
        yield c


def test_http_whoami_and_errors(issuer: MiniIssuer, client: TestClient) -> None:
    r = client.get("/v1/whoami", headers={"Authorization": f"Bearer {issuer.token('alice', ['dba'])}"})
    assert r.status_code == 200, r.text
    assert r.json()["subject"] == "alice"
    assert r.headers["x-request-id"]

    r = client.get("/v1/whoami")
    assert r.status_code == 401
    assert r.json() == {"error": {"code": "unauthenticated", "message": "missing bearer token"}}
    assert r.headers["www-authenticate"].startswith("Bearer")

    bad = issuer.token(exp=int(time.time()) - 3600)
    r = client.get("/v1/whoami", headers={"Authorization": f"Bearer {bad}", "X-Request-ID": "req-42"})
    assert r.status_code == 401
    assert r.json() == {"error": {"code": "token_invalid", "message": "token expired"}}
    assert bad not in r.text
    app = client.app
    broker = app.state.broker  # type: ignore[attr-defined]
    with broker.sessions() as db:
        ev = audit_events(db, action="auth.refused")
    assert ev
    assert ev[-1].request_id == "req-42"
    assert ev[-1].message == "token expired"

    r = client.get("/v1/config/oidc")
    assert r.status_code == 200
    assert r.json() == {"issuer": issuer.url, "client_id": "pcigate", "audience": "pcigate",
                        "scopes": ["openid", "profile", "email", "groups", "offline_access"]}
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"
    r = client.delete("/healthz")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "validation_error"
    assert client.get("/openapi.json").status_code == 200


def test_http_targets_visibility(issuer: MiniIssuer, client: TestClient) -> None:
    def targets(groups: list[str]) -> list[dict[str, object]]:
        r = client.get("/v1/targets", headers={"Authorization": f"Bearer {issuer.token('u', groups)}"})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    dba = targets(["dba"])
    assert [t["name"] for t in dba] == ["prod-db"]
    standing = {"request_only": False, "approvals": None}
    assert dba[0]["levels"] == [{"name": "read", "max_ttl_seconds": 3600, **standing},
                                {"name": "admin", "max_ttl_seconds": 1800, **standing}]
    assert dba[0]["default_level"] == "read"
    dev = targets(["dev"])
    assert [t["name"] for t in dev] == ["prod-db", "staging-db"]
    assert targets([]) == []


def test_http_validation_and_body_cap(issuer: MiniIssuer, client: TestClient) -> None:
    h = {"Authorization": f"Bearer {issuer.token('alice', ['dba'])}"}
    r = client.post("/v1/sessions", json={"target": ""}, headers=h)
    assert r.status_code == 422
    body = r.json()
    assert body["error"]["code"] == "validation_error"
    assert "target" in body["error"]["message"]
    r = client.post("/v1/sessions", json={"target": "prod-db", "ttl_seconds": -5}, headers=h)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_error"
    r = client.post("/v1/sessions", content=b"{" + b" " * (2 << 20) + b"}", headers={**h,
                    "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"target": "prod-db", "x": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = client.post("/v1/sessions", content=chunks(), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"
    r = client.post("/v1/sessions", json={"target": "nope"}, headers=h)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_target"
    r = client.post("/v1/sessions", json={"target": "staging-db"}, headers=h)  # dba cannot see staging
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "unknown_target"
    h_dev = {"Authorization": f"Bearer {issuer.token('dave', ['dev'])}"}
    r = client.post("/v1/sessions", json={"target": "prod-db", "level": "admin"}, headers=h_dev)
    assert r.status_code == 403
    assert r.json()["error"] == {"code": "level_not_allowed",
                                 "message": "level 'admin' is not allowed on prod-db; allowed: read"}
    r = client.get("/v1/sessions?limit=500", headers=h)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_error"
    r = client.get("/v1/sessions?cursor=garbage", headers=h)
    assert r.status_code == 422
    r = client.get("/v1/sessions?user=bob", headers=h)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "forbidden"
    r = client.get("/v1/sessions/doesnotexist", headers=h)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_http_vault_down_is_503(issuer: MiniIssuer, client: TestClient) -> None:
    # vault address is 127.0.0.1:1 in this config: connection refused
    h = {"Authorization": f"Bearer {issuer.token('alice', ['dba'])}"}
    r = client.post("/v1/sessions", json={"target": "prod-db"}, headers=h)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "vault_unavailable"


def test_idp_down_with_stale_keys_does_not_refetch_on_every_request(
    issuer: MiniIssuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale cache + IdP down: the cached keys keep serving, and the IdP is asked at most once per
    jwks_min_refetch_seconds (every request waiting on it under one lock would serialise the broker)."""
    v = _validator(issuer, tmp_path, monkeypatch)
    assert v.validate(issuer.token()).subject == "alice"
    now = [v._clock() + v.settings.jwks_cache_seconds + 1]  # the cache is stale from here on
    v._clock = lambda: now[0]
    issuer.down = True
    before = issuer.requests
    for _ in range(5):
        assert v.validate(issuer.token()).subject == "alice"
    assert issuer.requests - before == 1
    # a token signed by an unknown key is refused (401), not answered with "IdP unavailable" (503)
    now[0] += v.settings.jwks_min_refetch_seconds + 1
    with pytest.raises(TokenInvalid):
        v.validate(issuer.token(key=RSAKey.generate_key(2048, parameters={"kid": "rotated"})))
    v.close()
