"""The broker's one exception type for API errors: ``ApiError(status, code, message)``.

Raised anywhere below the routes; ``app.py`` renders every error (these, validation errors, unknown routes and
unexpected exceptions) as ``{"error": {"code", "message"}}``. Messages are one line and never hold secrets.
"""

from __future__ import annotations

from pcigate.models import ErrorCode


class ApiError(Exception):
    def __init__(
        self, status: int, code: ErrorCode, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code: ErrorCode = code
        self.message = message.splitlines()[0] if message else code
        self.headers = headers


class VaultUnavailable(Exception):
    """OpenBao/Vault cannot serve the request (down, sealed, 5xx, refused our token)."""


class DatabaseUnavailable(Exception):
    """OpenBao answered, but it could not reach / log in to the target database."""


class NotFoundError(ApiError):
    def __init__(self, message: str = "no such session") -> None:
        super().__init__(404, "not_found", message)


class Forbidden(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(403, "forbidden", message)
