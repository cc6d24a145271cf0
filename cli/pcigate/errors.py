"""Exit codes and the one exception tree of the CLI.

Every failure a user can cause or meet is a :class:`PcigateError` with an :class:`ExitCode`; ``app.main``
catches it once and prints ``error: <message>`` (plus an optional ``hint``) on one line, never a traceback.
Messages must never contain secrets (passwords, tokens, one-time secrets).

    PcigateError
    ├── UsageError                 EXIT 2
    ├── AuthRequired               EXIT 3  not signed in, token expired/refused by the broker
    ├── AccessDenied               EXIT 4  policy refuses (group, level not allowed)
    ├── NotFound                   EXIT 5  unknown target or session
    ├── BrokerUnavailable          EXIT 6  broker unreachable / 5xx
    ├── VaultUnavailable           EXIT 7  broker says OpenBao/Vault is down
    ├── DatabaseUnavailable        EXIT 8  the target database cannot be reached / refuses the login
    ├── PortInUse                  EXIT 9  the local tunnel port is taken
    ├── PendingApproval            EXIT 10 (JIT requests, later)
    ├── KeyringUnavailable         EXIT 11 no keyring backend to store tokens
    ├── ProtocolError              EXIT 12 malformed bytes from a peer
    ├── RecordingError             EXIT 13 recording could not be verified/uploaded (kept in the spool)
    └── IdpUnavailable             EXIT 14 the identity provider cannot be reached
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    AUTH_REQUIRED = 3
    DENIED = 4
    NOT_FOUND = 5
    BROKER_UNAVAILABLE = 6
    VAULT_UNAVAILABLE = 7
    DATABASE_UNAVAILABLE = 8
    PORT_IN_USE = 9
    PENDING_APPROVAL = 10
    KEYRING_UNAVAILABLE = 11
    PROTOCOL_ERROR = 12
    RECORDING_ERROR = 13
    IDP_UNAVAILABLE = 14
    CONFLICT = 15
    AUDIT_INVALID = 16
    INTERRUPTED = 130


class PcigateError(Exception):
    """Base of every expected failure. ``str(err)`` is the one line shown to the user."""

    exit_code: ExitCode = ExitCode.ERROR
    code: str = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(PcigateError):
    exit_code = ExitCode.USAGE
    code = "usage"


class AuthRequired(PcigateError):
    exit_code = ExitCode.AUTH_REQUIRED
    code = "auth_required"


class AccessDenied(PcigateError):
    exit_code = ExitCode.DENIED
    code = "denied"


class NotFound(PcigateError):
    exit_code = ExitCode.NOT_FOUND
    code = "not_found"


class BrokerUnavailable(PcigateError):
    exit_code = ExitCode.BROKER_UNAVAILABLE
    code = "broker_unavailable"


class VaultUnavailable(PcigateError):
    exit_code = ExitCode.VAULT_UNAVAILABLE
    code = "vault_unavailable"


class DatabaseUnavailable(PcigateError):
    exit_code = ExitCode.DATABASE_UNAVAILABLE
    code = "database_unavailable"


class PortInUse(PcigateError):
    exit_code = ExitCode.PORT_IN_USE
    code = "port_in_use"

    @classmethod
    def binding(cls, host: str, port: int, exc: OSError) -> PortInUse:
        """The error for a local listener that could not bind ``host:port``."""
        return cls(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                   hint="choose another port with --port, or 0 for any")


class PendingApproval(PcigateError):
    exit_code = ExitCode.PENDING_APPROVAL
    code = "pending_approval"


class KeyringUnavailable(PcigateError):
    exit_code = ExitCode.KEYRING_UNAVAILABLE
    code = "keyring_unavailable"


class ProtocolError(PcigateError):
    exit_code = ExitCode.PROTOCOL_ERROR
    code = "protocol_error"


class Conflict(PcigateError):
    """The thing changed state meanwhile or already is what was asked (a decided request, a duplicate)."""

    exit_code = ExitCode.CONFLICT
    code = "conflict"


class AuditInvalid(PcigateError):
    """``audit verify`` found the log or a stored recording altered, missing or out of order."""

    exit_code = ExitCode.AUDIT_INVALID
    code = "audit_invalid"


class RecordingError(PcigateError):
    exit_code = ExitCode.RECORDING_ERROR
    code = "recording_error"


class IdpUnavailable(PcigateError):
    exit_code = ExitCode.IDP_UNAVAILABLE
    code = "idp_unavailable"


# Broker error codes (the ``error.code`` of an API error body) → CLI exception class.
BROKER_ERROR_CLASSES: dict[str, type[PcigateError]] = {
    "unauthenticated": AuthRequired,
    "token_invalid": AuthRequired,
    "forbidden": AccessDenied,
    "level_not_allowed": AccessDenied,
    "unknown_target": NotFound,
    "not_found": NotFound,
    "vault_unavailable": VaultUnavailable,
    "database_unavailable": DatabaseUnavailable,
    "digest_mismatch": RecordingError,
    "recording_invalid": RecordingError,
    "too_large": RecordingError,
    "validation_error": UsageError,
    "session_closed": PcigateError,
    "idp_unavailable": IdpUnavailable,
    "grant_required": AccessDenied,
    "mfa_required": AuthRequired,
}
