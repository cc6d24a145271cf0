"""The warm start (``pcigate.resident``) on the real stack: ``connect`` and ``ssh`` handed to a resident
helper that forks a worker per command, psql run by the client in the user's terminal.

The CLI tests that matter most for it (psql's exit status and arguments, the password and the workload token
never reaching psql, closed standard streams, Ctrl-C, signals while the session ends, the broker down at exit,
faults, ssh terminals and port forwards) are collected here a second time, with this module's fixtures: the
warm start on and one helper already running. Each must pass as it does in-process, and each must have been
served by the helper (:func:`warm` checks the count of commands the helper served). The tests after them are
the warm start's own: where the command really runs, a terminal, a killed client, a dead or idle helper, a
socket of another user, the off switch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from tests.integration.test_cli_flows import (  # noqa: F401 - collected again here, warm
    test_a_session_with_standard_streams_closed_ends_well,
    test_a_signal_while_the_session_ends_says_what_is_kept,
    test_broker_down_at_exit_spools_then_sync_uploads,
    test_connect_runs_psql_revokes_and_uploads,
    test_no_exec_waits_for_ctrl_c,
    test_password_never_reaches_psql,
    test_port_in_use_is_exit_9_before_any_session,
    test_psql_exit_code_is_passed_through,
    test_psql_options_past_the_tunnel_are_refused_before_any_session,
    test_unknown_target_and_level,
    test_workload_token_never_reaches_psql,
)
from tests.integration.test_cli_ssh import (  # noqa: F401 - its terminal, fixture, two tests collected again
    PtyCli,
    pty_cli,
    test_connect_forwards_a_local_port,
    test_interactive_session_masks_records_and_returns_the_exit_status,
)
from tests.integration.test_faults import (  # noqa: F401 - their stack, and four tests collected again
    env,
    fstack,
    test_broker_down_is_exit_6,
    test_database_down_is_exit_8,
    test_dropped_database_connection_ends_the_session,
    test_killed_psql_still_ends_the_session,
)
from tests.stack.cli import CliProcess, last_session
from tests.stack.cli import run_cli as run_with
from tests.stack.ports import stop_processes
from tests.stack.stack import WARM_DIR_ENV, Stack

# --- the helper ------------------------------------------------------------------------------------------


def helpers(warm_dir: Path) -> dict[Path, tuple[int, int]]:
    """Each helper's socket in ``warm_dir`` with its pid and the commands it has served (its lock file)."""
    found = {}
    for lock in (warm_dir / "pcigate").glob("warm-*.sock.lock"):
        fields = lock.read_text().split()
        sock = lock.with_suffix("")
        if len(fields) == 2 and sock.exists() and _alive(int(fields[0])):
            found[sock] = (int(fields[0]), int(fields[1]))
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_helper(warm_dir: Path, other_than: int | None = None, timeout: float = 30.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [v for v in helpers(warm_dir).values() if v[0] != other_than]
        if live:
            return live[0]
        time.sleep(0.05)
    raise TimeoutError(f"no helper came up in {warm_dir}")


def start_helper(stack: Stack, warm_dir: Path, home: Path) -> tuple[int, int]:
    """What starts one for a user: a routed command that found none (here one that fails at once: nobody
    is signed in)."""
    r = run_with(["connect", "prod-db"], env=stack.cli_env(home))
    assert r.code == 3, r.output
    return wait_for_helper(warm_dir)


def stop_helpers(warm_dir: Path) -> None:
    """Every helper serving a socket in ``warm_dir``, found by its command line (also one whose socket is
    already gone or not yet bound): SIGTERM, then SIGKILL."""
    mine = [p for p in psutil.process_iter(["cmdline"])
            if "import pcigate.resident" in " ".join(p.info["cmdline"] or [])
            and (p.info["cmdline"] or [""])[-1].startswith(f"{warm_dir}/")]
    stop_processes(mine, 10)


def served(warm_dir: Path) -> int:
    return sum(n for _, n in helpers(warm_dir).values())


@pytest.fixture(scope="module")
def warm_dir(stack_base: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The runtime directory of this module's CLIs (short: a socket path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pgw-", dir="/tmp"))
    path.chmod(0o700)
    mp = pytest.MonkeyPatch()
    mp.setenv(WARM_DIR_ENV, str(path))
    try:
        start_helper(stack_base, path, tmp_path_factory.mktemp("warm-home"))
        yield path
    finally:
        mp.undo()
        stop_helpers(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def warm(stack_base: Stack, warm_dir: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
         tmp_path: Path) -> Iterator[Path]:
    """The warm start on for every CLI the test runs (``Stack.cli_env``), a helper running; a test
    collected from another module must have had at least one command served by the helper."""
    monkeypatch.setenv(WARM_DIR_ENV, str(warm_dir))
    if not helpers(warm_dir):  # a test before stopped it
        start_helper(stack_base, warm_dir, tmp_path / "helper-home")
    before = served(warm_dir)
    yield warm_dir
    if request.node.function.__module__ != __name__:
        assert served(warm_dir) > before, "no command of this test went through the warm helper"


# --- the warm start's own ---------------------------------------------------------------------------------


def _listener_pid(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    raise LookupError(port)


def test_the_session_runs_in_a_fork_of_the_helper(stack: Stack, login, run_cli, cli_env, warm_dir) -> None:
    """The tunnel listens in a worker the helper forked, not in the process the user started; Ctrl-C to that
    process still ends the session (lease revoked, recording uploaded)."""
    assert login("alice", device=False).code == 0
    (helper, count), = helpers(warm_dir).values()
    cli = CliProcess(["connect", "prod-db", "--no-exec", "--json"], cli_env)
    try:
        ready = json.loads(cli.wait_for(r"\{[^}]*\}", timeout=30).group(0))
        worker = psutil.Process(_listener_pid(int(ready["port"])))
        assert worker.pid != cli.proc.pid
        assert worker.ppid() == helper
        assert helpers(warm_dir)[next(iter(helpers(warm_dir)))] == (helper, count + 1)
        q = subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(ready["port"]),
                            "-U", ready["user"], "-d", ready["dbname"], "-c", "select 'through the worker'"],
                           env={**cli_env, "PGPASSFILE": ready["pgpassfile"]}, capture_output=True,
                           text=True, timeout=30)
        assert q.stdout.strip() == "through the worker", q.stderr
        cli.proc.send_signal(signal.SIGINT)
        r = cli.wait(30)
    finally:
        cli.kill()
    assert r.code == 0, r.output
    assert f"session {ready['session_id']} ended; recording uploaded" in r.stderr
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    shown = json.loads(run_cli(["sessions", "show", ready["session_id"], "--json"]).stdout)
    assert shown["status"] == "ended"
    assert shown["lease_revoked"] is True
    assert shown["lease_id"] not in stack.bao.leases()


def test_psql_is_the_terminals_own_job(stack: Stack, login, run_cli, cli_env) -> None:
    """psql is a child of the process the user started, in their terminal: its prompt, Ctrl-C cancelling a
    running query (psql's own cancel request, through the tunnel), its pager, then \\q ends the session."""
    assert login("alice", device=False).code == 0
    term = PtyCli(["connect", "prod-db"], {**cli_env, "TERM": "xterm", "PAGER": "cat"})
    try:
        term.expect(r"prod=> ")
        psql = [p for p in psutil.Process(term.pid).children() if p.name() == "psql"]
        assert len(psql) == 1, "psql is not the client's own child"
        term.send("select pg_sleep(30);\n")
        time.sleep(1.0)
        term.send("\x03")  # Ctrl-C
        term.expect(r"canceling statement due to user request[\s\S]*prod=> ")
        term.send("select 6 * 7 as answer;\n")
        term.expect(r"answer\s+-+\s+42")
        term.send("\\q\n")
        status = term.wait()
    finally:
        term.close()
    assert status == 0, term.screen
    assert re.search(r"session \S+ ended; recording uploaded", term.screen), term.screen
    session = last_session(run_cli)
    assert session["status"] == "ended"
    assert session["lease_revoked"] is True
    replay = run_cli(["replay", session["session_id"]])
    assert "pg_sleep(30)" in replay.stdout, replay.output
    assert "6 * 7" in replay.stdout, replay.output


def test_a_killed_client_still_ends_its_session(stack: Stack, login, run_cli, cli_env) -> None:
    """SIGKILL to the process the user started (a closed terminal emulator, an OOM kill): the worker sees
    its client go, ends psql's session at once (lease revoked) and uploads the recording. In-process, the
    broker's reaper revokes the lease only after the heartbeats stop."""
    assert login("alice", device=False).code == 0
    roles_before = set(stack.leftover_roles())  # the shared stack: other modules' sessions may hold some
    cli = CliProcess(["connect", "prod-db", "--", "-X", "-c", "select pg_sleep(60)"], cli_env)
    try:
        deadline = time.monotonic() + 30
        while "pg_sleep" not in stack.pg.psql("SELECT query FROM pg_stat_activity WHERE usename LIKE 'v-%'"):
            assert time.monotonic() < deadline, cli.stderr
            time.sleep(0.05)
        cli.proc.kill()
        cli.proc.wait(10)
        session = last_session(run_cli)
        while session["status"] == "active" or not session["recording_sha256"]:
            assert time.monotonic() < deadline + 30, session
            time.sleep(0.2)
            session = last_session(run_cli)
    finally:
        cli.kill()
    assert session["status"] == "ended"
    assert session["end_reason"] == "client"
    assert session["lease_revoked"] is True
    # as test_faults does: the orphaned psql's backend is terminated and the role dropped by the revocation
    deadline = time.monotonic() + 20
    while session["lease_id"] in stack.bao.leases() or set(stack.leftover_roles()) - roles_before:
        assert time.monotonic() < deadline, (roles_before, stack.leftover_roles())
        time.sleep(0.2)


def test_an_error_is_one_line_and_its_exit_code(login, run_cli) -> None:
    """What the worker prints reaches the user's stderr as it would in-process, with the same exit code."""
    assert login("alice", device=False).code == 0
    r = run_cli(["connect", "no-such-db", "--", "-c", "select 1"])
    assert r.code == 5, r.output
    assert r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr
    assert "no-such-db" in r.stderr


def test_a_dead_helper_is_replaced(stack: Stack, login, run_cli, warm_dir: Path) -> None:
    """A helper killed outright leaves its socket behind: the next connect runs in-process (nothing lost)
    and starts a new helper on that socket, which serves the one after."""
    assert login("alice", device=False).code == 0
    (old, _), = helpers(warm_dir).values()
    os.kill(old, signal.SIGKILL)
    while _alive(old):
        time.sleep(0.05)
    r = run_cli(["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select 'cold again'"])
    assert r.code == 0, r.output
    assert "cold again" in r.stdout
    new, count = wait_for_helper(warm_dir, other_than=old)
    assert new != old
    assert count == 0
    r = run_cli(["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select 'warm again'"])
    assert r.code == 0, r.output
    assert "warm again" in r.stdout
    assert helpers(warm_dir)[next(iter(helpers(warm_dir)))] == (new, 1)


def test_an_idle_helper_leaves(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PCIGATE_RESIDENT_IDLE seconds without a command: the helper exits and removes its socket."""
    own = Path(tempfile.mkdtemp(prefix="pgi-", dir="/tmp"))
    monkeypatch.setenv(WARM_DIR_ENV, str(own))
    try:
        env = {**stack.cli_env(tmp_path / "home"), "PCIGATE_RESIDENT_IDLE": "1"}
        assert run_with(["connect", "prod-db"], env=env).code == 3  # not signed in
        pid, _ = wait_for_helper(own)
        deadline = time.monotonic() + 15
        while _alive(pid):
            assert time.monotonic() < deadline, "the idle helper is still there"
            time.sleep(0.1)
        assert not list((own / "pcigate").glob("*.sock"))
    finally:
        stop_helpers(own)
        shutil.rmtree(own, ignore_errors=True)


def test_the_off_switch(stack: Stack, login, run_cli, cli_env, warm_dir: Path) -> None:
    """PCIGATE_RESIDENT=0: the command runs in the process the user started; no helper serves it."""
    assert login("alice", device=False).code == 0
    before = served(warm_dir)
    r = run_cli(["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select 'in-process'"],
                env={**cli_env, "PCIGATE_RESIDENT": "0"})
    assert r.code == 0, r.output
    assert "in-process" in r.stdout
    assert served(warm_dir) == before


def test_a_socket_of_another_user_is_not_used(stack: Stack, login, run_cli, cli_env, warm_dir: Path,
                                              tmp_path: Path) -> None:
    """The helper's socket answered by a process of another user (here: nobody's listener, moved into
    place by root) is not handed the command, its environment or its terminal: it runs in-process."""
    assert login("alice", device=False).code == 0
    (path, (pid, _)), = helpers(warm_dir).items()
    os.kill(pid, signal.SIGTERM)
    while _alive(pid):
        time.sleep(0.05)
    spare = Path(tempfile.mkdtemp(prefix="pgn-", dir="/tmp"))
    spare.chmod(0o777)
    impostor = subprocess.Popen(
        ["python3", "-c", "import os, socket, sys, time\n"
         "os.setgid(65534); os.setuid(65534)\n"
         "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print('up', flush=True)\n"
         "c, _ = s.accept(); c.settimeout(5); print('got', len(c.recv(65536)), flush=True)",
         str(spare / "s")], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline().strip() == "up"
        os.rename(spare / "s", path)
        r = run_cli(["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select 'not handed over'"])
        assert r.code == 0, r.output
        assert "not handed over" in r.stdout
        assert impostor.stdout.readline().strip() == "got 0"  # it connected, saw whose socket, sent nothing
    finally:
        impostor.kill()
        impostor.wait()
        shutil.rmtree(spare, ignore_errors=True)
        path.unlink(missing_ok=True)
    start_helper(stack, warm_dir, tmp_path / "restart")
