"""Bearer-token validation with joserfc: OIDC discovery, a cached JWKS, strict claim checks → ``Identity``.

Order of checks (each failure is a :class:`TokenInvalid` with a one-line reason; the token is never echoed):

1. size cap (16 KiB) and compact JWS shape (three base64url parts, a JSON object header);
2. header ``alg`` in the configured allow-list; ``none`` and every ``HS*`` refused whatever the config says;
3. key by ``kid`` from the issuer's JWKS (discovery ``{issuer}/.well-known/openid-configuration`` →
   ``jwks_uri``), cached ``jwks_cache_seconds``; an unknown ``kid`` refetches early, at most once per
   ``jwks_min_refetch_seconds`` (key rotation without letting junk tokens hammer the IdP);
4. signature (joserfc, restricted to that one algorithm);
5. claims: ``iss`` exact, ``aud`` (string or list) intersects audience + extra_audiences, ``exp`` required and
   in the future, ``nbf`` / ``iat`` not in the future (all with ``leeway_seconds``), ``sub`` a non-empty
   string.

The IdP being unreachable while keys are needed is :class:`IdpUnavailable` (the API answers 503), not a bad
token, so that a client does not throw away a good token.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import BadSignatureError, JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

from pcigate.models import Identity

from .settings import OidcSettings

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = 512 * 1024
_NEVER = ("none",)

AsymKey = RSAKey | ECKey | OKPKey


class TokenInvalid(Exception):
    """The token is refused; ``str()`` is a one-line reason safe to show (no token material)."""


class IdpUnavailable(Exception):
    """The issuer's discovery document or JWKS cannot be fetched."""


@dataclass
class _Jwks:
    keys: dict[str, AsymKey]
    unnamed: list[AsymKey]
    fetched_at: float


def _b64json(part: str) -> Any:
    pad = "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(part + pad))


def _alg_refused(alg: str) -> bool:
    return alg.lower() in _NEVER or alg.upper().startswith("HS")


class TokenValidator:
    """Thread-safe; one per app. ``http`` is injectable for tests; ``clock`` returns epoch seconds."""

    def __init__(
        self,
        settings: OidcSettings,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._http = http or httpx.Client(timeout=settings.http_timeout_seconds, follow_redirects=False)
        self._clock = clock
        self._lock = threading.Lock()
        self._jwks: _Jwks | None = None
        self._jwks_uri: str | None = None
        self._last_fetch_attempt = -1e18

    def close(self) -> None:
        self._http.close()

    # -- keys ---------------------------------------------------------------------------------------------
    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            r = self._http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise IdpUnavailable(f"cannot reach the identity provider ({type(exc).__name__})") from None
        if r.status_code != 200:
            raise IdpUnavailable(f"identity provider answered HTTP {r.status_code} for {url}")
        if len(r.content) > MAX_JWKS_BYTES:
            raise IdpUnavailable("identity provider document too large")
        try:
            data = r.json()
        except ValueError:
            raise IdpUnavailable(f"identity provider sent invalid JSON at {url}") from None
        if not isinstance(data, dict):
            raise IdpUnavailable(f"identity provider sent a non-object at {url}")
        return data

    def _fetch_jwks(self) -> _Jwks:
        issuer = self.settings.issuer.rstrip("/")
        if self._jwks_uri is None:
            doc = self._get_json(f"{issuer}/.well-known/openid-configuration")
            if doc.get("issuer") != self.settings.issuer:
                raise IdpUnavailable("discovery document issuer does not match oidc.issuer")
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                raise IdpUnavailable("discovery document has no jwks_uri")
            self._jwks_uri = uri
        data = self._get_json(self._jwks_uri)
        keys: dict[str, AsymKey] = {}
        unnamed: list[AsymKey] = []
        raw_keys = data.get("keys")
        if not isinstance(raw_keys, list):
            raise IdpUnavailable("JWKS has no keys array")
        for raw in raw_keys:
            if not isinstance(raw, dict) or raw.get("kty") not in ("RSA", "EC", "OKP"):
                continue  # symmetric or junk: never usable for verification here
            if raw.get("use", "sig") != "sig":
                continue
            try:
                key = import_key(raw)
            except (JoseError, ValueError, TypeError):
                log.warning("skipping an unusable key in the issuer's JWKS")
                continue
            if isinstance(key, RSAKey | ECKey | OKPKey):
                kid = raw.get("kid")
                if isinstance(kid, str):
                    keys[kid] = key
                else:
                    unnamed.append(key)
        return _Jwks(keys=keys, unnamed=unnamed, fetched_at=self._clock())

    def _key_for(self, kid: str | None) -> AsymKey:
        with self._lock:
            now = self._clock()
            # Refreshing cached keys is rate-limited (jwks_min_refetch_seconds), failed attempts too: while
            # the IdP is down or slow, requests must not each wait on it under this lock.
            may_fetch = now - self._last_fetch_attempt >= self.settings.jwks_min_refetch_seconds
            stale = self._jwks is None or now - self._jwks.fetched_at >= self.settings.jwks_cache_seconds
            if stale and (may_fetch or self._jwks is None):  # with no keys at all, always try
                try:
                    self._last_fetch_attempt = now
                    self._jwks = self._fetch_jwks()
                except IdpUnavailable:
                    if self._jwks is None:
                        raise
                    log.warning("JWKS refresh failed; keeping the cached keys")
                may_fetch = False
            assert self._jwks is not None
            key = self._lookup(kid)
            if key is None and may_fetch:
                # Unknown kid: the IdP may have rotated keys. Refetch, rate-limited; if the IdP cannot be
                # reached the key stays unknown (a junk token is refused, not answered with 503).
                self._last_fetch_attempt = now
                try:
                    self._jwks = self._fetch_jwks()
                except IdpUnavailable:
                    log.warning("JWKS refetch for an unknown kid failed; keeping the cached keys")
                key = self._lookup(kid)
            if key is None:
                raise TokenInvalid("signing key not found (unknown kid)")
            return key

    def _lookup(self, kid: str | None) -> AsymKey | None:
        assert self._jwks is not None
        if kid is not None:
            return self._jwks.keys.get(kid)
        candidates = [*self._jwks.unnamed, *self._jwks.keys.values()]
        return candidates[0] if len(candidates) == 1 else None

    # -- validation ---------------------------------------------------------------------------------------
    def validate(self, token: str) -> Identity:
        s = self.settings
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenInvalid("token too large")
        parts = token.split(".")
        if len(parts) != 3 or not all(parts[:2]):
            raise TokenInvalid("not a signed JWT")
        try:
            header = _b64json(parts[0])
        except (ValueError, TypeError):
            raise TokenInvalid("malformed token header") from None
        if not isinstance(header, dict):
            raise TokenInvalid("malformed token header")
        alg = header.get("alg")
        if not isinstance(alg, str) or _alg_refused(alg) or alg not in s.algorithms:
            raise TokenInvalid("algorithm not allowed")
        if "crit" in header or "jku" in header or "x5u" in header or "jwk" in header:
            raise TokenInvalid("unsupported token header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenInvalid("malformed token header")
        key = self._key_for(kid)
        try:
            decoded = jwt.decode(token, key, algorithms=[alg])
        except BadSignatureError:
            raise TokenInvalid("signature does not verify") from None
        except JoseError as exc:
            raise TokenInvalid(f"token rejected ({exc.error})") from None
        except (ValueError, TypeError):
            raise TokenInvalid("malformed token") from None
        return self._identity(decoded.claims)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        s = self.settings
        now = self._clock()
        leeway = s.leeway_seconds
        if claims.get("iss") != s.issuer:
            raise TokenInvalid("wrong issuer")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a in s.audiences for a in auds):
            raise TokenInvalid("wrong audience")
        exp = _num(claims.get("exp"))
        if exp is None:
            raise TokenInvalid("token has no expiry")
        if now > exp + leeway:
            raise TokenInvalid("token expired")
        nbf = claims.get("nbf")
        if nbf is not None and (_num(nbf) is None or float(nbf) > now + leeway):
            raise TokenInvalid("token not valid yet")
        iat = claims.get("iat")
        if iat is not None and (_num(iat) is None or float(iat) > now + leeway):
            raise TokenInvalid("token issued in the future")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 255:
            raise TokenInvalid("token has no subject")
        raw_groups = claims.get(s.groups_claim)
        groups: list[str] = []
        if isinstance(raw_groups, list):
            groups = [g for g in raw_groups if isinstance(g, str)]
        elif isinstance(raw_groups, str):
            groups = [raw_groups]
        name = claims.get("name") or claims.get("preferred_username")
        email = claims.get("email")
        workload = claims.get(s.workload_claim) is True
        amr = claims.get("amr")
        acr = claims.get("acr")
        return Identity(
            subject=sub,
            name=name if isinstance(name, str) else None,
            email=email if isinstance(email, str) else None,
            groups=groups,
            client_kind="workload" if workload else "human",
            issuer=s.issuer,
            expires_at=datetime.fromtimestamp(exp, UTC),
            amr=[a for a in amr if isinstance(a, str)][:20] if isinstance(amr, list) else [],
            acr=acr if isinstance(acr, str) else None,
        )


def _num(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)
