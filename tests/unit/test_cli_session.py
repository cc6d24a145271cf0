"""Pieces of ``pcigate connect`` that need no stack: psql's environment, argv and password file; the spool."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pcigate import spool
from pcigate.models import DatabaseCredentials, DataPathPolicy, SessionOpened
from pcigate.session import STRIPPED_ENV, child_env, passfile, psql_argv


def opened() -> SessionOpened:
    now = datetime.now(UTC)
    return SessionOpened(
        session_id="s1",
        target="prod-db",
        level="read",
        user="alice",
        started_at=now,
        expires_at=now,
        lease_id="database/creds/x/1",
        heartbeat_seconds=30,
        credentials=DatabaseCredentials(
            host="db", port=5432, database="prod", username="v-1", password="SECRET"
        ),
        policy=DataPathPolicy(),
    )


def test_passfile_is_private_and_removed() -> None:
    with passfile(15432, "one-time") as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.read_text() == "127.0.0.1:15432:*:*:one-time\n"
    assert not path.exists()
    assert not path.parent.exists()


def test_child_env_strips_connection_variables(tmp_path: Path) -> None:
    base = {name: "x" for name in STRIPPED_ENV} | {"HOME": "/home/a", "PGAPPNAME": "mine"}
    env = child_env(tmp_path / "pgpass", base)
    assert env["PGPASSFILE"] == str(tmp_path / "pgpass")
    assert "PGPASSWORD" not in env
    assert "PGHOST" not in env
    assert "PGSERVICE" not in env
    assert env["HOME"] == "/home/a"
    assert env["PGAPPNAME"] == "mine"


def test_psql_argv_points_at_the_tunnel_only() -> None:
    argv = psql_argv("/usr/bin/psql", opened(), 15432, ["-c", "select 1"])
    assert argv == [
        "/usr/bin/psql",
        "-h",
        "127.0.0.1",
        "-p",
        "15432",
        "-d",
        "prod",
        "-U",
        "v-1",
        "-c",
        "select 1",
    ]
    assert "SECRET" not in " ".join(argv)
    assert "SECRET" not in repr(opened())


def test_spool_entries_and_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCIGATE_STATE_DIR", str(tmp_path))
    entry = spool.new_entry("abc", "http://b/")
    assert spool.pending("http://b") == [entry]
    assert spool.pending("http://other") == []
    meta = tmp_path / "spool" / "abc.json"
    assert stat.S_IMODE(meta.stat().st_mode) == 0o600
    with spool.session_lock("abc") as held:
        assert held
        with spool.session_lock("abc", wait=False) as second:
            assert second is False  # a live session is never touched by a sync
    spool.forget("abc")
    assert spool.pending() == []
    with pytest.raises(Exception):
        spool.recording_path("../etc/passwd")
