"""Faults a user meets, on a stack of their own (components are stopped here, so not the shared stack).

Each failure must give one clear line, a distinct exit code, no traceback, no secret, and lose nothing:
a killed psql, a database connection dropped under psql, a pcigate process killed outright (the broker's
reaper revokes the lease; the spooled recording is uploaded by the next command), the broker down, the
database down, OpenBao down. Everything is real: the tests stop and start the real processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests.stack.cli import CliProcess, CliResult, run_cli
from tests.stack.stack import Stack

SESSION_ENDED = re.compile(r"session (\S+) ended; recording uploaded")


@pytest.fixture(scope="module")
def fstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("faults"),
        broker_options={"heartbeat_seconds": 1, "heartbeat_grace_seconds": 3, "reaper_interval_seconds": 1},
    )
    stack.start()
    yield stack
    bao_stopped = stack.bao.proc is not None and stack.bao.proc.poll() is not None
    try:
        stack.stop()
    except Exception:
        if not bao_stopped:  # the OpenBao test stops it on purpose; teardown cannot revoke through it then
            raise


@pytest.fixture
def env(fstack: Stack, tmp_path: Path) -> dict[str, str]:
    return fstack.cli_env(tmp_path / "home", token=fstack.idp.workload_token())


def assert_one_clear_line(result: CliResult, code: int, words: str) -> None:
    assert result.code == code, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert len(lines) <= 2, result.stderr  # the error, and at most one hint
    assert re.search(words, lines[0], re.I), lines[0]


def psql_child(cli: CliProcess, timeout: float = 20) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(cli.proc.pid).children(recursive=True):
            if child.name() == "psql":
                return child
        time.sleep(0.05)
    raise TimeoutError(f"no psql child; stderr: {cli.stderr}")


def wait_sleeping_backend(stack: Stack, timeout: float = 20) -> str:
    """The pid of the dynamic role's backend running pg_sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = stack.pg.psql(
            "SELECT pid FROM pg_stat_activity WHERE usename LIKE 'v-%' AND query LIKE '%pg_sleep%'"
        )
        if pid:
            return pid.splitlines()[0]
        time.sleep(0.05)
    raise TimeoutError("the session's query never reached the database")


def session_json(env: dict[str, str], sid: str) -> dict[str, object]:
    r = run_cli(["sessions", "show", sid, "--json"], env=env)
    assert r.code == 0, r.stderr
    data: dict[str, object] = json.loads(r.stdout)
    return data


def test_killed_psql_still_ends_the_session(fstack: Stack, env: dict[str, str]) -> None:
    cli = CliProcess(["connect", "prod-db", "--", "-c", "select pg_sleep(60)"], env)
    wait_sleeping_backend(fstack)
    psql_child(cli).send_signal(signal.SIGKILL)
    result = cli.wait(60)
    assert result.code == 128 + signal.SIGKILL
    sid = SESSION_ENDED.search(result.stderr + result.stdout)
    assert sid, result.stderr
    assert "Traceback" not in result.stderr
    shown = session_json(env, sid.group(1))
    assert shown["status"] == "ended"
    assert shown["lease_revoked"] is True
    assert shown["recording_sha256"]
    assert fstack.bao.leases() == []
    assert fstack.leftover_roles() == []


def test_dropped_database_connection_ends_the_session(fstack: Stack, env: dict[str, str]) -> None:
    cli = CliProcess(["connect", "prod-db", "--", "-c", "select pg_sleep(60)"], env)
    backend = wait_sleeping_backend(fstack)
    fstack.pg.psql(f"SELECT pg_terminate_backend({backend})")
    result = cli.wait(60)
    assert result.code != 0  # psql reports the lost connection and fails; pcigate passes its status on
    assert "terminat" in (result.stdout + result.stderr).lower()
    sid = SESSION_ENDED.search(result.stderr + result.stdout)
    assert sid, result.stderr
    shown = session_json(env, sid.group(1))
    assert shown["lease_revoked"] is True
    assert shown["recording_sha256"]
    assert fstack.bao.leases() == []
    assert fstack.leftover_roles() == []


def test_killed_pcigate_lease_reaped_and_recording_uploaded_later(
    fstack: Stack, env: dict[str, str]
) -> None:
    cli = CliProcess(["connect", "prod-db", "--", "-c", "select 42 as answer; select pg_sleep(60)"], env)
    wait_sleeping_backend(fstack)
    assert len(fstack.bao.leases()) == 1
    os.kill(cli.proc.pid, signal.SIGKILL)  # no clean-up at all: the client simply vanishes
    cli.wait(10)
    # The broker's reaper notices the missing heartbeats (grace 3 s here) and revokes the lease: the
    # dynamic role is dropped and the orphaned psql's backend is terminated.
    deadline = time.monotonic() + 30
    while (fstack.bao.leases() or fstack.leftover_roles()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fstack.bao.leases() == []
    assert fstack.leftover_roles() == []
    spool = Path(env["PCIGATE_STATE_DIR"]) / "spool"
    recs = list(spool.glob("*.rec"))
    assert len(recs) == 1, list(spool.iterdir())
    sid = recs[0].stem
    # Nothing lost: the next command uploads the spooled recording (the part written before the kill).
    r = run_cli(["sessions", "sync"], env=env)
    assert r.code == 0, r.stderr
    shown = session_json(env, sid)
    assert shown["status"] == "revoked"
    assert shown["end_reason"] == "heartbeat_lost"
    assert shown["recording_sha256"], shown
    assert not list(spool.glob("*.rec"))


def _killed_mid_session(fstack: Stack, env: dict[str, str]) -> tuple[Path, Path]:
    """A `connect` SIGKILLed while psql waits in the database: its spool directory and recording."""
    cli = CliProcess(["connect", "prod-db", "--", "-c", "select pg_sleep(60)"], env)
    wait_sleeping_backend(fstack)
    os.kill(cli.proc.pid, signal.SIGKILL)
    cli.wait(10)
    spool = Path(env["PCIGATE_STATE_DIR"]) / "spool"
    (rec,) = spool.glob("*.rec")
    return spool, rec


def test_an_empty_spooled_recording_is_reported_not_kept_forever(fstack: Stack, env: dict[str, str]) -> None:
    """A CLI killed between creating its recording and writing the header (microseconds; simulated here by
    emptying the file after a real SIGKILL, since the window cannot be hit on purpose): sync ends the
    session, says nothing was recorded, and the spool is empty (before: every sync failed with exit 13)."""
    spool, rec = _killed_mid_session(fstack, env)
    rec.write_bytes(b"")
    r = run_cli(["sessions", "sync"], env=env)
    assert r.code == 0, r.stderr
    assert f"session {rec.stem}: nothing was recorded" in r.stderr
    assert not list(spool.glob("*.rec"))
    assert not list(spool.glob("*.json"))
    assert session_json(env, rec.stem)["status"] != "active"


def test_a_deleted_spooled_recording_is_reported_until_an_operator_looks(
    fstack: Stack, env: dict[str, str]
) -> None:
    """A spooled session whose recording was deleted (here by hand after a real SIGKILL) is a gap in the
    evidence: sync ends the session, says the recording is missing (exit 13), and keeps the entry, so every
    later sync says it again; the quiet sync of other commands leaves it alone (before: "ended", exit 0, and
    the entry gone)."""
    spool, rec = _killed_mid_session(fstack, env)
    sid = rec.stem
    assert json.loads((spool / f"{sid}.json").read_text())["recorded"] is True
    rec.unlink()
    for _ in range(2):
        r = run_cli(["sessions", "sync"], env=env)
        assert r.code == 13, (r.code, r.stderr)
        assert "Traceback" not in r.stderr
        kept = rf"session {sid}: kept in the spool: its recording \S+{sid}\.rec is missing"
        assert re.search(kept, r.stderr), r.stderr
    assert session_json(env, sid)["status"] != "active"  # the lease was revoked all the same
    assert (spool / f"{sid}.json").exists()
    assert run_cli(["targets"], env=env).code == 0  # its quiet sync skips the entry
    assert (spool / f"{sid}.json").exists()


def test_recording_disk_full_ends_the_session(fstack: Stack, env: dict[str, str], tmp_path: Path) -> None:
    """Fail closed: when the recording cannot be written (a real 64 KiB tmpfs fills up), the session is
    ended at once rather than left running unrecorded, and its lease is revoked."""
    import subprocess

    state = Path(env["PCIGATE_STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(state)], check=True)
    try:
        script = tmp_path / "many.sql"
        filler = "x" * 500
        script.write_text("".join(f"select '{filler}' as c{i};\n" for i in range(2000))
                          + "select pg_sleep(60);\n")
        t0 = time.monotonic()
        result = run_cli(["connect", "prod-db", "--", "-q", "-o", "/dev/null", "-f", str(script)], env=env,
                         timeout=90)
        elapsed = time.monotonic() - t0
        assert "nothing may run unrecorded" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert result.code != 0
        assert elapsed < 45, elapsed  # not the 60 s the last statement would have taken
        assert fstack.bao.leases() == []
        assert fstack.leftover_roles() == []
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_broker_down_is_exit_6(fstack: Stack, env: dict[str, str]) -> None:
    assert fstack.broker is not None
    fstack.broker.stop()
    try:
        assert_one_clear_line(run_cli(["targets"], env=env), 6, "broker")
        assert_one_clear_line(run_cli(["connect", "prod-db", "--", "-c", "select 1"], env=env), 6, "broker")
    finally:
        fstack.broker.restart()


def test_database_down_is_exit_8(fstack: Stack, env: dict[str, str]) -> None:
    fstack.pg.stop()
    try:
        result = run_cli(["connect", "prod-db", "--", "-c", "select 1"], env=env)
        assert_one_clear_line(result, 8, "database")
    finally:
        fstack.pg.start()
    assert fstack.bao.leases() == []


def test_openbao_down_is_exit_7(fstack: Stack, env: dict[str, str]) -> None:
    """Last in this module: a dev OpenBao keeps its state in memory and cannot be brought back."""
    assert fstack.bao.leases() == []
    fstack.bao.stop()
    result = run_cli(["connect", "prod-db", "--", "-c", "select 1"], env=env)
    assert_one_clear_line(result, 7, "openbao|vault")
    assert fstack.leftover_roles() == []
