"""``pcigate replay SESSION``: the adapter (download, verify, terminal keys, sleeping, printing) around the
pure :mod:`pcigate.replay`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from pcigate.commands._common import JsonOpt, broker, output

if TYPE_CHECKING:
    from pcigate.output import Output
    from pcigate.recording import RecordingCheck
    from pcigate.replay import Player

CHUNK = 1 << 20
KEYS_HELP = "keys: space pause/resume, . next frame (paused), ←/→ seek 5 s, +/- speed ×2/÷2, q quit"

Lines = Callable[[], Iterator[bytes]]


def replay(
    ctx: typer.Context,
    session_id: Annotated[
        str | None, typer.Argument(metavar="SESSION", help="The session id (optional with --file).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", metavar="PATH",
                     help="Replay this local .rec file (an evidence pack's, the spool's) instead of "
                          "downloading the session's recording from the broker."),
    ] = None,
    speed: Annotated[
        float, typer.Option("--speed", help="Terminal replay speed: 2 plays twice as fast.")
    ] = 1.0,
    idle_limit: Annotated[
        float | None,
        typer.Option("--idle-limit", min=0, metavar="SECONDS",
                     help="Cap every pause of a terminal replay at this many seconds "
                          "(default: the recording's idle_time_limit, else none)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replay a recording that fails verification (with a warning).")
    ] = False,
    cast: Annotated[
        Path | None,
        typer.Option("--cast", metavar="OUT.cast",
                     help="Write a terminal recording as an asciicast v2 file (asciinema players) instead."),
    ] = None,
    json_flag: JsonOpt = False,
) -> None:
    """Replay a recorded session after verifying its hash chain.

    A terminal (ssh) session plays at its recorded pace; on a terminal the keys are space (pause/resume),
    . (next frame while paused), ←/→ (seek 5 s), + and - (speed) and q (quit). A database session prints its
    timeline of statements (offset, connection, duration, result, BLOCKED / MASKED marks, SQL) and a
    summary. --json prints the session as one JSON document instead. A recording that fails verification
    is refused (exit 13) unless --force is given.
    """
    from pcigate.errors import UsageError
    from pcigate.replay import recording_kind, split_header

    if not speed > 0:
        raise UsageError("--speed must be greater than 0")
    if session_id is None and file is None:
        raise UsageError("give a SESSION id, or a recording with --file PATH")
    out = output(ctx, json_flag)
    with ExitStack() as stack:
        if file is not None:
            fh, check, label = _open_local(stack, file)
        else:
            assert session_id is not None
            fh, check, label = _download(ctx, stack, session_id)
        _judge(check, label, force, out)
        lines = _lines(fh)
        header, _ = split_header(lines())
        kind = recording_kind(header)
        if file is not None and session_id is not None and header.get("session_id") != session_id:
            raise UsageError(f"{file} holds the recording of session {header.get('session_id')}, "
                             f"not {session_id}")
        if cast is not None:
            if kind != "ssh":
                raise UsageError("--cast needs a terminal (ssh) recording; this is a database session")
            _write_cast(lines, cast, out)
        elif out.json_mode:
            _print_json(header, kind, lines)
        elif kind == "pg":
            _print_timeline(lines)
        else:
            _play(header, lines, speed, idle_limit, out)


# -- getting and checking the recording ----------------------------------------------------------------------


def _open_local(stack: ExitStack, path: Path) -> tuple[IO[bytes], RecordingCheck, str]:
    from pcigate.errors import UsageError
    from pcigate.recording import RecordingVerifier

    try:
        fh = stack.enter_context(path.open("rb"))
        verifier = RecordingVerifier()
        while chunk := fh.read(CHUNK):
            verifier.feed(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return fh, verifier.finish(), str(path)


def _download(ctx: typer.Context, stack: ExitStack, session_id: str) -> tuple[IO[bytes], RecordingCheck, str]:
    """The session's recording from the broker, streamed into an anonymous 0600 temporary file (gone when
    closed) and verified on the way."""
    import tempfile

    from pcigate.recording import RecordingVerifier

    fh = stack.enter_context(tempfile.TemporaryFile(prefix="pcigate-replay-"))  # noqa: SIM115 (the stack closes it)
    verifier = RecordingVerifier()

    def sink(chunk: bytes) -> None:
        fh.write(chunk)
        verifier.feed(chunk)

    with broker(ctx) as client:
        expected = client.get_session(session_id).recording_sha256
        client.download_recording(session_id, sink)
    fh.flush()
    check = verifier.finish()
    import dataclasses
    import hmac

    if check.ok and expected and not hmac.compare_digest(check.sha256, expected):
        # a whole chain can be rebuilt by whoever can write the store: the digest the upload was checked
        # against (and the audit log holds) is the anchor
        error = f"its SHA-256 is not the one the broker recorded at upload ({expected})"
        check = dataclasses.replace(check, ok=False, line=0, error=error)
    return fh, check, f"of session {session_id}"


def _judge(check: RecordingCheck, label: str, force: bool, out: Output) -> None:
    from pcigate.errors import RecordingError

    if check.ok:
        return
    where = f" at line {check.line}" if check.line else ""
    message = f"recording {label} fails verification{where}: {check.error}"
    if not force:
        raise RecordingError(message, hint="--force replays it anyway")
    out.warn(f"{message}; replaying it anyway (--force)")


def _lines(fh: IO[bytes]) -> Lines:
    """A factory of iterators over the recording's lines, each from the start (one at a time)."""

    def lines() -> Iterator[bytes]:
        fh.seek(0)
        yield from fh

    return lines


# -- printing ------------------------------------------------------------------------------------------------


@contextmanager
def _stdout_closed_ok() -> Iterator[None]:
    """A reader that stops early (``| head``) ends the output quietly."""
    import os

    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        os.close(devnull)


def _write(text: str) -> None:
    if text:
        sys.stdout.buffer.write(text.encode("utf-8", "replace"))
        sys.stdout.buffer.flush()


def _write_all(pieces: Iterable[str], end: str = "") -> None:
    with _stdout_closed_ok():
        for piece in pieces:
            sys.stdout.buffer.write((piece + end).encode("utf-8", "replace"))
        sys.stdout.buffer.flush()


def _print_json(header: dict[str, object], kind: str, lines: Lines) -> None:
    from pcigate.replay import pg_json, split_header, ssh_json

    _, events = split_header(lines())
    _write_all(pg_json(header, events) if kind == "pg" else ssh_json(header, events))


def _print_timeline(lines: Lines) -> None:
    import shutil

    from pcigate.replay import PgSummary, pg_timeline, split_header

    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    _, events = split_header(lines())
    _write_all(pg_timeline(events, PgSummary(), width), end="\n")


def _write_cast(lines: Lines, path: Path, out: Output) -> None:
    import os

    from pcigate.errors import RecordingError, UsageError
    from pcigate.recording import asciicast_lines

    tmp = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the output is session data
        try:
            with os.fdopen(fd, "wb") as w:
                for line in asciicast_lines(lines()):
                    w.write(line)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a line that is no JSON: only in a recording replayed with --force
        raise RecordingError(f"cannot convert the recording to asciicast: {exc}") from exc
    if out.json_mode:
        out.json({"cast": str(path)})
    else:
        out.info(f"wrote {path} (asciicast v2)")


# -- playing a terminal recording ---------------------------------------------------------------------------


class _Keys:
    """Key presses from a terminal in cbreak mode, decoded into player commands."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = b""

    def wait(self, timeout: float | None) -> list[str]:
        """Wait up to ``timeout`` seconds (None: until a key); the commands typed meanwhile."""
        import os
        import select

        from pcigate.replay import parse_keys

        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 64)
        if not data:
            return ["quit"]
        cmds, self._pending = parse_keys(self._pending + data)
        return cmds


@contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    """The terminal in cbreak mode (keys unbuffered, not echoed), restored however we leave."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        _write("\x1b[0m\x1b[?25h")  # the recorded program may have left colours on and the cursor hidden


def run_player(player: Player, write: Callable[[str], None], keys: _Keys | None,
               clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    """Play to the end (or "quit"): wait for the next frame or a key, print what is due, apply the keys."""
    last = clock()
    write(player.advance(0.0))
    while not player.done:
        delay = player.until_next()
        if keys is not None:
            cmds = keys.wait(delay)
        else:
            sleep(delay or 0.0)
            cmds = []
        now = clock()
        write(player.advance(now - last))
        last = now
        for cmd in cmds:
            if cmd == "quit":
                return
            write(player.command(cmd))


def _interactive() -> bool:
    try:
        import termios  # noqa: F401  (POSIX terminals only)
    except ImportError:
        return False
    return sys.stdin.isatty() and sys.stdout.isatty()


def _play(header: dict[str, object], lines: Lines, speed: float, idle_opt: float | None, out: Output) -> None:
    import time

    from pcigate.replay import Player, cast_events, idle_limit, split_header

    player = Player(lambda: cast_events(split_header(lines())[1]), speed=speed,
                    idle=idle_limit(idle_opt, header))
    if not _interactive():
        with _stdout_closed_ok():
            run_player(player, _write, None, time.monotonic, time.sleep)
        return
    _warn_size(header, out)
    out.info(KEYS_HELP)
    fd = sys.stdin.fileno()
    with _cbreak(fd):
        run_player(player, _write, _Keys(fd), time.monotonic, time.sleep)


def _warn_size(header: dict[str, object], out: Output) -> None:
    import shutil

    width, height = header.get("width"), header.get("height")
    if not isinstance(width, int) or not isinstance(height, int):
        return
    size = shutil.get_terminal_size()
    if size.columns < width or size.lines < height:
        out.warn(f"the session's terminal was {width}x{height}, this one is {size.columns}x{size.lines}: "
                 "lines may wrap")
