"""The bearer sent to the broker: a workload token (``--token-file`` / ``PCIGATE_TOKEN``) used as-is, or the
signed-in user's ID token from the keyring, refreshed silently when it is near expiry.

The ID token is cached with its expiry for the life of the process: a session longer than the token's
lifetime refreshes it (with the refresh token) whenever it comes within :data:`REFRESH_MARGIN_SECONDS` of
expiry, and a 401 from the broker triggers one forced refresh and a retry (:meth:`Credentials.refresh`)
before the sign-in is dropped.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from pcigate.auth.tokens import StoredTokens, TokenStore
from pcigate.config import ENV_TOKEN, Settings
from pcigate.errors import AuthRequired, KeyringUnavailable, UsageError

LOGIN_HINT = "run: pcigate login"
REFRESH_MARGIN_SECONDS = 60.0


# A workload token is a JWT of a few KiB; the broker refuses more than 16 KiB. Reading stops there, so a
# wrong path (a log file, /dev/zero) fails at once instead of filling memory.
MAX_TOKEN_FILE_BYTES = 16 * 1024


def _read_token_file(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise UsageError(
            f"the token file {path} is larger than {MAX_TOKEN_FILE_BYTES // 1024} KiB: not a token"
        )
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError(f"the token file {path} is not text: not a token") from None
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return token


def _b64_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def _unverified_claims(id_token: str) -> dict[str, Any] | None:
    """The payload of a JWS-compact token, *not verified*: only to schedule a refresh (the broker verifies
    every token). Plain stdlib, unlike ``oidc.id_token_claims``, whose JOSE library (and cryptography) would
    cost ~50 ms on every start-up of a signed-in command."""
    parts = id_token.split(".")
    if len(parts) != 3:
        return None
    try:
        header = _b64_json(parts[0])
        payload = _b64_json(parts[1])
    except ValueError:  # bad base64 (binascii.Error), UTF-8 or JSON
        return None
    if not isinstance(header, dict) or "alg" not in header or not isinstance(payload, dict):
        return None
    return payload


def refresh_margin(tokens: StoredTokens) -> float:
    """Refresh this long before expiry: a minute, or a third of the token's lifetime when it is short."""
    claims = _unverified_claims(tokens.id_token)
    if claims is None:
        return REFRESH_MARGIN_SECONDS
    iat, exp = claims.get("iat"), claims.get("exp")
    if isinstance(iat, int | float) and isinstance(exp, int | float) and exp > iat:
        return min(REFRESH_MARGIN_SECONDS, (exp - iat) / 3)
    return REFRESH_MARGIN_SECONDS


class Credentials:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._tokens: StoredTokens | None = None
        self._lock = threading.RLock()  # the heartbeat thread and the main thread share one instance
        self.workload: str | None = None
        if settings.token_file is not None:
            self.workload = _read_token_file(settings.token_file)
        elif os.environ.get(ENV_TOKEN, "").strip():
            self.workload = os.environ[ENV_TOKEN].strip()

    @property
    def hint(self) -> str:
        """What to do when the broker refuses this bearer."""
        if self.workload is None:
            return LOGIN_HINT
        return "the workload token (PCIGATE_TOKEN / --token-file) was refused: get a fresh one"

    @property
    def is_workload(self) -> bool:
        return self.workload is not None

    def bearer(self) -> str:
        if self.workload is not None:
            return self.workload
        with self._lock:
            if self._tokens is None or self._tokens.expires_within(refresh_margin(self._tokens)):
                self._tokens = self._user_token()
            return self._tokens.id_token

    def refresh(self) -> bool:
        """The broker refused the current bearer: get a fresh ID token once. True when there is a new one
        to retry with (another process may already have refreshed the stored sign-in)."""
        if self.workload is not None:
            return False
        with self._lock:
            used = self._tokens
            store = TokenStore(self.settings.broker_url)
            stored = store.load()
            if stored is None:
                return False
            if (
                used is not None
                and stored.id_token != used.id_token
                and not stored.expires_within(refresh_margin(stored))
            ):
                self._tokens = stored
                return True
            if not stored.refresh_token:
                return False
            self._tokens = self._refresh(store, stored)
            return True

    def _user_token(self) -> StoredTokens:
        store = TokenStore(self.settings.broker_url)
        tokens = store.load()
        if tokens is None:
            raise AuthRequired(f"not signed in to {self.settings.broker_url}", hint=LOGIN_HINT)
        if tokens.expires_within(refresh_margin(tokens)):
            if not tokens.refresh_token:
                raise AuthRequired("the sign-in has expired", hint=LOGIN_HINT)
            tokens = self._refresh(store, tokens)
        return tokens

    def _refresh(self, store: TokenStore, tokens: StoredTokens) -> StoredTokens:
        from pcigate.auth import oidc
        from pcigate.client import BrokerClient

        with BrokerClient(self.settings.broker_url) as client:
            config = client.oidc_config()
        oidc.check_same_provider(tokens, config)  # never send the refresh token anywhere else
        provider = oidc.discover(config)
        try:
            fresh = oidc.refresh(provider, tokens)
        except AuthRequired:
            store.delete()
            raise
        store.save(fresh)
        return fresh

    def drop(self) -> None:
        """The broker refused the bearer: forget a stored sign-in (a workload token is the caller's)."""
        with self._lock:
            self._tokens = None
        if self.workload is not None:
            return
        with contextlib.suppress(KeyringUnavailable):
            TokenStore(self.settings.broker_url).delete()
