"""Multi-process tunnel: N worker processes accept on one loopback port (``SO_REUSEPORT``).

``PgTunnel(..., workers=N)`` with N > 1 makes N listening sockets bound to the same port and starts N
``python -m pcigate.tunnel.workers`` processes, handing each its socket (an inherited file descriptor) and its
configuration — the upstream credentials and the local secret included — as one JSON line on its stdin (never
argv or the environment). The kernel spreads new connections over the workers; each runs an ordinary
single-process :class:`~pcigate.tunnel.pg.PgTunnel` on its socket, so the relay and the statement tracking
are the same code.

Recording: each worker stamps its events with the session recorder's clock (``t0``; ``CLOCK_MONOTONIC`` is
system-wide) and appends them, in batches and unchained, to a private 0600 part file next to the recording
(``<recording>.part<i>``, ``marshal`` batches). At ``close()`` the parent reads the parts, merges them in time
order and queues them into the session's :class:`~pcigate.recording.RecordingWriter`, which chains them like
any other event, so the session still has one valid hash-chained recording. (Until then the events live only
in the part files: a crash of the CLI leaves them there unmerged.)

Cancel requests: the BackendKeyData pid handed to a client is ``k * N + i`` for worker i. A CancelRequest
that lands on another worker is passed as a ``cancel pid secret`` line to the parent, which writes it to
worker ``pid % N``'s stdin; that worker looks the key up and forwards it upstream as usual.

Connection numbers stay unique (worker i numbers i+1, i+1+N, ...); ``stats`` and ``errors`` are summed
from the workers' final reports when ``close()`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import marshal
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pcigate.errors import PcigateError, PortInUse, RecordingError

if TYPE_CHECKING:
    from pcigate.tunnel.pg import PgTunnel

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class PartRecorder:
    """A worker's recorder: events are stamped here (same clock as the session recorder) and written in
    unchained ``marshal`` batches by a background thread; the parent chains them when merging."""

    def __init__(self, path: Path, t0: float, interval: float = 0.1) -> None:
        self.path = path
        self._t0 = t0
        self._last_t = 0.0
        self._q: deque[tuple[float, str | None, Any]] = deque()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="recording-part", daemon=True)
        self._thread.start()

    def _now(self) -> float:
        t = round(time.monotonic() - self._t0, 6)
        if t < self._last_t:
            t = self._last_t
        self._last_t = t
        return t

    def event(self, e: str, **fields: object) -> None:
        self._q.append((self._now(), e, fields))

    def stmt(self, c: int, sql: str, truncated: bool, proto: str, params: int | None, ms: float,
             rows: int | None, tag: str | None, sqlstate: str | None, error: str | None) -> None:
        self._q.append((self._now(), None,
                        (c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error)))

    def _drain(self) -> None:
        with self._lock:
            q = self._q
            batch = [q.popleft() for _ in range(len(q))]
            if batch:
                data = memoryview(marshal.dumps(batch))
                while data:
                    data = data[os.write(self._fd, data):]

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._drain()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()
        os.fsync(self._fd)
        os.close(self._fd)


def read_part(path: Path) -> list[tuple[float, str | None, Any]]:
    out: list[tuple[float, str | None, Any]] = []
    with open(path, "rb") as fh:
        while True:
            try:
                # our own worker's 0600 file (O_EXCL) in the recording's 0700 directory
                batch = marshal.load(fh)  # noqa: S302
            except EOFError:
                return out
            out.extend(batch)


class _Worker:
    def __init__(self, index: int, proc: subprocess.Popen[bytes], part: Path | None) -> None:
        self.index = index
        self.proc = proc
        self.part = part
        self.ready = threading.Event()
        self.report: dict[str, Any] | None = None
        self.stdin_lock = threading.Lock()
        self.reader: threading.Thread | None = None

    def send(self, line: str) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            return
        with self.stdin_lock, contextlib.suppress(OSError, ValueError):
            stdin.write(line.encode() + b"\n")
            stdin.flush()


class WorkerPool:
    """The parent side: sockets, worker processes, cancel routing, the merge at close."""

    def __init__(self, tunnel: PgTunnel, host: str) -> None:
        self.tunnel = tunnel
        self.host = host
        self.workers: list[_Worker] = []

    async def start(self) -> int:
        t = self.tunnel
        n = t.workers
        socks: list[socket.socket] = []
        port = t.listen_port
        try:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((self.host, port))
                port = int(s.getsockname()[1])
                s.listen(512)
        except OSError as e:
            for s in socks:
                s.close()
            raise PortInUse(f"cannot listen on {self.host}:{t.listen_port}: {e.strerror or e}",
                            hint="choose another port with --port, or 0 for any") from None
        rec = t.recorder
        try:
            for i, s in enumerate(socks):
                part = None
                if rec is not None:
                    part = rec.path.with_name(f"{rec.path.name}.part{i}")
                    part.unlink(missing_ok=True)
                self.workers.append(self._spawn(i, s, part, rec.t0 if rec is not None else 0.0))
            ok = await asyncio.to_thread(self._wait_ready)
            if not ok:
                raise PcigateError("the tunnel's worker processes did not start")
        except BaseException:
            await self.close()
            raise
        finally:
            for s in socks:
                s.close()  # the workers hold their own copies
        return port

    def _spawn(self, i: int, sock: socket.socket, part: Path | None, t0: float) -> _Worker:
        t = self.tunnel
        u = t.upstream
        cfg = {"index": i, "workers": t.workers, "fd": sock.fileno(), "secret": t._local_secret,
               "creds": {"host": u.host, "port": u.port, "database": u.database, "username": u.username,
                         "password": u.password, "sslmode": u.sslmode},
               "part": str(part) if part is not None else None, "t0": t0}
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen([sys.executable, "-m", "pcigate.tunnel.workers"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, pass_fds=(sock.fileno(),), env=env, close_fds=True)
        w = _Worker(i, proc, part)
        w.send(json.dumps(cfg))  # credentials travel over the pipe only
        w.reader = threading.Thread(target=self._read, args=(w,), name=f"tunnel-worker-{i}", daemon=True)
        w.reader.start()
        return w

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        for w in self.workers:
            if not w.ready.wait(max(0.0, deadline - time.monotonic())) or w.report is not None:
                return False
        return True

    def _read(self, w: _Worker) -> None:
        out: IO[bytes] | None = w.proc.stdout
        assert out is not None
        for raw in out:
            line = raw.decode(errors="replace").strip()
            if line == "ready":
                w.ready.set()
            elif line.startswith("cancel "):
                with contextlib.suppress(ValueError, IndexError):
                    _, pid, secret = line.split()
                    owner = self.workers[int(pid) % len(self.workers)]
                    owner.send(f"cancel {int(pid)} {int(secret)}")
            elif line.startswith("done "):
                with contextlib.suppress(ValueError):
                    w.report = json.loads(line[5:])
        w.ready.set()  # EOF: never wait for it again

    async def close(self) -> None:
        for w in self.workers:
            w.send("stop")
        await asyncio.to_thread(self._join)
        t = self.tunnel
        merged: list[tuple[float, int, int, str | None, Any]] = []
        for w in self.workers:
            rep = w.report
            if rep is None:
                t._error(f"tunnel worker {w.index} ended without a report (exit {w.proc.returncode})")
            else:
                for k, v in rep.get("stats", {}).items():
                    if isinstance(v, int) and hasattr(t.stats, k):
                        setattr(t.stats, k, getattr(t.stats, k) + v)
                for msg in rep.get("errors", []):
                    t._error(str(msg))
                t.stats.errors -= len(rep.get("errors", []))  # counted once, in the worker's stats
            if w.part is not None and w.part.exists():
                try:
                    for seq, (ts, e, payload) in enumerate(read_part(w.part)):
                        merged.append((ts, w.index, seq, e, payload))
                except (OSError, ValueError, EOFError, TypeError) as exc:
                    t._error(f"tunnel worker {w.index}: unreadable recording part: {exc}")
                w.part.unlink(missing_ok=True)
        rec = t.recorder
        if rec is not None and merged:
            merged.sort(key=lambda x: (x[0], x[1], x[2]))
            with contextlib.suppress(RecordingError):
                rec.extend((ts, e, payload) for ts, _, _, e, payload in merged)
        self.workers = []

    def _join(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            if w.reader is not None:
                w.reader.join(5)
            if w.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    w.proc.stdin.close()


# --------------------------------------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------------------------------------


def _worker_main() -> int:
    cfg = json.loads(sys.stdin.readline())
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(_worker(cfg))


async def _worker(cfg: dict[str, Any]) -> int:
    from pcigate.models import DatabaseCredentials
    from pcigate.tunnel.pg import PgTunnel
    from pcigate.wire.pg import CancelRequest

    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=int(cfg["fd"]))
    tunnel = PgTunnel(DatabaseCredentials(**cfg["creds"]), str(cfg["secret"]), None)
    tunnel._widx = int(cfg["index"])
    tunnel._wn = int(cfg["workers"])
    part = PartRecorder(Path(cfg["part"]), float(cfg["t0"])) if cfg.get("part") else None
    tunnel._rec = part
    out_lock = threading.Lock()

    def emit(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    tunnel._route_cancel = lambda pid, secret: emit(f"cancel {pid} {secret}")
    stop = asyncio.Event()

    def commands() -> None:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["cancel"] and len(words) == 3:
                req = CancelRequest(int(words[1]), int(words[2]))
                loop.call_soon_threadsafe(tunnel._forward_cancel, req)
            elif words[:1] == ["stop"]:
                break
        loop.call_soon_threadsafe(stop.set)

    await tunnel._serve(sock)
    threading.Thread(target=commands, name="tunnel-worker-commands", daemon=True).start()
    emit("ready")
    await stop.wait()
    await tunnel.close()
    if part is not None:
        part.close()
    s = tunnel.stats
    emit("done " + json.dumps({"stats": {"connections": s.connections, "statements": s.statements,
                                         "bytes_up": s.bytes_up, "bytes_down": s.bytes_down,
                                         "errors": s.errors}, "errors": tunnel.errors}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main())
