"""The real ``pcigate`` CLI against the real stack: IdP (oidc-provider), broker, OpenBao, PostgreSQL, psql.

Every test runs the console script as a subprocess with a fresh home (``cli_env``) and a real, encrypted,
headless keyring.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
from tests.stack.cli import CliProcess, CliResult
from tests.stack.cli import last_session as _last_session
from tests.stack.stack import Stack

SELECT = "select current_user as who, 40 + 2 as answer"


def _state(env: dict[str, str]) -> Path:
    return Path(env["PCIGATE_STATE_DIR"])


def _spool_files(env: dict[str, str]) -> list[str]:
    spool = _state(env) / "spool"
    return sorted(p.name for p in spool.iterdir()) if spool.exists() else []


# --- sign-in -----------------------------------------------------------------------------------------------
def test_login_browser_flow_then_whoami(login, run_cli) -> None:
    r = login("alice", device=False)
    assert r.code == 0, r.output
    assert "Open this URL to sign in: http" in r.stderr
    assert "signed in to" in r.stderr
    assert "alice" in r.stderr.lower()
    who = run_cli(["whoami", "--json"])
    assert who.code == 0, who.output
    identity = json.loads(who.stdout)
    assert identity["subject"] == "alice"
    assert "dba" in identity["groups"]
    assert identity["client_kind"] == "human"


def test_login_device_flow(login, run_cli) -> None:
    r = login("carol", device=True)
    assert r.code == 0, r.output
    assert re.search(r"To sign in, visit \S+ and enter code [A-Z]{4}-[A-Z]{4}", r.stderr)
    assert json.loads(run_cli(["whoami", "--json"]).stdout)["subject"] == "carol"


def test_not_signed_in_is_exit_3(run_cli) -> None:
    r = run_cli(["targets"])
    assert r.code == 3
    assert r.stderr.startswith("error: not signed in")
    assert "hint: run: pcigate login" in r.stderr


def test_logout_forgets_the_sign_in(login, run_cli) -> None:
    assert login("alice", device=False).code == 0
    r = run_cli(["logout"])
    assert r.code == 0
    assert "signed out" in r.stderr
    assert run_cli(["whoami"]).code == 3


def test_no_keyring_is_exit_11(stack: Stack, cli_home: Path, run_cli) -> None:
    env = stack.cli_env(cli_home)
    env["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"
    r = run_cli(["login", "--no-browser"], env=env, timeout=30)
    assert r.code == 11, r.output
    assert "PCIGATE_TOKEN" in r.stderr  # the hint names the automation path


# --- targets and refusals ----------------------------------------------------------------------------------
def test_targets(login, run_cli) -> None:
    assert login("alice", device=False).code == 0
    r = run_cli(["targets", "--json"])
    assert r.code == 0, r.output
    targets = {t["name"]: t for t in json.loads(r.stdout)}
    assert "prod-db" in targets
    assert {lv["name"] for lv in targets["prod-db"]["levels"]} >= {"read"}
    human = run_cli(["targets"])
    assert "prod-db" in human.stdout
    assert "read" in human.stdout


def test_bob_is_refused(login, run_cli) -> None:
    assert login("bob", device=False).code == 0
    r = run_cli(["connect", "prod-db", "--no-exec"])
    assert r.code in (4, 5), r.output
    assert r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_unknown_target_and_level(login, run_cli) -> None:
    assert login("alice", device=False).code == 0
    r = run_cli(["connect", "no-such-db", "--", "-c", "select 1"])
    assert r.code == 5, r.output
    r = run_cli(["connect", "prod-db", "--level", "superuser", "--", "-c", "select 1"])
    assert r.code in (4, 5), r.output


@pytest.mark.parametrize("case", ["expired", "wrong_aud", "forged", "garbage"])
def test_bad_workload_tokens_are_exit_3(stack: Stack, cli_home: Path, run_cli, case: str) -> None:
    idp = stack.idp
    if case == "expired":
        token = idp.mint(idp.claims_for("alice", iat=int(time.time()) - 7200, exp=int(time.time()) - 3600))
    elif case == "wrong_aud":
        token = idp.mint(idp.claims_for("alice", aud="someone-else"))
    elif case == "forged":
        from tests.stack.idp import new_rsa_key

        token = idp.mint(idp.claims_for("alice"), key=new_rsa_key(), kid=idp.kid)
    else:
        token = "not-a-jwt"
    env = stack.cli_env(cli_home, token=token)
    r = run_cli(["targets"], env=env)
    assert r.code == 3, r.output
    assert "Traceback" not in r.stderr


# --- connect -----------------------------------------------------------------------------------------------
def test_connect_runs_psql_revokes_and_uploads(stack: Stack, login, run_cli, cli_env) -> None:
    assert login("alice", device=False).code == 0
    r = run_cli(["connect", "prod-db", "--for", "10m", "--", "-X", "-A", "-t", "-c", SELECT])
    assert r.code == 0, r.output
    who, answer = r.stdout.strip().splitlines()[-1].split("|")
    assert answer == "42"
    assert who.startswith("v-")
    m = re.search(r"session (\S+) ended; recording uploaded \((\d+) events\)", r.stderr)
    assert m, r.stderr
    session_id = m.group(1)
    assert int(m.group(2)) >= 2
    assert _spool_files(cli_env) == []

    # the lease is revoked now, and the dynamic role is gone from PostgreSQL
    summary = json.loads(run_cli(["sessions", "show", session_id, "--json"]).stdout)
    assert summary["status"] == "ended"
    assert summary["lease_revoked"] is True
    assert summary["lease_id"] not in stack.bao.leases()
    assert stack.pg.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{who}'") == "0"
    assert summary["recording_sha256"]

    # the recording is stored and listed
    listed = [s for s in json.loads(run_cli(["sessions", "--json"]).stdout) if s["session_id"] == session_id]
    assert listed
    assert listed[0]["recording_sha256"] == summary["recording_sha256"]
    stored = stack.recordings_dir.rglob(summary["recording_sha256"])
    data = next(stored).read_text()
    assert SELECT in data


def test_psql_exit_code_is_passed_through(login, run_cli) -> None:
    assert login("alice", device=False).code == 0
    r = run_cli(
        ["connect", "prod-db", "--", "-X", "-v", "ON_ERROR_STOP=1", "-c", "select * from no_such_table"]
    )
    assert r.code == 1, r.output  # psql's own exit code for a failed -c
    assert "no_such_table" in r.stderr
    assert "recording uploaded" in r.stderr


def test_workload_token_sessions_are_attributed(stack: Stack, cli_home: Path, run_cli) -> None:
    env = stack.cli_env(cli_home, token=stack.idp.workload_token("ci-bot"))
    who = json.loads(run_cli(["whoami", "--json"], env=env).stdout)
    assert who["subject"] == "ci-bot"
    assert who["client_kind"] == "workload"
    r = run_cli(["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select 7"], env=env)
    assert r.code == 0, r.output
    assert r.stdout.strip().endswith("7")
    last = _last_session(run_cli, env)
    assert last["user"] == "ci-bot"
    assert last["client_kind"] == "workload"


def test_token_file_is_used_as_is(stack: Stack, cli_home: Path, run_cli, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(stack.idp.workload_token("ci-bot") + "\n")
    env = stack.cli_env(cli_home)
    r = run_cli(["--token-file", str(token_file), "whoami", "--json"], env=env)
    assert r.code == 0, r.output
    assert json.loads(r.stdout)["subject"] == "ci-bot"


def test_port_in_use_is_exit_9_before_any_session(login, run_cli, stack: Stack) -> None:
    assert login("alice", device=False).code == 0

    def newest() -> str | None:
        r = run_cli(["sessions", "--limit", "1", "--json"])
        assert r.code == 0, r.output
        items = json.loads(r.stdout)
        return str(items[0]["session_id"]) if items else None

    before, leases = newest(), set(stack.bao.leases())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli(["connect", "prod-db", "--port", str(port), "--", "-c", "select 1"])
    assert r.code == 9, r.output
    assert r.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use",
        "hint: choose another port with --port, or 0 for any",
    ]
    # it failed before asking the broker: no session, no credentials minted
    assert newest() == before
    assert set(stack.bao.leases()) <= leases


@pytest.mark.parametrize(
    ("psql_args", "words"),
    [
        (["-c", "select 1", "-h", "127.0.0.9"], "psql's host (-h/--host) is set by pcigate"),
        (["--po=5433", "-c", "select 1"], "psql's port (-p/--port) is set by pcigate"),
        (["-d", "host=127.0.0.9 dbname=prod"], "psql's -d/--dbname takes a database name here"),
    ],
)
def test_psql_options_past_the_tunnel_are_refused_before_any_session(
    login, run_cli, stack: Stack, psql_args: list[str], words: str
) -> None:
    """psql keeps the last -h/-p/-d it is given, so these after `--` would point it past the tunnel: it would
    get no password there, and the session's credentials would be minted for nothing. Refused up front."""
    assert login("alice", device=False).code == 0
    before = run_cli(["sessions", "--limit", "1", "--json"]).stdout
    leases = set(stack.bao.leases())
    r = run_cli(["connect", "prod-db", "--", *psql_args])
    assert r.code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith(f"error: {words}"), r.stderr
    assert lines[1] == "hint: leave it out of the arguments after `--`"
    assert run_cli(["sessions", "--limit", "1", "--json"]).stdout == before  # no session opened
    assert set(stack.bao.leases()) <= leases
    # the same arguments after psql's own `--` are positional, and psql ignores them: the session runs
    ok = run_cli(["connect", "prod-db", "--", "-c", "select 42 as answer", "--", *psql_args])
    assert ok.code == 0, ok.output
    assert "42" in ok.stdout


@pytest.mark.parametrize(("wrapped", "closed"),
                         [(False, "2>&-"), (True, "2>&-"), (False, ">&- 2>&-"), (True, "<&-")])
def test_a_session_with_standard_streams_closed_ends_well(
    login, run_cli, cli_env, tmp_path: Path, wrapped: bool, closed: str
) -> None:
    """`pcigate connect prod-db ... 2>&-` (a cron line, a script), also through a wrapper script such as
    `exec "$@"`: the session is recorded and uploaded and the exit status is psql's. Before: through a
    wrapper, the wrapper's own file (read-only) was pcigate's stderr, and the closing line failed the command
    with exit 1 after a good session."""
    import subprocess

    from tests.stack.cli import pcigate_bin

    assert login("alice", device=False).code == 0
    wrapper = tmp_path / "wrapper"
    wrapper.write_text('#!/bin/bash\nexec "$@"\n')
    wrapper.chmod(0o755)
    command = [*([str(wrapper)] if wrapped else []), str(pcigate_bin()), "connect", "prod-db", "--", "-c",
               "select 1 as answer"]
    proc = subprocess.run(["bash", "-c", f'"$0" "$@" {closed}', *command], env=cli_env, capture_output=True,
                          stdin=subprocess.DEVNULL, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if "2>&-" not in closed:
        assert "ended; recording uploaded" in proc.stderr
    if not closed.startswith(">&-"):
        assert "answer" in proc.stdout
    session = _last_session(run_cli)
    assert session["status"] == "ended"
    assert session["recording_sha256"]
    assert session["lease_revoked"] is True


def test_no_exec_waits_for_ctrl_c(login, cli_env, stack: Stack) -> None:
    assert login("alice", device=False).code == 0
    cli = CliProcess(["connect", "prod-db", "--no-exec"], cli_env)
    try:
        m = cli.wait_for(r'connect with: PGPASSFILE=(\S+) psql "([^"]+)"', timeout=30)
        passfile = Path(m.group(1))
        assert passfile.exists()
        assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
        import subprocess

        env = {k: v for k, v in cli_env.items() if not k.startswith("PG")}
        env["PGPASSFILE"] = str(passfile)
        q = subprocess.run(
            ["psql", "-X", "-A", "-t", m.group(2), "-c", "select 5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert q.stdout.strip() == "5", q.stderr
        cli.proc.send_signal(2)  # SIGINT
        r = cli.wait(30)
    finally:
        cli.kill()
    assert r.code == 0, r.output
    assert "recording uploaded" in r.stderr
    assert not passfile.exists()


def test_no_exec_ends_on_a_sigint_sent_as_soon_as_it_is_ready(login, cli_env) -> None:
    """A script reads the connection details and sends SIGINT at once, pcigate being a background job of a
    non-interactive shell (SIGINT ignored when it starts): the session ends each time. Before, a SIGINT
    landing just after the details were printed was lost and the session ran on (bench_connect hung)."""
    import subprocess

    from tests.stack.cli import pcigate_bin

    assert login("alice", device=False).code == 0
    for attempt in range(20):  # the old code lost one in every 5-7 here
        proc = subprocess.Popen(
            [str(pcigate_bin()), "connect", "prod-db", "--no-exec", "--json"], env=cli_env, text=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            assert proc.stdout is not None
            text = ""
            while True:
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
                text += line
                with contextlib.suppress(ValueError):
                    json.loads(text)
                    break
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"attempt {attempt + 1}: the SIGINT sent once the session was ready was lost: "
                            "the session runs on")
        finally:
            proc.kill()
            proc.wait()
        assert rc == 0, proc.stderr.read() if proc.stderr else ""


def test_password_never_reaches_psql(stack: Stack, login, run_cli, cli_env, tmp_path: Path) -> None:
    """psql runs through a wrapper that dumps its argv, environment and PGPASSFILE, then execs psql."""
    import shutil

    real_psql = shutil.which("psql", path=cli_env["PATH"])
    assert real_psql
    dump = tmp_path / "dump"
    pidfile = tmp_path / "pid"
    wrapper = tmp_path / "psql-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"echo $$ > {pidfile}\n"
        f'{{ echo "ARGV: $*"; env; echo "PASSFILE:"; cat "$PGPASSFILE"; }} > {dump}\n'
        f'exec {real_psql} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = dict(cli_env, PCIGATE_PSQL=str(wrapper), PGPASSWORD="from-the-users-shell", PGHOST="elsewhere")
    assert login("alice", env=env, device=False).code == 0
    cli = CliProcess(
        ["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select current_user, pg_sleep(1.5)"], env
    )
    try:
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and dump.exists() and "PASSFILE:" in dump.read_text()):
            assert time.monotonic() < deadline, cli.stderr
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        time.sleep(0.3)
        proc_environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
        proc_cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        r = cli.wait(60)
    finally:
        cli.kill()
    assert r.code == 0, r.output
    text = dump.read_text()
    env_lines = [line for line in text.split("PASSFILE:")[0].splitlines() if "=" in line]
    child_env = dict(line.split("=", 1) for line in env_lines)
    passline = text.split("PASSFILE:")[1].strip()
    host, port, db, user, secret = passline.split(":", 4)
    assert (host, db, user) == ("127.0.0.1", "*", "*")
    assert "PGPASSWORD" not in child_env
    assert not any(v.startswith("PGPASSWORD=") for v in proc_environ)
    assert child_env.get("PGHOST") is None
    assert proc_cmdline[1:3] == ["-h", "127.0.0.1"]
    assert f"{port}" in proc_cmdline
    assert str(stack.pg.port) not in proc_cmdline  # psql is pointed at the tunnel, never at the database
    # the local secret is not the database password: it cannot log in to PostgreSQL as the dynamic user
    dyn_user = r.stdout.strip().split("|")[0]
    assert dyn_user.startswith("v-")
    assert not stack.pg.can_login(dyn_user, secret)
    assert secret not in r.output
    assert not Path(child_env["PGPASSFILE"]).exists()  # deleted on exit
    sha = _last_session(run_cli, env)["recording_sha256"]
    assert secret not in next(stack.recordings_dir.rglob(sha)).read_text()


def _connect_while_the_broker_crashes(stack: Stack, cli_env: dict[str, str]) -> CliResult:
    """``connect prod-db`` running a 2 s query, its broker killed meanwhile (then restarted): the session's
    end and its recording are left in the spool."""
    cli = CliProcess(
        ["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select pg_sleep(2), 'done'"], cli_env
    )
    try:
        deadline = time.monotonic() + 20
        while not any(n.endswith(".rec") for n in _spool_files(cli_env)):
            assert time.monotonic() < deadline, cli.stderr
            time.sleep(0.05)
        time.sleep(0.3)
        assert stack.broker is not None
        stack.broker.kill()  # gone without a goodbye, like a crash or a network cut
        return cli.wait(60)
    finally:
        cli.kill()
        assert stack.broker is not None
        stack.broker.restart()


def test_broker_down_at_exit_spools_then_sync_uploads(stack: Stack, login, run_cli, cli_env) -> None:
    assert login("alice", device=False).code == 0
    r = _connect_while_the_broker_crashes(stack, cli_env)
    assert "done" in r.stdout, r.output
    assert r.code == 0, r.output
    assert "cannot reach the broker" in r.stderr
    assert "pcigate sessions sync" in r.stderr
    files = _spool_files(cli_env)
    session_id = next(n for n in files if n.endswith(".rec"))[: -len(".rec")]
    meta = json.loads((_state(cli_env) / "spool" / f"{session_id}.json").read_text())
    assert meta["end_owed"] is True
    assert meta["sha256"]
    assert meta["broker"] == stack.broker_url

    sync = run_cli(["sessions", "sync"])
    assert sync.code == 0, sync.output
    assert f"session {session_id}: recording uploaded" in sync.stderr
    assert [n for n in _spool_files(cli_env) if not n.endswith(".lock")] == []
    summary = json.loads(run_cli(["sessions", "show", session_id, "--json"]).stdout)
    assert summary["recording_sha256"] == meta["sha256"]
    assert summary["status"] != "active"
    assert summary["lease_id"] not in stack.bao.leases()


def test_sync_settles_each_entry_on_its_own(stack: Stack, login, run_cli, cli_env) -> None:
    """A spool entry that cannot be settled (a damaged file, an unsafe id, an unreadable entry) is kept and
    reported, and does not stop the others; a lease OpenBao cannot revoke at the end (its role was dropped
    behind its back) leaves the revocation to the broker and the recording is uploaded all the same."""
    assert login("alice", device=False).code == 0
    roles_before = set(stack.leftover_roles())
    r = _connect_while_the_broker_crashes(stack, cli_env)
    assert r.code == 0, r.output
    session_id = next(n for n in _spool_files(cli_env) if n.endswith(".rec"))[: -len(".rec")]
    # the session's role is dropped behind OpenBao's back: its revocation statements now fail
    for role in set(stack.leftover_roles()) - roles_before:
        stack.pg.psql(f'SET ROLE bao_admin; REVOKE CONNECT ON DATABASE prod FROM "{role}"; RESET ROLE; '
                      f'DROP ROLE "{role}"')
    # damaged entries that sort before the real one
    spool = _state(cli_env) / "spool"
    meta = {"broker": stack.broker_url, "end_owed": False, "created_at": "2026-12-04T00:00:00Z"}
    (spool / "0000dir.json").write_text(json.dumps(meta | {"session_id": "0000dir"}))
    (spool / "0000dir.rec").mkdir()
    (spool / "0001unsafe.json").write_text(json.dumps(meta | {"session_id": "../../etc/x"}))
    (spool / "0002unreadable.json").write_text("{not json")

    sync = run_cli(["sessions", "sync"])
    assert sync.code == 13, sync.output
    err = sync.stderr
    assert f"session {session_id}: recording uploaded" in err, err
    assert f"session {session_id}: OpenBao could not revoke the lease yet; the broker retries" in err, err
    assert "session 0000dir: kept in the spool: " in err, err
    assert "0000dir.rec: Is a directory" in err, err
    assert "session ../../etc/x: kept in the spool: refusing an unsafe session id" in err, err
    assert "session 0002unreadable: kept in the spool: unreadable spool entry" in err, err
    assert "Traceback" not in err
    assert not any(n.startswith(session_id) and not n.endswith(".lock") for n in _spool_files(cli_env))
    summary = json.loads(run_cli(["sessions", "show", session_id, "--json"]).stdout)
    assert summary["status"] != "active"
    assert summary["recording_sha256"]
    # its role is gone; the lease OpenBao can no longer revoke is removed by force, as an operator would
    stack.bao.api("PUT", f"sys/leases/revoke-force/{summary['lease_id']}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_session_ends_says_what_is_kept(stack: Stack, login, run_cli, cli_env,
                                                           sig: signal.Signals) -> None:
    """The broker hangs (SIGSTOP) as psql finishes, so the CLI waits in its end call; Ctrl-C or SIGTERM then
    stops it with a line saying the session is kept in the spool, and the next sync ends and uploads it."""
    assert login("alice", device=False).code == 0
    argv = ["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select pg_sleep(1.5), 'done'"]
    cli = CliProcess(argv, cli_env)
    assert stack.broker is not None
    assert stack.broker.proc is not None
    broker_pid = stack.broker.proc.pid
    stopped = False
    try:
        deadline = time.monotonic() + 20
        while not any(n.endswith(".rec") for n in _spool_files(cli_env)):
            assert time.monotonic() < deadline, cli.stderr
            time.sleep(0.05)
        os.kill(broker_pid, signal.SIGSTOP)
        stopped = True
        while "done" not in cli.stdout:
            assert time.monotonic() < deadline + 10, cli.output
            time.sleep(0.05)
        time.sleep(0.5)  # psql has exited; the CLI is in its end call
        cli.proc.send_signal(sig)
        r = cli.wait(30)
    finally:
        cli.kill()
        if stopped:
            os.kill(broker_pid, signal.SIGCONT)
    assert r.code == 130, r.output
    assert re.search(r"warning: interrupted: session \S+ is kept in the spool", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    session_id = next(n for n in _spool_files(cli_env) if n.endswith(".rec"))[: -len(".rec")]
    sync = run_cli(["sessions", "sync"])
    assert sync.code == 0, sync.output
    assert f"session {session_id}: recording uploaded" in sync.stderr
    summary = json.loads(run_cli(["sessions", "show", session_id, "--json"]).stdout)
    assert summary["status"] != "active"
    assert summary["lease_id"] not in stack.bao.leases()


def test_spool_is_flushed_by_the_next_command(stack: Stack, login, run_cli, cli_env) -> None:
    assert login("alice", device=False).code == 0
    cli = CliProcess(["connect", "prod-db", "--", "-X", "-c", "select pg_sleep(1.5)"], cli_env)
    try:
        deadline = time.monotonic() + 20
        while not any(n.endswith(".rec") for n in _spool_files(cli_env)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert stack.broker is not None
        stack.broker.kill()
        cli.wait(60)
    finally:
        cli.kill()
        assert stack.broker is not None
        stack.broker.restart()
    assert any(n.endswith(".rec") for n in _spool_files(cli_env))
    r = run_cli(["targets"])  # any broker-using command settles the spool quietly first
    assert r.code == 0, r.output
    assert [n for n in _spool_files(cli_env) if not n.endswith(".lock")] == []


def test_state_dir_is_private(login, run_cli, cli_env) -> None:
    assert login("alice", device=False).code == 0
    assert run_cli(["connect", "prod-db", "--", "-c", "select 1"]).code == 0
    for d in (_state(cli_env), _state(cli_env) / "spool"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_expired_id_token_is_refreshed_silently(login, run_cli, cli_env) -> None:
    """The stored ID token is made to look expired; the next command refreshes it with the refresh token."""
    import subprocess
    import sys

    assert login("alice", device=False).code == 0
    url = cli_env["PCIGATE_BROKER"]
    script = (
        "import json, sys, keyring\n"
        f"raw = json.loads(keyring.get_password('pcigate', {url!r}))\n"
        "if sys.argv[1] == 'expire':\n"
        "    raw['expires_at'] = 0\n"
        f"    keyring.set_password('pcigate', {url!r}, json.dumps(raw))\n"
        "print(raw['id_token'][-16:], raw['expires_at'])\n"
    )
    before = subprocess.run(
        [sys.executable, "-c", script, "expire"], env=cli_env, capture_output=True, text=True, check=True
    ).stdout.split()
    r = run_cli(["whoami", "--json"])
    assert r.code == 0, r.output
    after = subprocess.run(
        [sys.executable, "-c", script, "show"], env=cli_env, capture_output=True, text=True, check=True
    ).stdout.split()
    # The stored sign-in was rewritten by a refresh: its expiry went from 0 to the new token's. (The ID token
    # itself may be byte-identical when the refresh happens within the second it was issued: same claims,
    # and RS256 signatures are deterministic.)
    assert float(before[1]) == 0
    assert float(after[1]) > time.time()


def test_workload_token_never_reaches_psql(stack: Stack, cli_home: Path, run_cli, tmp_path: Path) -> None:
    """The bearer in PCIGATE_TOKEN (and every PCIGATE_* variable) is stripped from psql's environment."""
    import shutil

    token = stack.idp.workload_token("ci-bot")
    env = stack.cli_env(cli_home, token=token)
    real_psql = shutil.which("psql", path=env["PATH"])
    assert real_psql
    environ_copy = tmp_path / "environ"
    wrapper = tmp_path / "psql-wrapper"
    wrapper.write_text(f'#!/bin/sh\ncat /proc/$$/environ > {environ_copy}\nexec {real_psql} "$@"\n')
    wrapper.chmod(0o755)
    env["PCIGATE_PSQL"] = str(wrapper)
    r = run_cli(["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select 7"], env=env)
    assert r.code == 0, r.output
    assert r.stdout.strip().endswith("7")
    proc_environ = environ_copy.read_bytes().decode(errors="replace").split("\0")
    assert any(v.startswith("PGPASSFILE=") for v in proc_environ)  # the wrapper did see psql's environment
    assert not any(token in v for v in proc_environ)
    assert not any(v.startswith("PCIGATE_") for v in proc_environ)


def test_unwritable_state_dir_still_ends_the_session(stack: Stack, login, run_cli, cli_env) -> None:
    assert login("alice", device=False).code == 0
    state = _state(cli_env)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    spool = state / "spool"
    if spool.is_dir():
        for leftover in spool.iterdir():
            leftover.unlink()
        spool.rmdir()
    if os.geteuid() == 0:  # root ignores permissions: a file where the spool directory should be
        spool.write_text("")
    else:
        spool.mkdir(mode=0o700, exist_ok=True)
        spool.chmod(0o500)
    try:
        r = run_cli(["connect", "prod-db", "--", "-X", "-c", "select 1"])
    finally:
        if spool.is_dir():
            spool.chmod(0o700)
        else:
            spool.unlink()
    assert r.code == 13, r.output  # RecordingError: nothing may run unrecorded
    assert "Traceback" not in r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert "cannot use the session state in" in errors[0]
    assert r.stderr.splitlines()[0].startswith("error: "), r.stderr  # the error is the first line
    last = _last_session(run_cli)
    assert last["status"] != "active", last
    assert last["lease_id"] not in stack.bao.leases()
    assert stack.bao.leases() == []
