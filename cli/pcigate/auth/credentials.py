"""The bearer sent to the broker: a workload token (``--token-file`` / ``PCIGATE_TOKEN``) used as-is, or the
signed-in user's ID token from the keyring, refreshed silently when it is near expiry."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pcigate.auth.tokens import StoredTokens, TokenStore
from pcigate.config import ENV_TOKEN, Settings
from pcigate.errors import AuthRequired, KeyringUnavailable, UsageError

LOGIN_HINT = "run: pcigate login"
REFRESH_MARGIN_SECONDS = 60.0


def _read_token_file(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from exc
    if not token:
        raise UsageError(f"the token file {path} is empty")
    return token


class Credentials:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._bearer: str | None = None
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
        if self._bearer is None:
            self._bearer = self._user_token().id_token
        return self._bearer

    def _user_token(self) -> StoredTokens:
        store = TokenStore(self.settings.broker_url)
        tokens = store.load()
        if tokens is None:
            raise AuthRequired(f"not signed in to {self.settings.broker_url}", hint=LOGIN_HINT)
        if tokens.expires_within(REFRESH_MARGIN_SECONDS):
            if not tokens.refresh_token:
                raise AuthRequired("the sign-in has expired", hint=LOGIN_HINT)
            from pcigate.auth import oidc
            from pcigate.client import BrokerClient

            with BrokerClient(self.settings.broker_url) as client:
                provider = oidc.discover(client.oidc_config())
            try:
                tokens = oidc.refresh(provider, tokens)
            except AuthRequired:
                store.delete()
                raise
            store.save(tokens)
        return tokens

    def drop(self) -> None:
        """The broker refused the bearer: forget a stored sign-in (a workload token is the caller's)."""
        self._bearer = None
        if self.workload is not None:
            return
        with contextlib.suppress(KeyringUnavailable):
            TokenStore(self.settings.broker_url).delete()
