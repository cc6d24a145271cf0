"""Pieces of ``pcigate connect`` that need no stack: psql's environment, argv and password file; the spool."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pcigate import spool
from pcigate.errors import (
    AuthRequired,
    BrokerUnavailable,
    IdpUnavailable,
    NotFound,
    PcigateError,
    RecordingError,
    VaultUnavailable,
)
from pcigate.models import DatabaseCredentials, DataPathPolicy, SessionOpened, SessionSummary
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


def test_child_env_strips_every_pcigate_variable(tmp_path: Path) -> None:
    base = {
        "PCIGATE_TOKEN": "workload-bearer",
        "PCIGATE_TOKEN_FILE": "/t",
        "PCIGATE_BROKER": "https://b",
        "PCIGATE_ANYTHING_NEW": "x",
        "PGPASSWORD": "pw",
        "HOME": "/home/a",
    }
    env = child_env(tmp_path / "pgpass", base)
    assert not [k for k in env if k.upper().startswith("PCIGATE_")]
    assert "workload-bearer" not in env.values()
    assert "PGPASSWORD" not in env
    assert env["HOME"] == "/home/a"


# --- the live part and the way out, with a fake broker client ----------------------------------------------
class FakeClient:
    def __init__(self, heartbeats: list[object] | None = None) -> None:
        self.heartbeats = list(heartbeats or [])
        self.ended: list[str] = []

    def heartbeat(self, session_id: str) -> object:
        item = self.heartbeats.pop(0) if self.heartbeats else None
        if isinstance(item, BaseException):
            raise item
        return item

    def end_session(self, session_id: str) -> None:
        self.ended.append(session_id)

    def upload_recording(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("nothing to upload")


@pytest.mark.parametrize(("recorded", "kept"), [(True, True), (None, False), (False, False)])
def test_settle_tells_a_missing_recording_from_a_session_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: bool | None, kept: bool
) -> None:
    """No ``.rec`` in the spool: a gap in the evidence when the session recorded (kept and reported); nothing
    to say when it did not, or when the entry is from a CLI that did not write ``recorded`` (as before)."""
    monkeypatch.setenv("PCIGATE_STATE_DIR", str(tmp_path))
    entry = spool.new_entry("abc", "http://b/", recorded=recorded)
    client = FakeClient()
    result, receipt = spool.settle(client, entry)  # type: ignore[arg-type]
    assert client.ended == ["abc"]  # the lease is revoked either way
    assert receipt is None
    assert result.ended
    assert result.kept is kept
    meta = tmp_path / "spool" / "abc.json"
    if kept:
        assert result.error is not None
        assert "missing from the spool" in result.error
        left = spool.read_entry(meta)
        assert left is not None
        assert left.rejected == result.error
        assert not left.end_owed
    else:
        assert result.error is None
        assert not meta.exists()


def _connector(client: FakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pcigate.config import Settings
    from pcigate.output import Output
    from pcigate.session import Connector

    monkeypatch.setenv("PCIGATE_STATE_DIR", str(tmp_path / "state"))
    return Connector(client, Settings(broker="http://127.0.0.1:8600"), Output())  # type: ignore[arg-type]


def _closed(code: str) -> PcigateError:
    err = PcigateError("session is revoked")
    err.broker_code = code  # type: ignore[attr-defined]
    return err


def test_transient_heartbeat_failures_do_not_end_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from pcigate.session import _State

    transient = [
        BrokerUnavailable("cannot reach the broker"),
        BrokerUnavailable("the broker failed (HTTP 502)"),
        VaultUnavailable("openbao down"),
        AuthRequired("the broker refused the sign-in"),
        IdpUnavailable("idp down"),
    ]
    summary = SessionSummary.model_construct(status="active")
    client = FakeClient([*transient, summary, _closed("session_closed")])
    connector = _connector(client, tmp_path, monkeypatch)
    session = opened().model_copy(update={"heartbeat_seconds": 0})
    monkeypatch.setattr("pcigate.session.MIN_HEARTBEAT_SECONDS", 0.001)

    async def run() -> _State:
        state = _State(stop=asyncio.Event())
        await asyncio.wait_for(connector._heartbeat(session, state), 5)
        return state

    state = asyncio.run(run())
    assert client.heartbeats == []  # every transient failure was retried; only session_closed stopped it
    assert state.stop.is_set()
    assert state.notes == ["the broker ended the session: session is revoked"]
    assert capsys.readouterr().err.count("heartbeat failed") == 1


def test_not_found_heartbeat_ends_the_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from pcigate.session import _State

    client = FakeClient([NotFound("no such session")])
    connector = _connector(client, tmp_path, monkeypatch)
    session = opened().model_copy(update={"heartbeat_seconds": 0})
    monkeypatch.setattr("pcigate.session.MIN_HEARTBEAT_SECONDS", 0.001)

    async def run() -> _State:
        state = _State(stop=asyncio.Event())
        await asyncio.wait_for(connector._heartbeat(session, state), 5)
        return state

    assert asyncio.run(run()).stop.is_set()


def test_a_failing_spool_write_still_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient()
    connector = _connector(client, tmp_path, monkeypatch)

    def disk_full(entry: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "write_entry", disk_full)
    connector._finish(opened(), None, interrupted=False)
    assert client.ended == ["s1"]
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert "session s1 ended" in err


def test_a_failing_spool_setup_still_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pcigate.session import ConnectRequest

    client = FakeClient()
    client.open_session = lambda request: opened()  # type: ignore[attr-defined]
    connector = _connector(client, tmp_path, monkeypatch)

    def unwritable(session_id: str, broker: str, *, recorded: bool | None = None) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "state" / "spool" / "s1.json"))

    monkeypatch.setattr(spool, "new_entry", unwritable)
    with pytest.raises(RecordingError) as err:
        connector.run(ConnectRequest(target="prod-db", no_exec=True))
    assert client.ended == ["s1"]
    assert "Permission denied" in err.value.message
    assert "s1.json" in err.value.message


def test_psql_is_ended_when_the_broker_ends_the_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import time

    from pcigate.session import _State

    connector = _connector(FakeClient(), tmp_path, monkeypatch)
    fake_psql = tmp_path / "psql"
    fake_psql.write_text("#!/bin/sh\nexec sleep 60\n")
    fake_psql.chmod(0o755)

    async def run() -> tuple[int, float]:
        state = _State(stop=asyncio.Event())

        async def expire() -> None:
            await asyncio.sleep(0.5)
            state.notes.append("the session reached its end time")
            state.stop.set()

        task = asyncio.create_task(expire())
        t0 = time.monotonic()
        status = await connector._run_psql(str(fake_psql), opened(), 1, tmp_path / "pgpass", [], state)
        await task
        return status, time.monotonic() - t0

    status, took = asyncio.run(run())
    assert took < 5
    assert status == 128 + 15  # SIGTERM
    assert "the session reached its end time" in capsys.readouterr().err


# A child that sleeps through the first SIGTERM (its handler only counts) and exits on the second: what
# OpenSSH 9.2's client does when the signal lands between its quit check and its poll() (see end_child).
_LOSES_FIRST_TERM = """
import os, signal, sys, time
seen = 0
def on_term(signum, frame):
    global seen
    seen += 1
    if seen >= 2:
        os._exit(3)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(60)
"""
_IGNORES_TERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(60)
"""


def _end(script: str, grace: float, every: float) -> tuple[int, float]:
    import asyncio
    import subprocess
    import sys
    import time

    from pcigate.session import end_child

    async def main() -> tuple[int, float]:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        exited = asyncio.get_running_loop().run_in_executor(None, proc.wait)
        start = time.monotonic()
        await end_child(proc, exited, grace, every)
        code = await exited
        proc.stdout.close()
        return code, time.monotonic() - start

    return asyncio.run(main())


def test_end_child_sends_sigterm_again_to_a_child_that_slept_through_the_first() -> None:
    code, took = _end(_LOSES_FIRST_TERM, grace=20.0, every=0.2)
    assert code == 3  # it ended itself on the second SIGTERM; not SIGKILLed
    assert took < 5.0


def test_end_child_kills_a_child_that_ignores_sigterm_after_the_grace() -> None:
    code, took = _end(_IGNORES_TERM, grace=1.0, every=0.2)
    assert code == -9
    assert 0.9 <= took < 5.0
