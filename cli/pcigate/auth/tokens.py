"""Token storage in the OS keyring only (service ``pcigate``, username = broker URL); never a plain file."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pcigate.errors import KeyringUnavailable

SERVICE = "pcigate"
KEYRING_HINT = (
    "install and unlock a Secret Service keyring (e.g. gnome-keyring or KeePassXC) or select a backend with "
    "PYTHON_KEYRING_BACKEND; for automation use PCIGATE_TOKEN or --token-file instead of a login"
)
# Backends that cannot keep a secret: the failing placeholder, the no-op one, and plaintext files.
_REFUSED_BACKENDS = {
    "keyring.backends.fail.Keyring",
    "keyring.backends.null.Keyring",
    "keyrings.alt.file.PlaintextKeyring",
}


class StoredTokens(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id_token: str
    refresh_token: str | None = None
    expires_at: float  # epoch seconds of the ID token's ``exp``
    issuer: str | None = None
    client_id: str | None = None

    def expires_within(self, seconds: float) -> bool:
        return self.expires_at - time.time() < seconds

    def __repr__(self) -> str:  # never show the tokens themselves
        return f"StoredTokens(expires_at={self.expires_at!r}, issuer={self.issuer!r})"

    __str__ = __repr__


def _backend_name(kr: Any) -> str:
    cls = type(kr)
    return f"{cls.__module__}.{cls.__qualname__}"


def _usable_keyring() -> Any:
    import keyring
    from keyring.backends import chainer

    kr = keyring.get_keyring()
    name = _backend_name(kr)
    if isinstance(kr, chainer.ChainerBackend):
        usable = [b for b in kr.backends if _backend_name(b) not in _REFUSED_BACKENDS]
        if not usable:
            raise KeyringUnavailable(
                "no keyring backend is available to store the sign-in", hint=KEYRING_HINT
            )
    elif name in _REFUSED_BACKENDS:
        raise KeyringUnavailable(
            f"the keyring backend {name} cannot store the sign-in securely", hint=KEYRING_HINT
        )
    return kr


class TokenStore:
    """The sign-in for one broker URL."""

    def __init__(self, broker_url: str) -> None:
        self.key = broker_url.rstrip("/")

    def load(self) -> StoredTokens | None:
        kr = _usable_keyring()
        try:
            raw = kr.get_password(SERVICE, self.key)
        except (
            Exception
        ) as exc:  # backends raise KeyringError, RuntimeError, ValueError (locked, bad password)
            raise KeyringUnavailable(f"cannot read the keyring: {exc}", hint=KEYRING_HINT) from exc
        if not raw:
            return None
        try:
            return StoredTokens.model_validate_json(raw)
        except ValidationError:
            return None  # unreadable entry: treated as signed out, replaced on next login

    def save(self, tokens: StoredTokens) -> None:
        kr = _usable_keyring()
        try:
            kr.set_password(SERVICE, self.key, tokens.model_dump_json())
        except Exception as exc:
            raise KeyringUnavailable(f"cannot write to the keyring: {exc}", hint=KEYRING_HINT) from exc

    def delete(self) -> bool:
        """Drop the entry; True when there was one."""
        from keyring.errors import PasswordDeleteError

        kr = _usable_keyring()
        try:
            if kr.get_password(SERVICE, self.key) is None:
                return False
            kr.delete_password(SERVICE, self.key)
        except PasswordDeleteError:
            return False
        except Exception as exc:
            raise KeyringUnavailable(f"cannot write to the keyring: {exc}", hint=KEYRING_HINT) from exc
        return True
