"""Runs the system ``ssh`` in the data path of a terminal session (asyncio adapter).

Interactive (our stdin is a terminal): ``ssh -tt`` runs on a pseudo-terminal we own, as its controlling
terminal. Our terminal goes to raw mode; keystrokes go to the pty, the pty's output goes to the screen, and
both are recorded as asciicast ``i``/``o`` events; a window resize (SIGWINCH) is passed on to the pty (the
kernel tells ssh, ssh tells the server) and recorded as an ``r`` event.

Not interactive (stdin is a pipe or a file): ``ssh -T`` reads our stdin itself; its stdout and stderr come
through pipes to ours and are recorded as ``o`` events (the input is not recorded in this mode).

Card data is masked (:class:`~pcigate.termmask.StreamMasker`) before it reaches the screen or the recording.
The screen is shown a held-back digit run after a short pause, so typing stays visible; the recording gets
a run only when it ends, so a number typed or printed piecemeal is never recorded in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import tty
from collections.abc import Callable
from typing import Any

from pcigate.echogate import EchoGate
from pcigate.masking import Masker
from pcigate.session import end_child, exit_status
from pcigate.termmask import StreamMasker

READ_SIZE = 65536
SCREEN_HOLD_SECONDS = 0.05  # a held-back digit run reaches the screen after this pause at the latest
DRAIN_SECONDS = 2.0  # after ssh exits: how long its last output may take to arrive
STOP_GRACE = 5.0


def terminal_size(fd: int) -> tuple[int, int]:
    """(columns, rows) of the terminal on ``fd``; 80x24 when it is not one."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return 80, 24
    return (cols or 80), (rows or 24)


def _set_size(fd: int, cols: int, rows: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _controlling_tty() -> None:  # pragma: no cover - runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data``; False when ``fd`` is closed or broken (the rest is dropped)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        except OSError:
            return False
        view = view[n:]
    return True


class TerminalRelay:
    """One ssh process and its streams. ``recorder``: a RecordingWriter of kind "ssh" (or None)."""

    def __init__(self, argv: list[str], env: dict[str, str], recorder: Any, masker: Masker | None, *,
                 interactive: bool, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2) -> None:
        self.argv = argv
        self.env = env
        self.rec = recorder
        self.masker = masker
        self.interactive = interactive
        self.stdin_fd, self.stdout_fd, self.stderr_fd = stdin_fd, stdout_fd, stderr_fd
        self._readers: list[int] = []
        self._open = 0
        self._eof: asyncio.Event | None = None
        self._flush_at: dict[int, asyncio.TimerHandle] = {}  # per output stream: stdout's and stderr's own
        self._gate: EchoGate | None = None  # keys for the recording, as far as they were echoed

    # -- recording
    def _cast(self, code: str, data: object) -> None:
        if self.rec is not None and not self.rec.closed:
            self.rec.cast(code, data)

    # -- the run
    async def run(self, stop: asyncio.Event, on_stop: Callable[[], None] | None = None) -> int:
        loop = asyncio.get_running_loop()
        self._eof = asyncio.Event()
        saved = None
        if self.interactive:
            master, slave = pty.openpty()
            cols, rows = terminal_size(self.stdin_fd)
            _set_size(master, cols, rows)
            try:
                proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave, env=self.env,
                                        start_new_session=True, preexec_fn=_controlling_tty, close_fds=True)
            finally:
                os.close(slave)
            outputs = [(master, self.stdout_fd)]
            with contextlib.suppress(termios.error):
                saved = termios.tcgetattr(self.stdin_fd)
                tty.setraw(self.stdin_fd)
        else:
            proc = subprocess.Popen(self.argv, stdin=self.stdin_fd, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.env, start_new_session=True,
                                    close_fds=True)
            assert proc.stdout is not None
            assert proc.stderr is not None
            outputs = [(proc.stdout.fileno(), self.stdout_fd), (proc.stderr.fileno(), self.stderr_fd)]
            master = -1
        maskers = {src: StreamMasker(self.masker) for src, _ in outputs}
        typed = StreamMasker(self.masker)
        self._gate = EchoGate() if self.interactive else None
        try:
            for src, dst in outputs:
                self._watch(loop, src, dst, maskers[src])
            if self.interactive:
                self._watch_input(loop, master, typed)
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(signal.SIGWINCH, self._resized, master)
            waiter: asyncio.Future[Any] = loop.run_in_executor(None, proc.wait)
            stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            await asyncio.wait({waiter, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                if on_stop is not None:
                    on_stop()
                await end_child(proc, waiter, STOP_GRACE)
            stopped.cancel()
            await waiter
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._eof.wait(), DRAIN_SECONDS)
        finally:
            if saved is not None:
                with contextlib.suppress(termios.error):
                    termios.tcsetattr(self.stdin_fd, termios.TCSAFLUSH, saved)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGWINCH)
            for fd in self._readers:
                loop.remove_reader(fd)
            for timer in self._flush_at.values():
                timer.cancel()
            for src, dst in outputs:
                released = maskers[src].flush()
                self._show(dst, maskers[src].screen(released))
                self._output(released)
            self._keys(typed.flush(), loop.time())
            if self._gate is not None:
                self._events(self._gate.flush())
            if master >= 0:
                os.close(master)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        status = exit_status(proc.returncode)
        self._cast("x", {"e": "exit", "status": status})
        return status

    # -- streams
    def _output(self, text: str) -> None:
        """Released (masked) output to the recording; the echo gate sees it too."""
        if text:
            self._cast("o", text)
        if self._gate is not None:
            self._events(self._gate.shown(text, asyncio.get_running_loop().time()))

    def _keys(self, text: str, now: float) -> None:
        """Typed keys (masked) go to the recording through the echo gate: not what a prompt did not echo."""
        if self._gate is not None:
            self._events(self._gate.typed(text, now))

    def _events(self, events: list[tuple[str, str]]) -> None:
        for code, data in events:
            self._cast(code, data)

    def _show(self, fd: int, text: str) -> None:
        if text:
            _write_all(fd, text.encode("utf-8", "replace"))  # our terminal may be gone: the recording goes on

    def _watch(self, loop: asyncio.AbstractEventLoop, src: int, dst: int, masker: StreamMasker) -> None:
        self._open += 1

        def readable() -> None:
            try:
                data = os.read(src, READ_SIZE)
            except OSError:  # EIO: the pty's other side is closed
                data = b""
            if not data:
                loop.remove_reader(src)
                self._readers.remove(src)
                self._open -= 1
                if self._open == 0 and self._eof is not None:
                    self._eof.set()
                return
            released = masker.feed_bytes(data)
            self._show(dst, masker.screen(released))
            self._output(released)
            if masker.pending:
                if (timer := self._flush_at.get(src)) is not None:
                    timer.cancel()
                self._flush_at[src] = loop.call_later(
                    SCREEN_HOLD_SECONDS, lambda: self._show(dst, masker.peek()))

        loop.add_reader(src, readable)
        self._readers.append(src)

    def _watch_input(self, loop: asyncio.AbstractEventLoop, master: int, typed: StreamMasker) -> None:
        src = self.stdin_fd

        def readable() -> None:
            try:
                data = os.read(src, READ_SIZE)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(src)
                self._readers.remove(src)
                return
            if _write_all(master, data):
                self._keys(typed.feed_bytes(data), loop.time())

        loop.add_reader(src, readable)
        self._readers.append(src)

    def _resized(self, master: int) -> None:
        cols, rows = terminal_size(self.stdin_fd)
        _set_size(master, cols, rows)
        self._cast("r", f"{cols}x{rows}")
