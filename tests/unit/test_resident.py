"""pcigate.resident's pure parts: which commands go to a helper, where its socket lives, the message framing
between client and worker (over real Unix sockets), and what the console script imports for it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcigate import resident


@pytest.mark.parametrize(("args", "expected"), [
    (["connect", "prod-db"], True),
    (["ssh", "web-1"], True),
    (["--broker", "https://b", "connect", "prod-db"], True),
    (["--json", "--token-file", "t", "ssh", "x"], True),
    (["connect", "--help"], False),  # help starts no session
    (["connect", "prod-db", "-h"], False),
    (["connect", "prod-db", "--", "-h", "db"], True),  # psql's -h
    (["targets"], False),
    (["sessions", "connect"], False),  # a value of another command, not the command
    (["--broker", "connect", "targets"], False),  # "connect" is --broker's value
    (["--help", "connect"], False),
    (["--version"], False),
    ([], False),
])
def test_only_connect_and_ssh_are_routed(args: list[str], expected: bool) -> None:
    assert resident.routed(args) is expected


@pytest.mark.parametrize("value", ["0", "off", "OFF", "no", "false", " 0 "])
def test_the_off_switch(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(resident.ENV, value)
    assert not resident.enabled(["connect", "prod-db"])
    monkeypatch.setenv(resident.ENV, "1")
    assert resident.enabled(["connect", "prod-db"]) is sys.platform.startswith("linux")


def test_shell_completion_is_never_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(resident.ENV, "1")
    monkeypatch.setenv("_PCIGATE_COMPLETE", "bash_complete")
    assert not resident.enabled(["connect", "prod-db"])


def test_the_socket_lives_in_a_private_runtime_directory(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    path = resident.socket_path()
    assert path is not None
    assert Path(path).parent == run / "pcigate"
    assert (run / "pcigate").stat().st_mode & 0o777 == 0o700


def test_a_directory_others_can_use_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    (run / "pcigate").mkdir(parents=True)
    (run / "pcigate").chmod(0o770)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    path = resident.socket_path()
    assert path is not None
    assert Path(path).parent == tmp_path / f"pcigate-{os.getuid()}"  # the fallback


def test_too_long_a_runtime_path_falls_back_to_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / ("r" * 90)
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    path = resident.socket_path()
    assert path is not None
    assert len(os.fsencode(path)) <= resident.MAX_PATH
    assert Path(path).parent == tmp_path / f"pcigate-{os.getuid()}"


def test_the_fingerprint_follows_what_is_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change under sys.path (a package installed or removed there) gives another socket, so a helper of
    other code is never used."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    before = resident.fingerprint()
    assert resident.fingerprint() == before
    (site / "newpkg").mkdir()
    os.utime(site, ns=(1, os.stat(site).st_mtime_ns + 1_000_000_000))
    assert resident.fingerprint() != before


def _pair() -> tuple[resident._Wire, resident._Wire]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return resident._Wire(a), resident._Wire(b)


@given(st.lists(st.dictionaries(st.text(max_size=20), st.one_of(st.integers(), st.text(max_size=200),
                                                                st.lists(st.text(max_size=30))),
                                max_size=8), min_size=1, max_size=6))
def test_messages_arrive_whole_and_in_order(msgs: list[dict[str, object]]) -> None:
    left, right = _pair()
    try:
        for m in msgs:
            left.send(m)
        left.sock.shutdown(socket.SHUT_WR)
        got = []
        while True:
            m, _ = right.recv()
            if m is None:
                break
            got.append(m)
        assert got == msgs
    finally:
        left.sock.close()
        right.sock.close()


def test_the_standard_fds_travel_with_the_first_message(tmp_path: Path) -> None:
    left, right = _pair()
    r, w = os.pipe()
    try:
        left.send({"argv": ["pcigate"]}, fds=[w])
        msg, fds = right.recv(want_fds=3)
        assert msg == {"argv": ["pcigate"]}
        assert len(fds) == 1
        os.write(fds[0], b"through the passed fd")
        os.close(fds[0])
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"through the passed fd"
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        left.sock.close()
        right.sock.close()


def test_an_oversized_or_malformed_message_is_refused() -> None:
    left, right = _pair()
    try:
        left.sock.sendall((resident.MAX_MESSAGE + 1).to_bytes(4, "big") + b"{")
        with pytest.raises(ValueError, match="too large"):
            right.recv()
    finally:
        left.sock.close()
        right.sock.close()
    left, right = _pair()
    try:
        left.sock.sendall((2).to_bytes(4, "big") + b"[]")
        with pytest.raises(ValueError, match="not a message"):
            right.recv()
        with pytest.raises(ValueError, match="too large"):
            left.send({"env": "x" * resident.MAX_MESSAGE})
    finally:
        left.sock.close()
        right.sock.close()


def test_a_cut_message_is_the_end_of_the_stream() -> None:
    left, right = _pair()
    left.sock.sendall((100).to_bytes(4, "big") + b'{"half')
    left.sock.close()
    try:
        assert right.recv() == (None, [])
    finally:
        right.sock.close()


def test_the_peer_is_known_by_its_uid() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert resident._peer_uid(a) == os.getuid()


def test_the_console_script_imports_little_before_the_handoff() -> None:
    """What a routed command imports before it hands over (or not): the standard library's socket, json,
    select and signal, and nothing of typer, pydantic, httpx or asyncio (the point of the warm start)."""
    code = ("import sys; import pcigate.entry, pcigate.resident as r; "
            "r.enabled(['connect', 'x']); r.socket_path(); print(' '.join(sorted(sys.modules)))")
    env = {**os.environ, "PCIGATE_RESIDENT": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    for heavy in ("typer", "pydantic", "httpx", "asyncio", "pcigate.app", "typing"):
        assert heavy not in out, heavy


def test_the_client_starts_the_child_the_worker_asks_for(tmp_path: Path) -> None:
    """What the client does with a ``spawn`` message: a real process, watched through a pidfd; a second one
    while it runs, or a program that cannot start, is refused with the reason."""
    import select

    pid, pidfd, error = resident._spawn({"spawn": ["/bin/sh", "-c", "exit 3"], "env": {"A": "1"}}, -1, -1)
    assert error is None
    try:
        busy = resident._spawn({"spawn": ["/bin/true"]}, pid, pidfd)
        assert busy == (pid, pidfd, "a child is running already")
        assert select.select([pidfd], [], [], 10)[0] == [pidfd]  # readable once it has exited
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        os.close(pidfd)
    child, fd, error = resident._spawn({"spawn": [str(tmp_path / "no-such-psql")]}, -1, -1)
    assert (child, fd) == (-1, -1)
    assert error == "No such file or directory"


@pytest.mark.parametrize(("args", "command"), [
    (["login", "--device"], "login"),
    (["--broker", "https://b", "targets", "--json"], "targets"),
    (["targets", "--help"], None),
    (["--version"], None),
])
def test_the_command_of_a_command_line(args: list[str], command: str | None) -> None:
    assert resident.command_of(args) == command


def test_login_and_targets_start_a_helper_when_none_holds_the_lock(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper holds its lock while it lives; a priming command asks the lock (it does not connect, which
    would fork a worker for nothing) and, with no holder, leaves the helper to be started as it ends."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv(resident.ENV, "1")
    path = resident.socket_path()
    assert path is not None

    def primed(*args: str) -> bool:
        monkeypatch.setattr(resident, "_absent", None)
        resident.prime(["pcigate", *args])
        return resident.absent()

    assert primed("login")  # no lock file: no helper
    assert not primed("sessions")  # not a priming command
    holder = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert primed("targets")  # a lock file nobody holds: a helper that died
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert not primed("targets")  # held: a helper lives (or is starting)
        assert not primed("whoami")
    finally:
        os.close(holder)
    assert primed("whoami")


def test_the_child_gets_only_the_standard_fds() -> None:
    """As subprocess's close_fds: an inheritable fd of the client (a jobserver pipe, `3<file`) does not
    reach psql."""
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        script = f"ls /proc/self/fd > /dev/null; [ -e /proc/self/fd/{w} ] && exit 7; exit 0"
        pid, pidfd, error = resident._spawn({"spawn": ["/bin/sh", "-c", script]}, -1, -1)
        assert error is None
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_background_job_of_its_terminal_is_not_handed_over() -> None:
    """`pcigate ssh host &`: a worker would take the terminal from the shell (it has no job control to stop
    it), so such a command runs in-process; in the foreground of its terminal it is handed over."""
    import pty

    code = ("import os, pcigate.resident as r\n"
            "print('fg', r._background_job(), flush=True)\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    os.setpgid(0, 0)  # a job of its own, not the terminal's foreground one\n"
            "    print('bg', r._background_job(), flush=True)\n"
            "    os._exit(0)\n"
            "os.waitpid(child, 0)\n")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child, in a new session whose terminal is the pty
        try:
            os.execv(sys.executable, [sys.executable, "-c", code])
        finally:
            os._exit(127)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.waitpid(pid, 0)
        os.close(fd)
    assert out.split() == [b"fg", b"False", b"bg", b"True"]
