"""Warm start for ``pcigate connect`` and ``pcigate ssh``: a resident helper with the CLI's libraries
imported runs each session in a fork of itself (docs/architecture.md, "Warm start").

Why: most of a cold ``connect``'s time to a ready tunnel is CPython importing typer, pydantic, httpx, asyncio
and the tunnel (docs/performance.md, "Connect and start-up"), and no code change inside one process can get
under the issue's 150 ms beyond OpenBao on these machines. Mercurial's chg and ssh's ControlMaster answer the
same problem the same way.

How:

* **client** (:func:`handoff`, run by the console script before anything heavy is imported): for a routed
  command, connect to the helper's Unix socket, hand over argv, the environment, the working directory, the
  umask and fds 0-2 (``SCM_RIGHTS``), and from then on only forward signals (Ctrl-C, SIGTERM, SIGHUP, window
  size) to the worker, run the interactive child the worker asks for (psql) in the user's terminal, and exit
  with the worker's status. No helper (or an unusable one): the command runs in this process as before, and
  once its tunnel is ready a helper is started for the next one (:func:`start_helper`).
* **helper** (:func:`serve`): imports what sessions need, then accepts connections of the same user only
  (``SO_PEERCRED``) and forks a worker per connection; it exits after :data:`ENV_IDLE` seconds without one,
  or when its socket is no longer its own. It holds no secret: tokens and credentials exist only in workers.
* **worker** (:func:`_work`): takes over the client's fds, environment, directory and argv, and runs the
  ordinary command (``pcigate.app.main``). psql must be the terminal's foreground job (Ctrl-C, Ctrl-Z, its
  pager), so the worker asks the client to start it (:func:`spawn`) and sees it as a :class:`RemoteChild`.

One helper per user, per installed code (the socket's name carries a fingerprint of the interpreter,
``sys.path`` and the package's files): an upgrade or an edit gets a new helper, the old one idles out. The
socket lives in ``$XDG_RUNTIME_DIR/pcigate`` (else ``/tmp/pcigate-UID``), a 0700 directory of the user's
(:func:`socket_path`).
``PCIGATE_RESIDENT=0`` turns all of it off. Linux only (``SO_PEERCRED``, ``pidfd_open``).

Only the standard library at module level: :func:`handoff` is on every routed command's path.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing is 4 ms of every routed command's start
if TYPE_CHECKING:
    import asyncio
    import socket
    from collections.abc import Callable
    from typing import Any, NoReturn

ENV = "PCIGATE_RESIDENT"  # "0", "off", "no", "false": never use or start a helper
ENV_IDLE = "PCIGATE_RESIDENT_IDLE"  # seconds a helper waits for a command before it exits
DEFAULT_IDLE = 3600.0  # as Mercurial's chg server (chgserver.idletimeout)
ROUTED = ("connect", "ssh")
# Commands that come before a session (sign in, look around): when no helper runs, they start one as they
# end, so that the `connect` after them is warm.
PRIMING = ("login", "whoami", "targets")
MAX_MESSAGE = 1 << 20  # bytes of one message (the environment is the largest part)
MAX_PATH = 107  # sun_path holds 108 bytes with the NUL
_OFF = ("0", "off", "no", "false")
_ROOT_VALUE_OPTIONS = ("--broker", "--token-file")  # root options that take a value (pcigate.app's)
_FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGWINCH", "SIGUSR1", "SIGUSR2")
# What the helper's own environment keeps of the first client's: it affects imports only; each worker gets
# its client's whole environment (tokens included) through the socket, never the helper.
# Variables read once at import (OpenSSL's configuration when ssl is imported, typer's switches): the helper
# gets the client's, and they are part of the fingerprint, so a client with other values gets another helper.
_READ_AT_IMPORT = ("OPENSSL_CONF", "OPENSSL_MODULES", "TYPER_USE_RICH", "_TYPER_STANDARD_TRACEBACK")
_HELPER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME",
               ENV_IDLE, *_READ_AT_IMPORT)
# Imported by the helper before it serves (what `connect` and `ssh` import, and what their policies may need).
PRELOAD = (
    "pcigate.app", "pcigate.session", "pcigate.client", "pcigate.auth.credentials", "pcigate.spool",
    "pcigate.recording", "pcigate.tunnel.pg", "pcigate.tunnel.ssh", "pcigate.sshclient", "pcigate.output",
    "pcigate.guardrails", "pcigate.sqltaint", "pcigate.psqlargs", "uvloop", "asyncio.subprocess",
    # what the libraries import on first use: httpx's transport, rich's console, typer's parameter types
    "httpcore", "h11", "certifi", "encodings.idna", "rich.console", "rich.progress", "typer._adapters",
    "typer._click.decorators", "rich._emoji_codes",
)

_absent: str | None = None  # the socket no helper answered on (the cold path starts one there)
_link: _Link | None = None  # in a worker: its client


# ------------------------------------------------------------------------------------------------ where
def enabled(args: list[str]) -> bool:
    """Whether ``pcigate ARGS`` goes to a helper: a routed command, the feature on, a platform that has it."""
    return _on() and command_of(args) in ROUTED


def _on() -> bool:
    if os.environ.get(ENV, "").strip().lower() in _OFF or os.environ.get("_PCIGATE_COMPLETE"):
        return False
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


def routed(args: list[str]) -> bool:
    """``args`` (``sys.argv[1:]``) run a session: one of :data:`ROUTED`, not its help."""
    return command_of(args) in ROUTED


def command_of(args: list[str]) -> str | None:
    """The command ``args`` run, not its help; None for help, a version, nothing."""
    head = args[:args.index("--")] if "--" in args else args
    if "-h" in head or "--help" in head:
        return None
    return first_command(args)


def first_command(args: list[str]) -> str | None:
    """The first word of ``args`` (``sys.argv[1:]``) after the root options; None when help, a version or
    ``--`` comes first (shared with ``pcigate.app.invoked_command``)."""
    i = 0
    while i < len(args):
        a = args[i]
        if a in _ROOT_VALUE_OPTIONS:
            i += 2
            continue
        if a in ("--", "-h", "--help", "--version"):
            return None
        if a.startswith("-"):
            i += 1
            continue
        return a
    return None


def fingerprint() -> str:
    """16 hex digits that change with the interpreter, ``sys.path`` (and what is installed there: a
    directory's mtime moves when entries come or go) and any file of the package."""
    import zlib

    parts = [sys.executable, sys.version, *(f"{k}={os.environ.get(k)}" for k in _READ_AT_IMPORT)]
    for p in sys.path:
        try:
            parts.append(f"{p}\0{os.stat(p).st_mtime_ns}")
        except OSError:
            parts.append(p)
    stack = [os.path.dirname(os.path.abspath(__file__))]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    if e.name != "__pycache__":
                        stack.append(e.path)
                elif e.name.endswith((".py", ".so")):
                    st = e.stat(follow_symlinks=False)  # an editor's dangling lock link (.#x.py) too
                    parts.append(f"{e.path}\0{st.st_mtime_ns}\0{st.st_size}")
    parts.sort()
    data = "\n".join(parts).encode("utf-8", "surrogateescape")
    return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


def runtime_dirs() -> list[str]:
    """Where a helper's socket may live, in order: ``$XDG_RUNTIME_DIR/pcigate``, ``$TMPDIR/pcigate-UID``
    (as tmux does; also when the first gives too long a socket path)."""
    dirs = []
    base = os.environ.get("XDG_RUNTIME_DIR") or ""
    if base and os.path.isdir(base):
        dirs.append(os.path.join(base, "pcigate"))
    dirs.append(os.path.join(os.environ.get("TMPDIR") or "/tmp", f"pcigate-{os.getuid()}"))  # noqa: S108
    return dirs


def private_dir(path: str) -> bool:
    """``path`` is (or is now, created 0700) a directory of this user's that only they can use."""
    import stat

    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return False
    st = os.lstat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def socket_path() -> str | None:
    """This user's helper socket for the installed code; None when there is no usable place for it (or the
    package's files cannot be read: a directory going away during an upgrade)."""
    try:
        name = f"warm-{fingerprint()}.sock"
    except OSError:
        return None
    for directory in runtime_dirs():
        path = os.path.join(directory, name)
        if len(os.fsencode(path)) <= MAX_PATH and private_dir(directory):
            return path
    return None


# ------------------------------------------------------------------------------------------------ wire
class _Wire:
    """Length-prefixed JSON messages over a Unix stream socket, the first ones carrying fds."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def pending(self) -> bool:
        """A whole message is already buffered (select() would not say so)."""
        return len(self._buf) >= 4 and len(self._buf) >= 4 + int.from_bytes(self._buf[:4], "big")

    def send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        import json
        import socket as _socket

        body = json.dumps(msg, separators=(",", ":")).encode("utf-8", "surrogateescape")
        if len(body) > MAX_MESSAGE:
            raise ValueError("message too large")
        data = len(body).to_bytes(4, "big") + body
        if fds:
            sent = _socket.send_fds(self.sock, [data], fds)
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def recv(self, want_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message and the fds that came with it; ``(None, [])`` at the end of the stream."""
        import json
        import socket as _socket

        fds: list[int] = []
        while len(self._buf) < 4 or len(self._buf) < 4 + int.from_bytes(self._buf[:4], "big"):
            if len(self._buf) >= 4 and int.from_bytes(self._buf[:4], "big") > MAX_MESSAGE:
                raise ValueError("message too large")
            if want_fds and not fds:
                chunk, got, _flags, _addr = _socket.recv_fds(self.sock, 65536, want_fds)
                fds.extend(got)
            else:
                chunk = self.sock.recv(65536)
            if not chunk:
                for fd in fds:
                    os.close(fd)
                return None, []
            self._buf += chunk
        size = int.from_bytes(self._buf[:4], "big")
        body, self._buf = self._buf[4:4 + size], self._buf[4 + size:]
        msg = json.loads(body.decode("utf-8", "surrogateescape"))
        if not isinstance(msg, dict):
            raise ValueError("not a message")
        return msg, fds


def _peer_uid(sock: socket.socket) -> int:
    import socket as _socket
    import struct

    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


# ------------------------------------------------------------------------------------------------ client
def handoff(argv: list[str]) -> int | None:
    """Run ``argv`` in a helper's worker and return its exit status; None when it did not start there (then
    the caller runs the command itself; if no helper answered, :func:`start_helper` starts one later)."""
    global _absent
    if not enabled(argv[1:]) or _background_job():
        return None
    path = socket_path()
    if path is None:
        return None
    import socket as _socket

    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        _absent = path
        return None
    wire = _Wire(sock)
    try:
        if _peer_uid(sock) != os.getuid():
            raise PermissionError(path)
        streams = [[s.encoding, s.errors, s.line_buffering, getattr(s, "write_through", False)]
                   for s in (sys.stdin, sys.stdout, sys.stderr)]
        umask = os.umask(0o077)
        os.umask(umask)
        wire.send({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask,
                   "streams": streams}, fds=[0, 1, 2])
        msg, _ = wire.recv()
    except (OSError, ValueError):
        msg = None
    except KeyboardInterrupt:  # Ctrl-C before the worker said who it is: it ends on its own (a hang-up)
        sys.stderr.write("\n")
        return 130
    if msg is None or not isinstance(msg.get("pid"), int):
        sock.close()  # the helper took nothing on (no worker started): run here
        return None
    return _attend(wire, msg["pid"])


def _background_job() -> bool:
    """Started in the background of its terminal (``pcigate ssh host &``): run in-process, where job control
    stops it before it takes the terminal (a worker has no controlling terminal to be stopped by)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp()
    except OSError:
        return False


def _attend(wire: _Wire, pid: int) -> int:
    """The client's part while the worker runs the command (see the module docstring)."""
    import select
    import signal

    def forward(signum: int, frame: object) -> None:
        try:  # noqa: SIM105 - contextlib is 1 ms more of the client's start
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for name in _FORWARDED:
        signal.signal(getattr(signal, name), forward)
    child = pidfd = -1
    try:
        while True:
            waits = [wire.sock] + ([pidfd] if pidfd >= 0 else [])
            ready = [wire.sock] if wire.pending() else select.select(waits, [], [])[0]
            if pidfd in ready:
                _, status = os.waitpid(child, 0)
                os.close(pidfd)
                child = pidfd = -1
                wire.send({"exited": os.waitstatus_to_exitcode(status)})
                continue
            msg, _ = wire.recv()
            if msg is None:
                sys.stderr.write("error: the pcigate session process ended without a status\n")
                return 1
            if "exit" in msg:
                return int(msg["exit"])
            if "spawn" in msg:
                child, pidfd, error = _spawn(msg, child, pidfd)
                wire.send({"spawn_error": error} if error else {"spawned": child})
            elif "kill" in msg and child >= 0:
                try:  # noqa: SIM105 - as above
                    os.kill(child, int(msg["kill"]))
                except ProcessLookupError:
                    pass
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: lost the pcigate session process ({exc})\n")
        return 1
    finally:
        if child >= 0:  # the worker is gone: its tunnel with it, so psql has nothing left to talk to
            try:  # noqa: SIM105 - as above
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _spawn(msg: dict[str, Any], child: int, pidfd: int) -> tuple[int, int, str | None]:
    """Start the child a ``spawn`` message asks for: (pid, pidfd, None), or the old pair and why not."""
    import signal

    if child >= 0:
        return child, pidfd, "a child is running already"
    argv = [str(a) for a in msg["spawn"]]
    env = {str(k): str(v) for k, v in dict(msg.get("env") or {}).items()}
    try:
        # as subprocess does (restore_signals): what Python ignores, the child must not
        # as subprocess does (close_fds): only fds 0-2 reach the child
        closing = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 2]
        pid = os.posix_spawn(argv[0], argv, env, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                             file_actions=closing)
    except OSError as exc:
        return child, pidfd, exc.strerror or str(exc)
    try:
        return pid, os.pidfd_open(pid), None
    except OSError as exc:  # cannot watch it: it must not run unwatched
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return child, pidfd, exc.strerror or str(exc)


def prime(argv: list[str]) -> None:
    """For a :data:`PRIMING` command: if no helper answers, have :func:`start_helper` start one."""
    global _absent
    if not _on() or command_of(argv[1:]) not in PRIMING:
        return
    path = socket_path()
    if path is None:
        return
    if not _helper_alive(path):
        _absent = path


def _helper_alive(path: str) -> bool:
    """A helper holds ``PATH.lock`` (exclusively) from its start to its end: asked without connecting."""
    import fcntl

    try:
        fd = os.open(path + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # a shared lock we got goes with it
    return False


def _inheritable_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                fds.append(fd)
        except OSError:
            continue  # the listing's own fd, gone by now
    return fds


def absent() -> bool:
    """This command found no helper where one would have served it."""
    return _absent is not None


def start_helper() -> None:
    """Start a helper on the socket no helper answered on (a detached process of its own session), for the
    next command. Called once the cold command no longer needs the CPU for its own start-up."""
    global _absent
    path, _absent = _absent, None
    if path is None:
        return
    import contextlib
    import subprocess

    env = {k: os.environ[k] for k in _HELPER_ENV if k in os.environ}
    code = "import pcigate.resident as r; r.main()"
    with contextlib.suppress(OSError):  # only a warm start lost
        subprocess.Popen([sys.executable, "-P", "-c", code, path], env=env, cwd="/", start_new_session=True,
                         close_fds=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------------ helper
def main() -> None:
    """``python -c 'import pcigate.resident as r; r.main()' SOCKET``: the helper."""
    serve(sys.argv[1])


def _idle_seconds() -> float:
    try:
        return max(1.0, float(os.environ.get(ENV_IDLE) or DEFAULT_IDLE))
    except ValueError:
        return DEFAULT_IDLE


def preload() -> None:
    """Import :data:`PRELOAD` and build the API models' validators (they are built on first use)."""
    import importlib

    from pcigate import startup

    startup.begin()
    for name in PRELOAD:
        importlib.import_module(name)
    from pydantic import BaseModel

    from pcigate import models, recording, spool

    for mod in (models, spool, recording):
        for value in vars(mod).values():
            if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == mod.__name__:
                value.model_rebuild(force=True)


def serve(path: str) -> None:
    """Serve ``path`` until idle or SIGTERM; only one helper per socket (an exclusive lock on ``PATH.lock``,
    which also holds the helper's pid and how many commands it has served)."""
    import contextlib
    import fcntl
    import gc
    import signal
    import socket as _socket
    import time

    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another helper serves (or is starting)
    preload()
    gc.collect()
    gc.freeze()  # what the imports made is never collected again, in the helper or in a worker
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead helper's socket: the lock says no live one owns it
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(16)
    served = 0
    os.pwrite(lock, f"{os.getpid()} {served}\n".encode(), 0)  # pid and commands served, for `cat`
    inode = os.stat(path).st_ino
    idle = _idle_seconds()
    listener.settimeout(min(idle, 2.0))
    last = time.monotonic()
    signal.signal(signal.SIGTERM, _leave)
    try:
        while True:
            _reap()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if time.monotonic() - last >= idle or not _still_ours(path, inode):
                    return
                continue
            last = time.monotonic()
            conn.settimeout(None)
            try:
                if _peer_uid(conn) != os.getuid():
                    continue
                if os.fork() == 0:
                    try:  # a worker never returns into this loop or its clean-up, whatever escapes _work
                        listener.close()
                        os.close(lock)
                        _work(conn)
                    finally:
                        os._exit(1)
                served += 1
                os.pwrite(lock, f"{os.getpid()} {served}\n".encode(), 0)
            finally:
                conn.close()
    finally:
        if _still_ours(path, inode):
            os.unlink(path)


def _leave(signum: int, frame: object) -> None:
    """SIGTERM: leave through :func:`serve`'s clean-up (its socket is removed)."""
    raise SystemExit(0)


def _still_ours(path: str, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ------------------------------------------------------------------------------------------------ worker
def _work(conn: socket.socket) -> NoReturn:
    """A forked worker: become the client's command, run it, report its status."""
    import contextlib
    import signal

    status = 1
    wire = _Wire(conn)
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        msg, fds = wire.recv(want_fds=3)
        if msg is None or len(fds) != 3:
            os._exit(1)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(str(msg["cwd"]))
        os.umask(int(msg["umask"]))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(msg["env"]).items()})
        _environment_read_at_start()
        sys.argv = [str(a) for a in msg["argv"]]
        _streams(msg["streams"])
        wire.send({"pid": os.getpid()})
        from pcigate import startup

        startup.mark("worker")  # the command has been handed over
    except BaseException:  # nothing started: the client runs the command itself
        os._exit(1)
    global _link
    _link = _Link(wire)
    try:
        status = _run_command()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # the client's end may be closed
                stream.flush()
        _link.close(status)
        os._exit(status)


def _environment_read_at_start() -> None:
    """What the standard library read of the helper's environment once and keeps: read the client's."""
    import tempfile
    import time

    tempfile.tempdir = None  # TMPDIR
    time.tzset()  # TZ


def _streams(spec: list[list[Any]]) -> None:
    """sys.stdin/stdout/stderr on the client's fds, as its interpreter had them (encoding, buffering)."""
    for fd, name, (encoding, errors, line_buffering, write_through) in zip(
            (0, 1, 2), ("stdin", "stdout", "stderr"), spec, strict=True):
        stream = open(fd, "r" if fd == 0 else "w", encoding=str(encoding), errors=str(errors),  # noqa: SIM115
                      closefd=False)
        if fd:
            stream.reconfigure(line_buffering=bool(line_buffering), write_through=bool(write_through))
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _run_command() -> int:
    from pcigate.app import main

    try:
        main()
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        sys.stderr.write(f"{exc.code}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


class _Link:
    """A worker's side of its client: a reader thread for the client's answers; the client gone (killed,
    its terminal closed) is a SIGHUP to the worker, which ends the session as a hang-up does."""

    def __init__(self, wire: _Wire) -> None:
        import threading

        self.wire = wire
        self.closing = False
        self.on_message: Callable[[dict[str, Any]], None] | None = None
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="pcigate-client", daemon=True).start()

    def _read(self) -> None:
        import signal

        while True:
            try:
                msg, _ = self.wire.recv()
            except (OSError, ValueError):
                msg = None
            if msg is None:
                if not self.closing:
                    # A child the client ran is out of reach now: seen as ended by that hang-up.
                    handler = self.on_message
                    if handler is not None:
                        handler({"exited": -int(signal.SIGHUP)})
                    os.kill(os.getpid(), signal.SIGHUP)
                return
            handler = self.on_message
            if handler is not None:
                handler(msg)

    def send(self, msg: dict[str, Any]) -> None:
        with self._send_lock:
            self.wire.send(msg)

    def close(self, status: int) -> None:
        import contextlib

        self.closing = True
        with contextlib.suppress(OSError):
            self.send({"exit": status})


def serving() -> bool:
    """This process is a worker serving a client (its interactive children run in the client)."""
    return _link is not None


async def spawn(argv: list[str], env: dict[str, str]) -> RemoteChild:
    """Start ``argv`` in the client, in the user's terminal (see the module docstring)."""
    import asyncio

    assert _link is not None
    child = RemoteChild(_link, asyncio.get_running_loop())
    await child.start(argv, env)
    return child


class RemoteChild:
    """A process the client started for this worker; the interface of asyncio's ``Process`` that the
    session uses (``send_signal``, ``terminate``, ``kill``, ``wait``, ``returncode``)."""

    def __init__(self, link: _Link, loop: asyncio.AbstractEventLoop) -> None:
        self._link = link
        self._loop = loop
        self._started: asyncio.Future[int] = loop.create_future()
        self._exited: asyncio.Future[int] = loop.create_future()
        self.pid = 0
        self.returncode: int | None = None

    def _message(self, msg: dict[str, Any]) -> None:
        if "spawned" in msg and not self._started.done():
            self._started.set_result(int(msg["spawned"]))
        elif "spawn_error" in msg and not self._started.done():
            self._started.set_exception(OSError(str(msg["spawn_error"])))
        elif "exited" in msg and not self._exited.done():
            self.returncode = int(msg["exited"])
            self._exited.set_result(self.returncode)

    async def start(self, argv: list[str], env: dict[str, str]) -> None:
        import contextlib

        loop = self._loop
        def deliver(msg: dict[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the session is over
                loop.call_soon_threadsafe(self._message, msg)

        self._link.on_message = deliver
        self._link.send({"spawn": argv, "env": env})
        self.pid = await self._started

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                self._link.send({"kill": int(sig)})
            except OSError as exc:
                raise ProcessLookupError(self.pid) from exc

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        import asyncio

        return await asyncio.shield(self._exited)
