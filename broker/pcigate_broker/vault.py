"""OpenBao/Vault adapter (hvac): dynamic database credentials and lease revocation.

Blocking: call it from a worker thread (sync FastAPI endpoints, ``anyio.to_thread``). Errors are mapped once:
connection refused / timeout / sealed / 5xx / refused broker token → :class:`VaultUnavailable`;
OpenBao answered but could not reach or log in to the target database → :class:`DatabaseUnavailable`.
Exception messages never carry OpenBao's raw text (it may quote connection details) — only a summary.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import hvac
import hvac.exceptions
import requests

from .errors import DatabaseUnavailable, VaultUnavailable
from .settings import VaultSettings

log = logging.getLogger(__name__)

# Phrases OpenBao's database plugin uses when the database itself is the problem.
_DB_DOWN_HINTS = (
    "connection refused",
    "dial tcp",
    "failed to connect",
    "error verifying connection",
    "password authentication failed",
    "no such host",
    "i/o timeout",
    "connection reset",
    "could not connect",
    "the database system is",
    "failed to initialize",
)


@dataclass(frozen=True)
class IssuedCreds:
    lease_id: str
    lease_duration: int
    username: str
    password: str

    def __repr__(self) -> str:  # never show the password
        return f"IssuedCreds(lease_id={self.lease_id!r}, username={self.username!r}, password=***)"


def _errors_text(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    return " ".join(str(e) for e in errors) if isinstance(errors, list) else str(exc)


class Vault:
    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._client = hvac.Client(url=settings.address, timeout=settings.timeout_seconds)
        if settings.auth == "token":
            assert settings.token is not None
            self._client.token = settings.token.get_secret_value()
        self._logged_in = settings.auth == "token"
        self._next_renew = 0.0
        self._warned = False

    # -- auth -----------------------------------------------------------------------------------------
    def _login(self) -> None:
        s = self.settings
        if s.role_id is None or s.secret_id is None:
            raise VaultUnavailable("AppRole needs role_id and a secret id")
        try:
            resp = self._client.auth.approle.login(
                role_id=s.role_id,
                secret_id=s.secret_id.get_secret_value(),
                mount_point=s.approle_mount,
                use_token=True,
            )
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            raise VaultUnavailable(f"OpenBao AppRole login failed ({type(exc).__name__})") from None
        if not isinstance(resp, dict) or "auth" not in resp:
            raise VaultUnavailable("OpenBao AppRole login gave no token")
        self._logged_in = True

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one hvac call; AppRole re-logs in once on 403; transport and server errors are mapped."""
        for attempt in (1, 2):
            if not self._logged_in:
                with self._lock:
                    if not self._logged_in:
                        self._login()
            try:
                return fn(*args, **kwargs)
            except hvac.exceptions.Forbidden:
                if self.settings.auth == "approle" and attempt == 1:
                    self._logged_in = False
                    continue
                raise VaultUnavailable("OpenBao refused the broker's credentials (403)") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                raise VaultUnavailable(f"OpenBao unreachable ({type(exc).__name__})") from None
            except requests.exceptions.RequestException as exc:
                raise VaultUnavailable(f"OpenBao request failed ({type(exc).__name__})") from None
            except hvac.exceptions.VaultDown:
                raise VaultUnavailable("OpenBao is sealed or in standby") from None
        raise VaultUnavailable("OpenBao refused the broker's credentials (403)")

    # -- operations -----------------------------------------------------------------------------------
    def issue_db_creds(self, mount: str, role: str) -> IssuedCreds:
        try:
            resp = self._call(
                self._client.secrets.database.generate_credentials, name=role, mount_point=mount
            )
        except hvac.exceptions.VaultError as exc:
            text = _errors_text(exc).lower()
            if any(h in text for h in _DB_DOWN_HINTS):
                log.warning("OpenBao could not reach the database for %s/creds/%s", mount, role)
                raise DatabaseUnavailable(
                    f"OpenBao could not open a connection to the database ({role})"
                ) from None
            status = type(exc).__name__
            log.warning("OpenBao refused %s/creds/%s: %s", mount, role, status)
            raise VaultUnavailable(f"OpenBao could not issue credentials for {role} ({status})") from None
        try:
            data = resp["data"]
            return IssuedCreds(
                lease_id=str(resp["lease_id"]),
                lease_duration=int(resp.get("lease_duration") or 0),
                username=str(data["username"]),
                password=str(data["password"]),
            )
        except (KeyError, TypeError, ValueError):
            raise VaultUnavailable("OpenBao answered without credentials") from None

    def sign_ssh_key(self, mount: str, role: str, public_key: str, principals: list[str], ttl_seconds: int,
                     key_id: str, extensions: list[str]) -> str:
        """Have the SSH CA sign ``public_key`` as a user certificate; returns the certificate line.

        The role must allow the principals and ``allow_user_key_ids`` (the key id names the session, so
        sshd's log ties every login to it). No lease: a certificate cannot be revoked, it expires."""
        try:
            resp = self._call(
                self._client.write_data,
                f"{mount}/sign/{role}",
                data={"public_key": public_key, "valid_principals": ",".join(principals),
                      "ttl": f"{ttl_seconds}s", "cert_type": "user", "key_id": key_id,
                      "extensions": {name: "" for name in extensions}},
            )
        except hvac.exceptions.VaultError as exc:
            status = type(exc).__name__
            log.warning("OpenBao refused %s/sign/%s: %s", mount, role, status)
            raise VaultUnavailable(f"OpenBao could not sign the SSH key for {role} ({status})") from None
        try:
            return str(resp["data"]["signed_key"]).strip()
        except (KeyError, TypeError):
            raise VaultUnavailable("OpenBao answered without a certificate") from None

    def revoke_lease(self, lease_id: str) -> None:
        """Synchronous revoke (``sys/leases/revoke``); an unknown/already revoked lease counts as done."""
        try:
            self._call(self._client.sys.revoke_lease, lease_id=lease_id)
        except hvac.exceptions.InvalidRequest as exc:
            text = _errors_text(exc).lower()
            if "invalid lease" in text or "not found" in text:
                return
            raise VaultUnavailable("OpenBao refused to revoke the lease (InvalidRequest)") from None
        except hvac.exceptions.VaultError as exc:
            raise VaultUnavailable(f"OpenBao could not revoke the lease ({type(exc).__name__})") from None

    def maintain_token(self, max_session_seconds: int) -> None:
        """Keep the broker's own token alive (``auth/token/renew-self``), at most every third of its TTL.

        OpenBao revokes every lease a token created when that token expires: the credentials of open sessions
        die with the broker's token. Use a periodic token (or an AppRole role with ``token_period``) so that
        renewing keeps it alive; a token that cannot be renewed and lives shorter than the longest session
        is logged as a warning. Called by the reaper on every pass.
        """
        now = time.monotonic()
        if now < self._next_renew:
            return
        try:
            resp = self._call(self._client.auth.token.renew_self)
            ttl = int(resp["auth"]["lease_duration"])
        except (hvac.exceptions.VaultError, KeyError, TypeError, ValueError):
            left = self._remaining_ttl()
            if left is not None and 0 < left < max_session_seconds and not self._warned:
                log.warning("OpenBao token is not renewable and expires in %ds; credentials it issued are "
                            "revoked with it (use a periodic token)", left)
                self._warned = True
            self._next_renew = now + 300
            return
        except VaultUnavailable:
            self._next_renew = now + 10
            return
        self._next_renew = now + max(1.0, ttl / 3) if ttl > 0 else now + 3600

    def _remaining_ttl(self) -> int | None:
        try:
            resp = self._call(self._client.auth.token.lookup_self)
            return int(resp["data"]["ttl"])
        except (hvac.exceptions.VaultError, VaultUnavailable, KeyError, TypeError, ValueError):
            return None

    def healthy(self) -> bool:
        try:
            self._client.sys.read_health_status(method="GET")
        except Exception:
            return False
        return True
