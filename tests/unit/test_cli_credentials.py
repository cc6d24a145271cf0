"""``Credentials``: the cached ID token is refreshed near expiry and after a 401, and the refresh token only
ever goes to the identity provider it came from."""

from __future__ import annotations

import base64
import json
import time
from typing import ClassVar

import httpx
import keyring
import pytest
from tests.stack.memory_keyring import MemoryKeyring

from pcigate.auth import oidc
from pcigate.auth.credentials import Credentials
from pcigate.auth.tokens import StoredTokens, TokenStore
from pcigate.client import BrokerClient
from pcigate.config import Settings
from pcigate.errors import AuthRequired
from pcigate.models import OidcClientConfig

BROKER = "http://127.0.0.1:8600"
ISSUER = "https://idp.test"
CLIENT = "pcigate"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def id_token(lifetime: float, *, n: int = 0) -> tuple[str, float]:
    now = int(time.time())
    exp = now + lifetime
    payload = {"sub": "alice", "iat": now, "exp": exp, "n": n}
    token = ".".join(
        [_b64(json.dumps({"alg": "RS256"}).encode()), _b64(json.dumps(payload).encode()), _b64(b"sig")]
    )
    return token, float(exp)


def stored(lifetime: float, *, n: int = 0, issuer: str | None = ISSUER, client_id: str | None = CLIENT):
    token, exp = id_token(lifetime, n=n)
    return StoredTokens(
        id_token=token, refresh_token=f"rt-{n}", expires_at=exp, issuer=issuer, client_id=client_id
    )


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch):
    previous = keyring.get_keyring()
    keyring.set_keyring(MemoryKeyring())
    monkeypatch.delenv("PCIGATE_TOKEN", raising=False)
    yield TokenStore(BROKER)
    keyring.set_keyring(previous)


@pytest.fixture
def idp(monkeypatch: pytest.MonkeyPatch):
    """The broker's OIDC config and the IdP's refresh grant, faked; ``calls``: the refresh tokens sent."""

    class Idp:
        issuer = ISSUER
        client_id = CLIENT
        calls: ClassVar[list[str]] = []
        lifetime = 3600.0

    def oidc_config(self: BrokerClient) -> OidcClientConfig:
        return OidcClientConfig(
            issuer=Idp.issuer, client_id=Idp.client_id, scopes=["openid"], audience=Idp.client_id
        )

    def refresh(provider: object, tokens: StoredTokens) -> StoredTokens:
        assert tokens.refresh_token is not None
        Idp.calls.append(tokens.refresh_token)
        return stored(Idp.lifetime, n=len(Idp.calls))

    monkeypatch.setattr(BrokerClient, "oidc_config", oidc_config)
    monkeypatch.setattr(oidc, "discover", lambda config: object())
    monkeypatch.setattr(oidc, "refresh", refresh)
    Idp.calls = []
    return Idp


def test_cached_token_is_refreshed_when_it_nears_expiry(
    store: TokenStore, idp, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pcigate.auth import tokens as tokens_module

    store.save(stored(9))
    idp.lifetime = 9
    creds = Credentials(Settings(broker=BROKER))
    first = creds.bearer()
    assert idp.calls == []  # 9 s left, margin 3 s: still good
    assert creds.bearer() == first  # cached

    class Later:
        @staticmethod
        def time() -> float:
            return time.time() + 6.5

    monkeypatch.setattr(tokens_module, "time", Later)
    second = creds.bearer()  # within the margin now: refreshed, although cached
    assert second != first
    assert idp.calls == ["rt-0"]
    assert store.load().id_token == second  # type: ignore[union-attr]


def test_401_refreshes_once_and_retries_before_dropping(store: TokenStore, idp) -> None:
    store.save(stored(3600))
    creds = Credentials(Settings(broker=BROKER))
    original = creds.bearer()
    seen: list[str] = []
    refused = {original}  # the broker refuses the first token only
    identity = {"subject": "alice", "issuer": ISSUER, "expires_at": "2030-01-01T00:00:00Z"}

    def handler(request: httpx.Request) -> httpx.Response:
        bearer = request.headers["Authorization"].removeprefix("Bearer ")
        seen.append(bearer)
        if bearer in refused:
            return httpx.Response(401, json={"error": {"code": "token_invalid", "message": "expired"}})
        return httpx.Response(200, json=identity)

    def client() -> BrokerClient:
        return BrokerClient(
            BROKER,
            token=creds.bearer,
            on_refresh=creds.refresh,
            on_unauthorized=creds.drop,
            transport=httpx.MockTransport(handler),
        )

    # the broker refuses the cached token: one refresh, one retry with the new token, the sign-in is kept
    with client() as c:
        assert c.whoami().subject == "alice"
    assert idp.calls == ["rt-0"]
    assert len(seen) == 2
    assert seen[0] == original
    assert seen[1] != original
    assert store.load() is not None

    # the refreshed token is refused as well: one more refresh and retry, then the sign-in is dropped
    seen.clear()
    with client() as c:
        c._http._transport = httpx.MockTransport(
            lambda r: (
                seen.append(r.headers["Authorization"]),
                httpx.Response(401, json={"error": {"code": "token_invalid", "message": "no"}}),
            )[1]
        )
        with pytest.raises(AuthRequired):
            c.whoami()
    assert len(seen) == 2  # the call and exactly one retry
    assert store.load() is None


def test_refresh_token_is_not_sent_to_another_provider(store: TokenStore, idp) -> None:
    store.save(stored(-5))  # expired: the next bearer needs a refresh
    idp.issuer = "https://evil.test"
    creds = Credentials(Settings(broker=BROKER))
    with pytest.raises(AuthRequired) as err:
        creds.bearer()
    assert err.value.message == "the broker's identity provider changed; run: pcigate login"
    assert idp.calls == []
    assert store.load() is not None  # kept: `pcigate login` replaces it


@pytest.mark.parametrize(
    ("issuer", "client_id", "same"),
    [
        (ISSUER, CLIENT, True),
        (ISSUER + "/", CLIENT, True),
        ("https://other.test", CLIENT, False),
        (ISSUER, "someone-else", False),
        (None, CLIENT, False),
        (ISSUER, None, False),
    ],
)
def test_check_same_provider(issuer: str | None, client_id: str | None, same: bool) -> None:
    tokens = stored(10, issuer=issuer, client_id=client_id)
    config = OidcClientConfig(issuer=ISSUER, client_id=CLIENT, scopes=["openid"], audience=CLIENT)
    if same:
        oidc.check_same_provider(tokens, config)
    else:
        with pytest.raises(AuthRequired):
            oidc.check_same_provider(tokens, config)


def test_logout_does_not_revoke_at_another_provider(
    store: TokenStore, idp, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pcigate.app import app

    revoked: list[str] = []
    monkeypatch.setattr(oidc, "revoke", lambda provider, token, hint="refresh_token": revoked.append(token))
    monkeypatch.setenv("PCIGATE_STATE_DIR", "/nonexistent-pcigate-test")
    store.save(stored(3600))
    idp.issuer = "https://evil.test"
    result = CliRunner().invoke(app, ["--broker", BROKER, "logout"])
    assert result.exit_code == 0, result.output
    assert revoked == []
    assert "identity provider changed" in result.output
    assert store.load() is None
