"""``pcigate ssh`` / ``pcigate connect`` on an ssh target, against the real stack: the broker has the real
OpenBao SSH CA sign the CLI's ephemeral key, the real system ``ssh`` logs in to a real sshd that trusts the CA
(``stack.sshd``), and the terminal session is recorded, masked and uploaded.

The interactive tests drive ``pcigate`` through a pseudo-terminal, as a person at a terminal would.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from tests.stack.cli import last_session as _last_session
from tests.stack.cli import pcigate_bin
from tests.stack.stack import Stack

from pcigate.echogate import NOT_ECHOED

PAN = "4111111111111111"
MASKED = "411111******1111"


class PtyCli:
    """``pcigate ARGS`` on a pseudo-terminal of ``cols`` x ``rows``; everything it shows is in ``screen``."""

    def __init__(self, args: list[str], env: dict[str, str], *, cols: int = 100, rows: int = 30) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                os.execve(str(pcigate_bin()), ["pcigate", *args], env)
            finally:
                os._exit(127)
        self.resize(cols, rows)
        self.raw = bytearray()
        self.status: int | None = None

    @property
    def screen(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            return False
        if not data:
            return False
        self.raw += data
        return True

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.screen)
            if m:
                return m
            if time.monotonic() > deadline or not self._read(min(0.2, max(0.0, deadline - time.monotonic()))):
                m = re.search(pattern, self.screen)
                if m:
                    return m
                raise AssertionError(f"{pattern!r} not seen; the screen:\n{self.screen[-3000:]}")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def type(self, text: str, delay: float = 0.02) -> None:
        """One key at a time, as a person types (each echo comes back on its own)."""
        for ch in text:
            self.send(ch)
            time.sleep(delay)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            self._read(0.1)
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
                while self._read(0.05):
                    if not select.select([self.fd], [], [], 0)[0]:
                        break
            elif time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise AssertionError(f"pcigate did not exit; the screen:\n{self.screen[-3000:]}")
        return self.status

    def close(self) -> None:
        if self.status is None:
            with_kill = True
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                with_kill = False
            del with_kill
        os.close(self.fd)


@pytest.fixture
def pty_cli(cli_env: dict[str, str]) -> Iterator[list[PtyCli]]:
    started: list[PtyCli] = []
    yield started
    for p in started:
        p.close()


def _recording(stack: Stack, sha: str) -> str:
    return next(stack.recordings_dir.rglob(sha)).read_text()


def _events(text: str) -> tuple[dict, list[list]]:
    lines = text.splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def _key_dirs() -> set[str]:
    found: set[str] = set()
    for base in ("/dev/shm", "/tmp"):
        if os.path.isdir(base):
            found |= {str(p) for p in Path(base).glob("pcigate-ssh-*")}
    return found


def test_interactive_session_masks_records_and_returns_the_exit_status(
        stack: Stack, login, run_cli, cli_env: dict[str, str], pty_cli: list[PtyCli], tmp_path: Path) -> None:
    assert login("alice").code == 0
    before = _key_dirs()
    env = {**cli_env, "TERM": "xterm-256color"}
    term = PtyCli(["ssh", "web-1"], env, cols=100, rows=30)
    pty_cli.append(term)
    term.expect(r"webops@.*\$ ")  # the remote shell's prompt: pcigate's terminal is in raw mode by now
    term.send("export PS1='rea''dy> '\r")
    term.expect(r"ready> ")
    term.send(f"echo card {PAN} end; whoami\r")
    term.expect(r"card \S+ end\s+webops\s+\S*ready> ")  # typing goes on at the prompt, as a person would
    term.type(f"echo typed {PAN}\r")  # typed one key at a time: echoed back digit by digit
    term.expect(r"typed 411111\*+1111\s+\S*ready> ")
    term.send("read -rs -p 'secret: ' S; echo; echo got ${#S}\r")  # a prompt that does not echo
    term.expect(r"secret: ")
    term.type("hunter2\r")
    term.expect(r"got 7")
    term.send("stty size\r")
    term.expect(r"\b30 100\b")
    term.resize(120, 40)
    time.sleep(0.3)
    term.send("stty size\r")
    term.expect(r"\b40 120\b")
    term.send("exit 7\r")
    assert term.wait() == 7, term.screen
    # the card number never reached the screen whole
    assert PAN not in term.screen
    assert f"card {MASKED} end" in term.screen
    assert "recording uploaded" in term.screen
    assert _key_dirs() - before == set(), "key material left behind"

    summary = _last_session(run_cli)
    assert summary["target"] == "web-1"
    assert summary["status"] == "ended"
    assert summary["cert_serial"]
    assert summary["cert_key_id"].startswith("pcigate:alice:")
    header, events = _events(_recording(stack, summary["recording_sha256"]))
    assert header["kind"] == "ssh"
    assert header["version"] == 2
    assert (header["width"], header["height"]) == (100, 30)
    assert header["cert_serial"] == summary["cert_serial"]
    assert header["principal"] == "webops"
    text = _recording(stack, summary["recording_sha256"])
    assert PAN not in text
    out = "".join(e[2] for e in events if e[1] == "o")
    typed = "".join(e[2] for e in events if e[1] == "i")
    assert f"card {MASKED} end" in out
    assert f"echo typed {MASKED}" in typed  # keystrokes are recorded masked too
    assert "read -rs -p 'secret: ' S" in typed
    assert "hunter" not in typed  # what the prompt did not echo is not recorded, a marker instead
    assert ["m", NOT_ECHOED] in [e[1:3] for e in events]
    assert ["r", "120x40"] in [e[1:3] for e in events]
    assert {"e": "exit", "status": 7} in [e[2] for e in events if e[1] == "x"]
    assert events[-1][1:3] == ["x", {"e": "end", "reason": "client"}]
    # the login in sshd's log names this session's certificate
    assert summary["cert_key_id"] in stack.sshd.log()

    # downloaded from the broker as asciicast, it plays in asciinema's own player (`asciinema cat` prints
    # what a replay shows): the masked number, never the clear one
    cast = tmp_path / "s.cast"
    r = run_cli(["sessions", "download", summary["session_id"], "--asciicast", "-o", str(cast)])
    assert r.code == 0, r.output
    lines = cast.read_text().splitlines()
    assert json.loads(lines[0])["version"] == 2
    assert all(len(json.loads(x)) == 3 for x in lines[1:])
    played = subprocess.run([str(Path(sys.executable).parent / "asciinema"), "cat", str(cast)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert played.returncode == 0, played.stderr
    assert f"card {MASKED} end" in played.stdout
    assert PAN not in played.stdout
    # `pcigate replay` plays it from the broker (fast: --speed), masked
    r = run_cli(["replay", summary["session_id"], "--speed", "1000"])
    assert r.code == 0, r.output
    assert f"card {MASKED} end" in r.stdout
    assert PAN not in r.stdout
    r = run_cli(["replay", summary["session_id"], "--json"])
    assert r.code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "ssh"
    assert ["r", "120x40"] in [e[1:3] for e in doc["events"]]
    # the stored form verifies (its chain) and downloads byte for byte
    stored = tmp_path / "s.rec"
    assert run_cli(["sessions", "download", summary["session_id"], "-o", str(stored)]).code == 0
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == summary["recording_sha256"]


def test_one_command_without_a_terminal(stack: Stack, login, run_cli) -> None:
    assert login("alice").code == 0
    r = run_cli(["ssh", "web-1", "--", f"echo {PAN}; echo to-stderr >&2; exit 3"])
    assert r.code == 3, r.output
    assert MASKED in r.stdout
    assert PAN not in r.output
    assert "to-stderr" in r.stderr
    summary = _last_session(run_cli)
    header, events = _events(_recording(stack, summary["recording_sha256"]))
    assert header["command"].startswith(f"echo {MASKED};")  # the command line is masked too
    assert PAN not in _recording(stack, summary["recording_sha256"])
    assert MASKED in "".join(e[2] for e in events if e[1] == "o")


def test_a_number_grep_colours_is_masked_on_screen_and_in_the_recording(stack: Stack, login, run_cli) -> None:
    """grep --color=always highlights the match inside the number: escape sequences split its digits."""
    assert login("alice").code == 0
    r = run_cli(["ssh", "web-1", "--", f"echo card {PAN} | grep --color=always {PAN[:4]}"])
    assert r.code == 0, r.output
    assert "\x1b[" in r.stdout  # the colours reached the screen
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", r.stdout)
    assert f"card {MASKED}" in shown
    assert PAN[4:] not in r.stdout
    summary = _last_session(run_cli)
    _, events = _events(_recording(stack, summary["recording_sha256"]))
    recorded = "".join(e[2] for e in events if e[1] == "o")
    assert "\x1b[" in recorded
    assert f"card {MASKED}" in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", recorded)
    assert PAN[4:] not in recorded


def test_track_data_split_between_reads_is_masked_whole_on_screen_and_in_the_recording(
        stack: Stack, login, run_cli) -> None:
    """A track 1 string whose second half arrives 0.3 s after the first (two reads, and a pause longer than
    the screen's 50 ms): neither the screen nor the recording gets its name or expiry date (before: the first
    read went out with only the PAN masked)."""
    assert login("alice").code == 0
    head, tail = f"%B{PAN}^DOE/", "JOHN^2512101000000000000?"
    r = run_cli(["ssh", "web-1", "--", f"printf '%s' '{head}'; sleep 0.3; printf '%s\\n' '{tail}'"])
    assert r.code == 0, r.output
    assert "*" * len(head + tail) in r.stdout
    for part in ("DOE", "JOHN", "2512101", PAN[6:12]):
        assert part not in r.stdout
    summary = _last_session(run_cli)
    _, events = _events(_recording(stack, summary["recording_sha256"]))
    recorded = "".join(e[2] for e in events if e[1] == "o")
    assert "*" * len(head + tail) in recorded
    for part in ("DOE", "JOHN", "2512101", PAN[6:12]):
        assert part not in recorded


def test_held_output_on_stdout_and_stderr_each_reaches_the_screen_after_the_pause(
        login, cli_env: dict[str, str]) -> None:
    """Output ending in digits is held until the next read shows where the run ends, and shown after 50 ms
    without more: on stdout and on stderr alike when both hold something at once (before, one pause timer
    served both, so the stream that held first stayed dark until the command ended)."""
    assert login("alice").code == 0
    proc = subprocess.Popen(
        [str(pcigate_bin()), "ssh", "web-1", "--",
         "printf 'total 12'; sleep 0.02; printf 'warn 34' >&2; sleep 4"],
        env=cli_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        got = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}
        deadline = time.monotonic() + 20  # ssh start-up included
        while not (got[proc.stdout.fileno()].endswith(b"12") and got[proc.stderr.fileno()].endswith(b"34")):
            ready, _, _ = select.select(list(got), [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"not shown while the command sleeps: {got}"
            for fd in ready:
                if not got[fd]:  # the command's output began: it then sleeps 4 s
                    deadline = min(deadline, time.monotonic() + 2)
                got[fd] += os.read(fd, 4096)
        assert b"total 12" in got[proc.stdout.fileno()]
        assert b"warn 34" in got[proc.stderr.fileno()]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_database_target_is_refused_by_pcigate_ssh(login, run_cli) -> None:
    assert login("alice").code == 0
    r = run_cli(["ssh", "prod-db", "--", "true"])
    assert r.code == 2, r.output
    assert "prod-db is a postgres target" in r.stderr
    assert "Traceback" not in r.output


def test_a_user_outside_the_policy_is_refused(login, run_cli) -> None:
    """bob is in no group that reaches web-1: to him it does not exist (as for database targets)."""
    assert login("bob").code == 0
    r = run_cli(["ssh", "web-1", "--", "true"])
    assert r.code == 5, r.output
    assert "unknown target 'web-1'" in r.stderr
    assert "Traceback" not in r.output


def test_connect_forwards_a_local_port(stack: Stack, login, run_cli, cli_env: dict[str, str]) -> None:
    """`pcigate connect web-1 -L`: a loopback port reaches a service as the ssh target sees it (here the
    test's own TCP echo server on the target's loopback)."""
    assert login("alice").code == 0
    srv = socket.create_server(("127.0.0.1", 0))
    echo_port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"echo:" + conn.recv(100))

    threading.Thread(target=serve, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
    proc = subprocess.Popen([str(pcigate_bin()), "connect", "web-1", "-L", f"{local}:127.0.0.1:{echo_port}"],
                            env=cli_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", local), timeout=2) as c:
                    c.sendall(b"hi")
                    assert c.recv(100) == b"echo:hi"
                    break
            except (ConnectionRefusedError, ConnectionResetError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.close()
    assert proc.returncode == 0, err
    assert "forwarding 127.0.0.1:" in err
    summary = _last_session(run_cli)
    _, events = _events(_recording(stack, summary["recording_sha256"]))
    forwards = [e[2] for e in events if e[1] == "x" and e[2].get("e") == "forward"]
    assert forwards == [{"e": "forward", "listen": f"127.0.0.1:{local}", "to": f"127.0.0.1:{echo_port}"}]


def test_a_non_loopback_forward_is_refused_before_any_session(login, run_cli) -> None:
    assert login("alice").code == 0
    r = run_cli(["connect", "web-1", "-L", "0.0.0.0:8080:127.0.0.1:80"])
    assert r.code == 2, r.output
    assert "loopback only" in r.stderr


def test_the_session_ends_with_its_certificate(stack: Stack, login, run_cli) -> None:
    """`--for 3s`: the certificate is valid for 3 s and the session ends then, ssh with it."""
    assert login("alice").code == 0
    t0 = time.monotonic()
    r = run_cli(["ssh", "web-1", "--for", "3s", "--", "sleep 60"], timeout=60)
    took = time.monotonic() - t0
    assert took < 20, r.output
    assert "reached its end time" in r.stderr, r.output
    assert r.code != 0
    summary = _last_session(run_cli)
    assert summary["status"] == "ended"
    ttl = (datetime.fromisoformat(summary["expires_at"]) - datetime.fromisoformat(summary["started_at"]))
    assert ttl.total_seconds() <= 3


def test_replay_a_database_session_as_a_timeline(stack: Stack, login, run_cli) -> None:
    """`pcigate replay` of a psql session: the statements in order, with timing and rows (the stack's prod-db
    has no masking table; the MASKED mark is covered by tests/unit/test_replay.py and the tunnel's "masked"
    event by tests/integration/test_tunnel_masking.py)."""
    assert login("alice").code == 0
    r = run_cli(["connect", "prod-db", "--", "-X", "-c", "select 40 + 2 as answer", "-c", "select 1/0"])
    assert r.code != 0, r.output
    sid = _last_session(run_cli)["session_id"]
    r = run_cli(["replay", sid])
    assert r.code == 0, r.output
    lines = r.stdout.splitlines()
    answer = next(ln for ln in lines if "select 40 + 2" in ln)
    failed = next(ln for ln in lines if "select 1/0" in ln)
    assert re.match(r"^\+\d+\.\d{3}s", answer.strip()), answer
    assert "SELECT 1 " in answer  # the command tag: one row
    assert "22012" in failed  # division_by_zero
    doc = json.loads(run_cli(["replay", sid, "--json"]).stdout)
    assert [s["sql"] for s in doc["statements"]][-2:] == ["select 40 + 2 as answer", "select 1/0"]


def test_connect_to_an_ssh_target_opens_a_shell(login, run_cli) -> None:
    """`pcigate connect web-1` (no -L): the same terminal session as `pcigate ssh web-1`; here without a
    terminal, the remote shell reads the commands from stdin."""
    assert login("alice").code == 0
    r = run_cli(["connect", "web-1"], input="echo via-connect $(id -un)\nexit 4\n")
    assert r.code == 4, r.output
    assert "via-connect webops" in r.stdout
    assert _last_session(run_cli)["cert_serial"]


def test_port_forwarding_needs_a_level_that_allows_it(login, run_cli) -> None:
    assert login("alice").code == 0
    r = run_cli(["connect", "web-1", "--level", "admin", "-L", "18080:127.0.0.1:80"])
    assert r.code == 4, r.output
    assert "port forwarding is not allowed at level 'admin'" in r.stderr
