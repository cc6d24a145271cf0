"""``pcigate connect``: open a broker session, run the local tunnel, run psql, and always clean up.

Order on the way out, whatever ended the session (psql exit, Ctrl-C, SIGTERM, a dropped tunnel, an error):
close the tunnel → close the recording (SHA-256) → end the session at the broker (the lease dies now) → upload
the recording → delete it from the spool. Whatever the broker did not acknowledge stays in the spool
(:mod:`pcigate.spool`) for the next command or ``pcigate sessions sync``.

The database password lives only in memory (the tunnel's). ``psql`` gets a one-time local secret through a
temporary 0600 ``PGPASSFILE`` whose path is in its environment; the file is deleted when the session ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pcigate import __version__, spool, startup
from pcigate.config import Settings, psql_binary
from pcigate.errors import NotFound, PcigateError, PortInUse, RecordingError, UsageError
from pcigate.models import DatabaseCredentials, SessionCreate, SessionOpened

if TYPE_CHECKING:
    from pcigate.client import BrokerClient
    from pcigate.output import Output
    from pcigate.sshclient import EphemeralKey

# Variables that would make psql go elsewhere or carry a password: never passed to the child. Every
# ``PCIGATE_*`` variable (the workload bearer ``PCIGATE_TOKEN`` among them) is stripped as well.
STRIPPED_PREFIX = "PCIGATE_"
STRIPPED_ENV = (
    "PGPASSWORD",
    "PGPASSFILE",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGREQUIRESSL",
    "PGGSSENCMODE",
    "PGTARGETSESSIONATTRS",
)
LOCAL_HOST = "127.0.0.1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MIN_HEARTBEAT_SECONDS = 1.0
TERM_RESEND = 0.5  # seconds between SIGTERMs to a child that has not exited yet (see end_child)
PSQL_STOP_GRACE = 5.0  # seconds psql gets to exit after SIGTERM when the broker ended the session
# Imported in the background while the broker and OpenBao open the session (see startup.Prefetch): the
# tunnel (with the recording, masking, guardrails/pglast and wire modules it imports).
TUNNEL_MODULES = ("pcigate.tunnel.pg",)


@dataclass
class ConnectRequest:
    target: str
    level: str | None = None
    ttl_seconds: int | None = None
    port: int = 0
    no_exec: bool = False
    psql_args: list[str] = field(default_factory=list)
    # ssh targets: "ssh" when the command was `pcigate ssh` (a postgres target is refused); the remote
    # command; port forwards (-L): forward mode, no terminal
    kind: Literal["ssh"] | None = None
    command: list[str] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)


@dataclass
class _State:
    stop: asyncio.Event
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def passfile(port: int, secret: str) -> Iterator[Path]:
    """A 0600 pgpass file in a private 0700 directory, removed on exit."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    directory = Path(tempfile.mkdtemp(prefix="pcigate-", dir=base if base and os.path.isdir(base) else None))
    path = directory / "pgpass"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{LOCAL_HOST}:{port}:*:*:{secret}\n")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()


def child_env(pgpassfile: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if k not in STRIPPED_ENV and not k.upper().startswith(STRIPPED_PREFIX)
    }
    env["PGPASSFILE"] = str(pgpassfile)
    env["PGSSLMODE"] = "disable"  # loopback to the tunnel; the tunnel does TLS upstream
    env["PGGSSENCMODE"] = "disable"
    return env


def psql_argv(binary: str, opened: SessionOpened, port: int, extra: list[str]) -> list[str]:
    creds = _db(opened)
    user = creds.username or "pcigate"
    return [binary, "-h", LOCAL_HOST, "-p", str(port), "-d", creds.database, "-U", user, *extra]


def _db(opened: SessionOpened) -> DatabaseCredentials:
    if opened.credentials is None:
        raise UsageError(f"{opened.target} is not a database target")
    return opened.credentials


def exit_status(returncode: int) -> int:
    """A child's status as a shell gives it: its exit code, or 128 + the signal that ended it."""
    return 128 - returncode if returncode < 0 else returncode


class _Child(Protocol):
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


async def end_child(proc: _Child, exited: asyncio.Future[Any], grace: float,
                    every: float = TERM_RESEND) -> None:
    """SIGTERM a child (psql, ssh), again every ``every`` seconds, and SIGKILL it if ``exited`` (its wait) is
    not done ``grace`` seconds after the first.

    Why again: OpenSSH's client (9.2, Debian 12) checks its quit flag and then sleeps in a plain ``poll()``
    whose timeout is the ServerAliveInterval; a SIGTERM that lands between the two only wakes it up at the
    next packet, up to 15 s later. A second SIGTERM interrupts that sleep."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while True:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            await asyncio.wait_for(asyncio.shield(exited), min(every, left))
            return
        except TimeoutError:
            continue
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


@contextlib.contextmanager
def _signal_handlers(handlers: dict[signal.Signals, Callable[[], object]]) -> Iterator[None]:
    """The running loop's handlers for these signals while the block runs (where the loop can have them)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig, handler in handlers.items():
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def resolve_psql() -> str:
    binary = psql_binary()
    found = shutil.which(binary)
    if found is None:
        raise UsageError(
            f"cannot find the psql program ({binary})",
            hint="install the PostgreSQL client (psql) or set PCIGATE_PSQL to its path",
        )
    return found


def _unwind_on_signals() -> None:
    """SIGTERM/SIGHUP outside the event loop (opening, closing): unwind through the clean-up like Ctrl-C
    instead of dying with a live lease. Inside the loop, its own handlers take over (and go with it)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


def check_port_free(port: int) -> None:
    """A ``--port`` that is taken fails before any session exists (no credentials minted for nothing). The
    tunnel binds it again when it starts: a port taken in between fails there, and the session is ended."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the tunnel's listener
        try:
            probe.bind((LOCAL_HOST, port))
        except OSError as e:
            raise PortInUse.binding(LOCAL_HOST, port, e) from None


def _stdlib_loop() -> bool:
    return os.environ.get("PCIGATE_EVENT_LOOP", "").lower() == "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when importable (faster relay); ``PCIGATE_EVENT_LOOP=asyncio`` selects the stdlib loop."""
    if _stdlib_loop():
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class Connector:
    def __init__(
        self,
        client: BrokerClient,
        settings: Settings,
        out: Output | Callable[[], Output],
        *,
        sign_in: Callable[[], object] | None = None,
    ) -> None:
        """``out``: the output, or a function making it when it is first needed (it imports rich).
        ``sign_in``: gets the bearer ready (keyring, refresh) before the session is opened, so that only the
        network wait overlaps the imports in the background (see :meth:`run`)."""
        self.client = client
        self.settings = settings
        self._out = out
        self._sign_in = sign_in
        # Set while the session runs: ends it from the recording's writer thread (fail closed).
        self._end_unrecorded: Callable[[str], None] | None = None
        self._ssh_key: EphemeralKey | None = None  # ssh targets: this session's key, in memory only

    @property
    def out(self) -> Output:
        if callable(self._out):
            self._out = self._out()
        return self._out

    def _recording_failed(self, message: str) -> None:
        """The recording's writer thread could not write (disk full...): nothing may run unrecorded."""
        end = self._end_unrecorded
        if end is not None:
            end(message)

    # -- entry point
    def run(self, request: ConnectRequest) -> int:
        binary: str | None = None
        missing: UsageError | None = None
        if request.kind == "ssh" or request.forwards:
            from pcigate.sshclient import EphemeralKey, parse_forward, resolve_ssh

            for spec in request.forwards:
                parse_forward(spec)  # a bad -L fails before any session exists
            binary = resolve_ssh()
            self._ssh_key = EphemeralKey.generate()
        elif not request.no_exec:
            from pcigate.psqlargs import refusal

            why = refusal(request.psql_args)
            if why is not None:  # before any session: its credentials would be minted for nothing
                raise UsageError(why, hint="leave it out of the arguments after `--`")
            try:
                binary = resolve_psql()
            except UsageError as exc:
                missing = exc  # only an error if the target turns out to be a database
        if request.port and not request.forwards and request.kind != "ssh":
            check_port_free(request.port)
        _unwind_on_signals()
        recorder: Any = None
        status = 1
        error: BaseException | None = None
        spooled = False
        held = contextlib.ExitStack()
        create = SessionCreate(
            target=request.target,
            level=request.level,
            ttl_seconds=request.ttl_seconds,
            client_hostname=socket.gethostname()[:255],
            client_version=__version__,
            public_key=self._ssh_key.public if self._ssh_key is not None else None,
            kind="ssh" if request.kind == "ssh" or request.forwards else None,
            port_forwarding=bool(request.forwards),
        )
        if self._sign_in is not None:
            self._sign_in()
        # While the broker and OpenBao work (the GIL is free meanwhile), import what the tunnel needs.
        startup.mark("request")
        with startup.Prefetch(TUNNEL_MODULES if _stdlib_loop() else (*TUNNEL_MODULES, "uvloop")):
            try:
                opened = self.client.open_session(create)
            except PcigateError as exc:
                if getattr(exc, "broker_code", None) != "ssh_key_required":
                    raise
                # `pcigate connect` on an ssh target: the same session, with a key to sign.
                from pcigate.sshclient import EphemeralKey, resolve_ssh

                binary = resolve_ssh()
                self._ssh_key = EphemeralKey.generate()
                opened = self.client.open_session(
                    create.model_copy(update={"public_key": self._ssh_key.public, "kind": "ssh"}))
            startup.mark("response")
        # From here on the lease is live: every way out (a failing spool, a signal, an error) ends it.
        try:
            try:
                held.enter_context(spool.session_lock(opened.session_id))
                spool.new_entry(opened.session_id, self.settings.broker_url, recorded=opened.policy.record)
                spooled = True
                recorder = self._recorder(opened, request)
            except OSError as exc:
                raise spool.state_error(exc) from exc
            if opened.kind == "postgres" and missing is not None:
                raise missing
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                status = runner.run(self._session(opened, recorder, request, binary))
        except BaseException as exc:
            error = exc
        finally:
            _unwind_on_signals()  # again: the event loop's handlers went with it
            try:
                if spooled:
                    self._finish(opened, recorder, interrupted=isinstance(error, KeyboardInterrupt))
                else:
                    self._end_unspooled(opened)
            finally:
                held.close()
        if error is not None:
            raise error
        return status

    @staticmethod
    def _cast_header(opened: SessionOpened, request: ConnectRequest) -> dict[str, object]:
        """asciicast v2's header keys (and the certificate's) for a terminal recording."""
        from pcigate.tunnel.ssh import terminal_size

        cols, rows = terminal_size(0)
        extra: dict[str, object] = {
            "version": 2, "width": cols, "height": rows, "timestamp": int(opened.started_at.timestamp()),
            "env": {"TERM": os.environ.get("TERM", "")},
        }
        if opened.ssh is not None:
            extra.update(principal=opened.ssh.principal, cert_serial=opened.ssh.serial,
                         cert_key_id=opened.ssh.key_id)
        if request.command:
            command = " ".join(request.command)
            if opened.policy.masking is not None:  # masked before the cap: a cut never leaves a PAN's head
                from pcigate.masking import Masker

                command = Masker(opened.policy.masking).mask_text(command)
            extra["command"] = command[:4096]
        if request.forwards:
            extra["forwards"] = list(request.forwards)
        return extra

    def _recorder(self, opened: SessionOpened, request: ConnectRequest) -> Any:
        if not opened.policy.record:
            return None
        from pcigate.recording import RecordingHeader, RecordingWriter

        header = RecordingHeader(
            session_id=opened.session_id,
            user=opened.user,
            target=opened.target,
            level=opened.level,
            lease_id=opened.lease_id,
            policy_digest=opened.policy.digest,
            started_at=opened.started_at,
            kind="ssh" if opened.kind == "ssh" else "pg",
            extra=self._cast_header(opened, request) if opened.kind == "ssh" else {},
        )
        return RecordingWriter(
            spool.recording_path(opened.session_id), header, on_failure=self._recording_failed
        )

    # -- the live part
    async def _session(
        self, opened: SessionOpened, recorder: Any, request: ConnectRequest, binary: str | None
    ) -> int:
        if opened.kind == "ssh":
            assert binary is not None
            return await self._ssh_session(opened, recorder, request, binary)
        from pcigate.tunnel.pg import PgTunnel

        secret = secrets.token_urlsafe(32)
        tunnel = PgTunnel(
            upstream=_db(opened),
            local_secret=secret,
            recorder=recorder,
            listen_port=request.port,
            policy=opened.policy,
            masking_key=base64.urlsafe_b64decode(opened.masking_key) if opened.masking_key else None,
        )
        state = self._state(recorder)
        tasks: list[asyncio.Task[None]] = []
        try:
            await tunnel.check_upstream()
            port = await tunnel.start()
            startup.mark("ready")
            startup.end()  # the tunnel is ready
            tasks = self._watch(opened, state)
            with passfile(port, secret) as pgpass:
                if binary is None:
                    return await self._wait_no_exec(opened, port, pgpass, state)
                return await self._run_psql(binary, opened, port, pgpass, request.psql_args, state)
        finally:
            await self._unwatch(tasks)
            await tunnel.close()
            for problem in getattr(tunnel, "errors", []) or []:
                self.out.warn(f"tunnel: {problem}")
            self._notes(state)

    async def _ssh_session(self, opened: SessionOpened, recorder: Any, request: ConnectRequest,
                           binary: str) -> int:
        """A terminal (or, with -L, port-forward) session through the system ssh."""
        import sys

        from pcigate.masking import Masker
        from pcigate.sshclient import child_env, key_files, parse_forward, ssh_argv
        from pcigate.tunnel.ssh import TerminalRelay

        assert opened.ssh is not None
        assert self._ssh_key is not None
        state = self._state(recorder)
        forwards = [parse_forward(spec) for spec in request.forwards]
        interactive = not forwards and sys.stdin.isatty()
        masking = opened.policy.masking
        tasks = self._watch(opened, state)
        try:
            with key_files(self._ssh_key, opened.ssh) as files:
                argv = ssh_argv(binary, opened.ssh, files, tty=interactive, command=request.command,
                                forwards=forwards)
                relay = TerminalRelay(argv, child_env(), recorder, Masker(masking) if masking else None,
                                      interactive=interactive)
                handlers: dict[signal.Signals, Callable[[], object]] = dict.fromkeys(
                    STOP_SIGNALS, state.stop.set)
                if not forwards:
                    handlers[signal.SIGINT] = lambda: None  # like ssh: Ctrl-C belongs to the remote side
                # Ours before the forwards are announced (see _wait_no_exec): a Ctrl-C on that line ends it.
                with _signal_handlers(handlers):
                    for fw in forwards:
                        if recorder is not None:
                            recorder.cast("x", {"e": "forward", "listen": f"127.0.0.1:{fw.local_port}",
                                                "to": f"{fw.host}:{fw.port}"})
                        self.out.info(f"forwarding 127.0.0.1:{fw.local_port} to {fw.host}:{fw.port} on "
                                      f"{opened.target}; press Ctrl-C to end the session")
                    startup.mark("ready")
                    startup.end()
                    status = await relay.run(state.stop, on_stop=lambda: self._notes(state))
                if forwards and state.stop.is_set() and status in (130, 143, 255):
                    status = 0  # ended by Ctrl-C or by the broker, as asked
                return status
        finally:
            await self._unwatch(tasks)
            self._notes(state)

    def _state(self, recorder: Any) -> _State:
        """The live session's state; from now on a recording that cannot be written ends it (fail closed)."""
        state = _State(stop=asyncio.Event())
        loop = asyncio.get_running_loop()

        def end_unrecorded(message: str) -> None:
            def stop() -> None:
                state.notes.append(f"{message}; ending the session (nothing may run unrecorded)")
                state.stop.set()

            loop.call_soon_threadsafe(stop)

        self._end_unrecorded = end_unrecorded
        if recorder is not None and recorder.failed:  # failed before the session got going
            end_unrecorded(f"cannot write recording {recorder.path}")
        return state

    def _watch(self, opened: SessionOpened, state: _State) -> list[asyncio.Task[None]]:
        """Heartbeats, and the session's end time."""
        return [asyncio.create_task(self._heartbeat(opened, state)),
                asyncio.create_task(self._expiry(opened, state))]

    async def _unwatch(self, tasks: list[asyncio.Task[None]]) -> None:
        self._end_unrecorded = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _notes(self, state: _State) -> None:
        while state.notes:
            self.out.warn(state.notes.pop(0))

    async def _run_psql(
        self, binary: str, opened: SessionOpened, port: int, pgpass: Path, extra: list[str], state: _State
    ) -> int:
        from pcigate import resident

        argv, env = psql_argv(binary, opened, port, extra), child_env(pgpass)
        # A warm-start worker has no terminal of its own: its client runs psql (the foreground job).
        proc: Any = (await resident.spawn(argv, env) if resident.serving()
                     else await asyncio.create_subprocess_exec(*argv, env=env))

        def forward(sig: signal.Signals) -> Callable[[], None]:
            def handler() -> None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

            return handler

        exited = asyncio.ensure_future(proc.wait())
        stopped = asyncio.ensure_future(state.stop.wait())
        try:
            # Like ssh: psql owns Ctrl-C (it cancels the running query); we stay alive to clean up.
            with _signal_handlers({signal.SIGINT: lambda: None, signal.SIGTERM: forward(signal.SIGTERM),
                                   signal.SIGHUP: forward(signal.SIGHUP)}):
                try:
                    await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    if not exited.done():
                        # The broker ended the session (end time, revocation): say so now and end psql,
                        # whose tunnel is about to go; then clean up as usual.
                        self._notes(state)
                        self.out.info("ending psql")
                        await end_child(proc, exited, PSQL_STOP_GRACE)
                    return exit_status(await exited)
                finally:
                    stopped.cancel()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                await proc.wait()

    async def _wait_no_exec(self, opened: SessionOpened, port: int, pgpass: Path, state: _State) -> int:
        # The stop signals are ours before anything is printed: a script that reads the connection details
        # and at once sends SIGINT must end the session, even where SIGINT was ignored when we started (a
        # background job of a non-interactive shell), and a KeyboardInterrupt there would come mid-print.
        with _signal_handlers(dict.fromkeys(STOP_SIGNALS, state.stop.set)):
            self._print_no_exec(opened, port, pgpass)
            await state.stop.wait()
        return 0

    def _print_no_exec(self, opened: SessionOpened, port: int, pgpass: Path) -> None:
        creds = _db(opened)
        conninfo = f"host={LOCAL_HOST} port={port} dbname={creds.database} user={creds.username}"
        if self.out.json_mode:
            self.out.json(
                {
                    "session_id": opened.session_id,
                    "host": LOCAL_HOST,
                    "port": port,
                    "dbname": creds.database,
                    "user": creds.username,
                    "pgpassfile": str(pgpass),
                    "expires_at": opened.expires_at.isoformat(),
                }
            )
        else:
            self.out.info(
                f"session {opened.session_id} open on {opened.target} ({opened.level}) "
                f"until {opened.expires_at.isoformat(timespec='seconds')}"
            )
            self.out.info(f'connect with: PGPASSFILE={pgpass} psql "{conninfo}"')
            self.out.info("press Ctrl-C to end the session")

    async def _heartbeat(self, opened: SessionOpened, state: _State) -> None:
        interval = max(MIN_HEARTBEAT_SECONDS, opened.heartbeat_seconds)
        warned = False
        while True:
            await asyncio.sleep(interval)
            try:
                summary = await asyncio.to_thread(self.client.heartbeat, opened.session_id)
            except PcigateError as exc:
                # Only the broker saying the session is over ends it (409 session_closed, 404). Anything
                # else (broker or IdP unreachable, 5xx, a refused bearer) is transient: keep going.
                if isinstance(exc, NotFound) or getattr(exc, "broker_code", None) == "session_closed":
                    state.notes.append(f"the broker ended the session: {exc.message}")
                    state.stop.set()
                    return
                if not warned:
                    self.out.warn(f"heartbeat failed ({exc.message}); the session continues")
                    warned = True
                continue
            warned = False
            if summary.status != "active":
                state.notes.append(f"the broker ended the session ({summary.end_reason or summary.status})")
                state.stop.set()
                return

    async def _expiry(self, opened: SessionOpened, state: _State) -> None:
        from datetime import UTC, datetime

        delay = (opened.expires_at - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(max(0.0, delay))
        state.notes.append(
            f"the session reached its end time ({opened.expires_at.isoformat(timespec='seconds')})"
        )
        state.stop.set()

    # -- the way out
    def _end_unspooled(self, opened: SessionOpened) -> None:
        """The spool could not be set up (nothing recorded yet): end the session directly."""
        try:
            with contextlib.suppress(NotFound):
                self.client.end_session(opened.session_id)
        except PcigateError as exc:
            self.out.warn(
                f"could not end session {opened.session_id} ({exc.message}); "
                "the broker revokes its credentials when the heartbeats stop"
            )

    def _finish(self, opened: SessionOpened, recorder: Any, *, interrupted: bool) -> None:
        sid = opened.session_id
        entry = spool.SpoolEntry(
            session_id=sid, broker=self.settings.broker_url, created_at=opened.started_at, end_owed=True
        )
        if recorder is not None:
            try:
                entry = entry.model_copy(
                    update={"sha256": recorder.close("interrupted" if interrupted else "client")}
                )
            except Exception as exc:
                self.out.warn(f"could not close the recording: {exc}")
        try:
            spool.write_entry(entry)
        except OSError as exc:  # a full disk must not skip the session end below
            self.out.warn(f"could not save session {sid} in the spool: {exc.strerror or exc}")
        try:
            result, receipt = spool.settle(self.client, entry, progress=self.out.progress)
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP while ending: what is left stays in the spool
            self.out.warn(f"interrupted: session {sid} is kept in the spool")
            self.out.info("the next pcigate command or `pcigate sessions sync` ends it and uploads its "
                          "recording")
            raise
        except OSError as exc:  # raised after the session end (spool.settle ends it first)
            self.out.warn(f"session {sid} ended, but the spool failed: {exc.strerror or exc}")
            return
        except PcigateError as exc:
            where = spool.recording_path(sid, create=False)
            self.out.warn(
                f"{exc.message}; session {sid} "
                + ("end and recording kept" if entry.end_owed else "recording kept")
                + f" in {where.parent}"
            )
            self.out.info("it will be uploaded by the next pcigate command or `pcigate sessions sync`")
            return
        if result.kept:
            self.out.warn(
                f"session {sid} ended; the broker refused the recording ({result.error}); "
                f"kept in {spool.recording_path(sid, create=False)}"
            )
            raise RecordingError(f"the recording of session {sid} was refused: {result.error}")
        if receipt is not None:
            self.out.info(f"session {sid} ended; recording uploaded ({receipt.events} events)")
        else:
            self.out.info(f"session {sid} ended")
        if result.error:  # e.g. OpenBao could not revoke the lease yet (the broker retries)
            self.out.warn(f"session {sid}: {result.error}")
