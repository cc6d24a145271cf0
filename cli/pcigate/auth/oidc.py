"""OIDC sign-in with authlib: authorization code + PKCE (S256) over a loopback redirect (RFC 8252), the device
authorization grant (RFC 8628), silent refresh and revocation.

The client never trusts what it reads from an ID token: the broker verifies every token on every call. The CLI
only reads ``exp`` (to refresh in time) and ``nonce`` (to bind the token to this sign-in).
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import warnings
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError

with warnings.catch_warnings():
    # authlib >= 1.7 prefers the "httpx2" package and warns when it falls back to httpx (our dependency).
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import OAuth2Client
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from pydantic import BaseModel, ConfigDict, ValidationError

from pcigate.auth.tokens import StoredTokens
from pcigate.errors import AuthRequired, BrokerUnavailable, PcigateError, UsageError
from pcigate.models import OidcClientConfig

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
LOGIN_HINT = "run: pcigate login"
CALLBACK_PATH = "/callback"
CALLBACK_TIMEOUT = 300.0
Announce = Callable[[str], None]

_PAGE = (
    '<!doctype html><html><head><meta charset="utf-8"><title>pcigate</title></head>'
    '<body style="font-family:sans-serif"><h2>{title}</h2><p>{text}</p></body></html>'
)
_DONE_PAGE = _PAGE.format(title="Signed in to pcigate.", text="You can close this tab.").encode()
_FAIL_PAGE = _PAGE.format(title="pcigate sign-in failed.", text="Return to the terminal.").encode()


class ProviderMetadata(BaseModel):
    """The part of ``.well-known/openid-configuration`` the CLI uses."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None


class DeviceAuthorization(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None = None
    expires_in: int = 600
    interval: int = 5


@dataclass(frozen=True)
class Provider:
    client: OidcClientConfig
    metadata: ProviderMetadata

    @property
    def scope(self) -> str:
        return " ".join(self.client.scopes or ["openid"])

    def oauth(self, *, with_scope: bool = True, **kwargs: Any) -> OAuth2Client:
        return OAuth2Client(
            client_id=self.client.client_id,
            token_endpoint_auth_method="none",  # a public native client (RFC 8252)
            scope=self.scope if with_scope else None,
            timeout=15.0,
            **kwargs,
        )


def discover(config: OidcClientConfig, *, timeout: float = 10.0) -> Provider:
    """The issuer's discovery document, checked to name the same issuer the broker trusts."""
    url = config.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
        metadata = ProviderMetadata.model_validate_json(response.content)
    except httpx.TransportError as exc:
        raise BrokerUnavailable(f"cannot reach the identity provider at {config.issuer}") from exc
    except (httpx.HTTPStatusError, ValidationError) as exc:
        raise PcigateError(f"the identity provider at {config.issuer} has no usable discovery") from exc
    if metadata.issuer.rstrip("/") != config.issuer.rstrip("/"):
        raise PcigateError(f"the identity provider calls itself {metadata.issuer}, not {config.issuer}")
    return Provider(client=config, metadata=metadata)


def id_token_claims(id_token: str) -> dict[str, Any]:
    """Claims of a JWS-compact ID token, *not verified* (scheduling and nonce binding only)."""
    from joserfc import jws
    from joserfc.errors import JoseError

    try:
        claims = json.loads(jws.extract_compact(id_token.encode()).payload)
    except (JoseError, ValueError) as exc:
        raise AuthRequired("the identity provider returned an unreadable ID token", hint=LOGIN_HINT) from exc
    if not isinstance(claims, dict):
        raise AuthRequired("the identity provider returned an unreadable ID token", hint=LOGIN_HINT)
    return claims


def _tokens(
    provider: Provider,
    token: dict[str, Any],
    *,
    nonce: str | None = None,
    previous_refresh: str | None = None,
) -> StoredTokens:
    id_token = token.get("id_token")
    if not isinstance(id_token, str) or not id_token:
        raise AuthRequired(
            "the identity provider returned no ID token", hint="check the scopes include openid"
        )
    claims = id_token_claims(id_token)
    if nonce is not None and not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
        raise AuthRequired("the ID token does not belong to this sign-in (nonce)", hint=LOGIN_HINT)
    exp = claims.get("exp")
    expires_at = (
        float(exp) if isinstance(exp, int | float) else time.time() + float(token.get("expires_in", 300))
    )
    refresh = token.get("refresh_token") or previous_refresh
    return StoredTokens(
        id_token=id_token,
        refresh_token=refresh if isinstance(refresh, str) else None,
        expires_at=expires_at,
        issuer=provider.client.issuer,
        client_id=provider.client.client_id,
    )


def _oauth_failure(exc: Exception, what: str) -> PcigateError:
    if isinstance(exc, httpx.TransportError):
        return BrokerUnavailable(f"cannot reach the identity provider during {what}")
    if isinstance(exc, OAuthError):
        detail = f"{exc.error}" + (f": {exc.description}" if exc.description else "")
        return AuthRequired(f"{what} failed: {detail}", hint=LOGIN_HINT)
    return AuthRequired(f"{what} failed: {exc}", hint=LOGIN_HINT)


# --- authorization code + PKCE over a loopback redirect
class _Callback:
    def __init__(self) -> None:
        self.params: dict[str, str] | None = None


def _make_handler(result: _Callback, state: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path != CALLBACK_PATH or result.params is not None:
                self.send_error(404)
                return
            params = {k: v[0] for k, v in parse_qs(parts.query).items()}
            ok = "code" in params and hmac.compare_digest(params.get("state", ""), state)
            result.params = params
            body = _DONE_PAGE if ok else _FAIL_PAGE
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: stderr is the user's
            return

    return Handler


def login_auth_code(
    provider: Provider, *, announce: Announce, open_browser: bool = True, timeout: float = CALLBACK_TIMEOUT
) -> StoredTokens:
    state = generate_token(32)
    nonce = generate_token(32)
    verifier = generate_token(64)
    result = _Callback()
    server = HTTPServer(("127.0.0.1", 0), _make_handler(result, state))
    try:
        redirect_uri = f"http://127.0.0.1:{server.server_port}{CALLBACK_PATH}"
        oauth = provider.oauth(redirect_uri=redirect_uri)
        with oauth:
            url, _ = oauth.create_authorization_url(
                provider.metadata.authorization_endpoint,
                state=state,
                nonce=nonce,
                code_challenge=create_s256_code_challenge(verifier),
                code_challenge_method="S256",
            )
            announce(f"Open this URL to sign in: {url}")
            if open_browser:
                threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
            deadline = time.monotonic() + timeout
            while result.params is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AuthRequired(f"no sign-in completed within {int(timeout)} s", hint=LOGIN_HINT)
                server.timeout = min(remaining, 1.0)
                server.handle_request()
            params = result.params
            if "error" in params:
                detail = params.get("error_description") or params["error"]
                raise AuthRequired(f"the identity provider refused the sign-in: {detail}", hint=LOGIN_HINT)
            if not hmac.compare_digest(params.get("state", ""), state):
                raise AuthRequired("sign-in answer with a wrong state parameter (possible CSRF); refused")
            if not params.get("code"):
                raise AuthRequired("the identity provider returned no authorization code", hint=LOGIN_HINT)
            try:
                token = oauth.fetch_token(
                    provider.metadata.token_endpoint,
                    grant_type="authorization_code",
                    code=params["code"],
                    code_verifier=verifier,
                    redirect_uri=redirect_uri,
                )
            except (OAuthError, httpx.HTTPError, ValueError) as exc:
                raise _oauth_failure(exc, "the code exchange") from exc
    finally:
        server.server_close()
    return _tokens(provider, dict(token), nonce=nonce)


# --- device authorization grant (RFC 8628)
def login_device(
    provider: Provider, *, announce: Announce, sleep: Callable[[float], None] = time.sleep
) -> StoredTokens:
    endpoint = provider.metadata.device_authorization_endpoint
    if not endpoint:
        raise UsageError("the identity provider does not offer the device flow", hint="run: pcigate login")
    with provider.oauth() as oauth:
        try:
            response = oauth.request(
                "POST",
                endpoint,
                withhold_token=True,
                data={"client_id": provider.client.client_id, "scope": provider.scope},
            )
            response.raise_for_status()
            device = DeviceAuthorization.model_validate_json(response.content)
        except httpx.TransportError as exc:
            raise BrokerUnavailable("cannot reach the identity provider for the device flow") from exc
        except (httpx.HTTPStatusError, ValidationError) as exc:
            raise AuthRequired("the identity provider refused the device authorization request") from exc
        announce(f"To sign in, visit {device.verification_uri} and enter code {device.user_code}")
        if device.verification_uri_complete:
            announce(f"or open: {device.verification_uri_complete}")
        interval = max(1, device.interval)
        deadline = time.monotonic() + device.expires_in
        while True:
            if time.monotonic() > deadline:
                raise AuthRequired("the device code expired before the sign-in was approved", hint=LOGIN_HINT)
            sleep(interval)
            try:
                token = oauth.fetch_token(
                    provider.metadata.token_endpoint, grant_type=DEVICE_GRANT, device_code=device.device_code
                )
            except OAuthError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5
                    continue
                if exc.error == "expired_token":
                    raise AuthRequired(
                        "the device code expired before the sign-in was approved", hint=LOGIN_HINT
                    ) from exc
                if exc.error == "access_denied":
                    raise AuthRequired("the sign-in was denied", hint=LOGIN_HINT) from exc
                raise _oauth_failure(exc, "the device flow") from exc
            except (httpx.HTTPError, ValueError) as exc:
                raise _oauth_failure(exc, "the device flow") from exc
            return _tokens(provider, dict(token))


# --- refresh and revocation
PROVIDER_CHANGED = "the broker's identity provider changed; run: pcigate login"


def check_same_provider(tokens: StoredTokens, config: OidcClientConfig) -> None:
    """The broker's (unauthenticated) OIDC config must still name the issuer and client the tokens came from;
    otherwise the refresh token would be sent to whoever the broker now points at."""
    same = (
        tokens.issuer is not None
        and tokens.client_id is not None
        and tokens.issuer.rstrip("/") == config.issuer.rstrip("/")
        and tokens.client_id == config.client_id
    )
    if not same:
        raise AuthRequired(PROVIDER_CHANGED)


def refresh(provider: Provider, tokens: StoredTokens) -> StoredTokens:
    if not tokens.refresh_token:
        raise AuthRequired("the sign-in has expired", hint=LOGIN_HINT)
    # No scope on refresh: the grant keeps the scopes consented at sign-in (asking again may be refused).
    with provider.oauth(with_scope=False) as oauth:
        try:
            token = oauth.refresh_token(provider.metadata.token_endpoint, refresh_token=tokens.refresh_token)
        except (OAuthError, httpx.HTTPError, ValueError) as exc:
            failure = _oauth_failure(exc, "refreshing the sign-in")
            if isinstance(failure, AuthRequired):
                failure = AuthRequired("the sign-in has expired", hint=LOGIN_HINT)
            raise failure from exc
    return _tokens(provider, dict(token), previous_refresh=tokens.refresh_token)


def revoke(provider: Provider, token: str, hint: str = "refresh_token") -> bool:
    endpoint = provider.metadata.revocation_endpoint
    if not endpoint:
        return False
    with provider.oauth() as oauth:
        try:
            response = oauth.revoke_token(endpoint, token=token, token_type_hint=hint)
        except (OAuthError, httpx.HTTPError):
            return False
    return bool(response.status_code < 400)
