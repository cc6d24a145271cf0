"""Client settings and the state directory (stdlib only: imported on the ``--help`` fast path).

Precedence is flag > environment > default (docs/configuration.md, "CLI").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from pcigate.errors import UsageError

DEFAULT_BROKER = "http://127.0.0.1:8600"
ENV_BROKER = "PCIGATE_BROKER"
ENV_TOKEN = "PCIGATE_TOKEN"
ENV_TOKEN_FILE = "PCIGATE_TOKEN_FILE"
ENV_STATE_DIR = "PCIGATE_STATE_DIR"
ENV_PSQL = "PCIGATE_PSQL"


@dataclass(frozen=True)
class Settings:
    """What the root callback resolved; handed to every command through the typer context."""

    broker: str = DEFAULT_BROKER
    token_file: Path | None = None
    json: bool = False

    @property
    def broker_url(self) -> str:
        return self.broker.rstrip("/")


def check_broker_url(url: str) -> str:
    """The broker URL, refused unless it is ``https://`` (or ``http://`` to a loopback host): bearer tokens go
    to it, and its ``/v1/config/oidc`` decides where the refresh token goes."""
    from urllib.parse import urlsplit

    from pcigate.net import is_loopback

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as exc:
        raise UsageError(f"invalid broker URL {url!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise UsageError(
            f"invalid broker URL {url!r}",
            hint="use a URL like https://pcigate.example.com (--broker / PCIGATE_BROKER)",
        )
    if scheme == "http" and not is_loopback(host):
        raise UsageError(
            f"refusing the plain http:// broker URL {url}: tokens would cross the network unencrypted",
            hint="use https:// for the broker URL (--broker / PCIGATE_BROKER)",
        )
    return url


def state_dir(*, create: bool = True) -> Path:
    """``$PCIGATE_STATE_DIR`` or ``$XDG_STATE_HOME/pcigate`` (``~/.local/state/pcigate``), mode 0700."""
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        path = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_STATE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
        path = base / "pcigate"
    if create:
        _private_dir(path)
    return path


def spool_dir(*, create: bool = True) -> Path:
    path = state_dir(create=create) / "spool"
    if create:
        _private_dir(path)
    return path


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def psql_binary() -> str:
    return os.environ.get(ENV_PSQL) or "psql"


# A session id as the broker makes them, and the only text the CLI puts in a session's URL path or spool
# file name.
SESSION_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")

_DURATION_RE = re.compile(r"(\d+)\s*([smhd])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# No duration pcigate takes is longer (sessions: 24 h); the bound keeps date arithmetic (`--since 999999d`)
# and the text's size in range.
MAX_DURATION_SECONDS = 10 * 365 * 86400
_MAX_DURATION_TEXT = 64


def format_duration(seconds: int) -> str:
    """Seconds → ``"2h"``, ``"30m"`` or ``"45s"`` (the largest unit that divides it)."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def parse_duration(text: str, *, at_most: int = MAX_DURATION_SECONDS) -> int:
    """``"90s"``, ``"30m"``, ``"1h"``, ``"1h30m"``, ``"2d"`` or plain seconds → seconds, more than zero and
    at most ``at_most``."""
    value = text.strip().lower()
    if len(value) > _MAX_DURATION_TEXT:
        raise UsageError(f"invalid duration {text[:20]!r}... ({len(text)} characters)",
                         hint='use a duration like "90s", "30m" or "1h"')
    if value.isdigit():
        seconds = int(value)
    else:
        pos = 0
        seconds = 0
        for match in _DURATION_RE.finditer(value):
            if match.start() != pos:
                break
            seconds += int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
            pos = match.end()
        if pos != len(value) or not value:
            raise UsageError(f"invalid duration {text!r}", hint='use a duration like "90s", "30m" or "1h"')
    if seconds <= 0:
        raise UsageError(f"invalid duration {text!r}: must be more than zero")
    if seconds > at_most:
        raise UsageError(f"invalid duration {text!r}: at most {format_duration(at_most)}")
    return seconds


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 date/datetime (naive = UTC) or a duration ago (``"24h"``) → aware UTC datetime."""
    now = now or datetime.now(UTC)
    value = text.strip()
    try:
        if len(value) == 10:
            d = date.fromisoformat(value)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        try:
            return now - timedelta(seconds=parse_duration(value))
        except UsageError:
            raise UsageError(
                f"invalid time {text!r}", hint='use an ISO date like "2025-01-31" or a duration like "24h"'
            ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)
