"""Duration and time parsing of the CLI (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pcigate.config import (
    MAX_DURATION_SECONDS,
    format_duration,
    parse_duration,
    parse_time,
    spool_dir,
    state_dir,
)
from pcigate.errors import ExitCode, UsageError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("45", 45), (" 5M ", 300)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "1h-", "0", "0m", "m30", "1.5h", "-5m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_duration(text)
    assert err.value.exit_code == ExitCode.USAGE


def test_parse_duration_bounds() -> None:
    """Too long a duration is a usage error naming the bound, never an overflow or a model's error later."""
    assert parse_duration("24h", at_most=24 * 3600) == 86400
    with pytest.raises(UsageError, match=r"^invalid duration '25h': at most 24h$"):
        parse_duration("25h", at_most=24 * 3600)
    assert parse_duration(f"{MAX_DURATION_SECONDS}") == MAX_DURATION_SECONDS
    for text in (f"{MAX_DURATION_SECONDS + 1}", "99999999999d", "9" * 5000, "1h" * 40):
        with pytest.raises(UsageError) as err:
            parse_duration(text)
        assert len(err.value.message) < 80
    with pytest.raises(UsageError, match="invalid time"):
        parse_time("99999999999d")


@pytest.mark.parametrize(("seconds", "text"), [(7200, "2h"), (1800, "30m"), (90, "90s"), (3660, "61m")])
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_parse_time() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_time("24h", now=now) == now - timedelta(hours=24)
    assert parse_time("2025-01-31", now=now) == datetime(2025, 1, 31, tzinfo=UTC)
    assert parse_time("2025-01-31T10:00:00Z") == datetime(2025, 1, 31, 10, tzinfo=UTC)
    assert parse_time("2025-01-31T10:00:00+02:00") == datetime(2025, 1, 31, 8, tzinfo=UTC)
    with pytest.raises(UsageError):
        parse_time("yesterday")


def test_state_dir_is_private(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCIGATE_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    d = state_dir()
    assert d == tmp_path / "xdg" / "pcigate"
    assert d.stat().st_mode & 0o777 == 0o700
    assert spool_dir().stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("PCIGATE_STATE_DIR", str(tmp_path / "s"))
    assert spool_dir() == tmp_path / "s" / "spool"


@pytest.mark.parametrize(
    "url",
    [
        "https://pcigate.example.com",
        "http://127.0.0.1:8600",
        "http://localhost:8600",
        "http://[::1]:8600",
        "HTTPS://pcigate.example.com/",
    ],
)
def test_broker_url_accepted(url: str) -> None:
    from pcigate.config import check_broker_url

    assert check_broker_url(url) == url


def test_plain_http_to_a_remote_broker_is_refused() -> None:
    from pcigate.config import check_broker_url

    with pytest.raises(UsageError) as err:
        check_broker_url("http://pcigate.example.com:8600")
    assert err.value.exit_code == ExitCode.USAGE
    assert "http://" in err.value.message
    assert "https" in (err.value.hint or "")


@pytest.mark.parametrize("url", ["ftp://pcigate.example.com", "pcigate.example.com", "https://"])
def test_invalid_broker_url_is_refused(url: str) -> None:
    from pcigate.config import check_broker_url

    with pytest.raises(UsageError):
        check_broker_url(url)


def test_commands_refuse_plain_http_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pcigate.app import app

    monkeypatch.setenv("PCIGATE_TOKEN", "workload")
    for args in (["targets"], ["login", "--no-browser"], ["logout"]):
        result = CliRunner().invoke(app, ["--broker", "http://pcigate.example.com", *args])
        assert isinstance(result.exception, UsageError), (args, result.output)
        assert "use https://" in (result.exception.hint or "")
