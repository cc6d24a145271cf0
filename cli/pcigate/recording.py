"""Session recordings: the format, a writer with group-commit fsync, and a streaming verifier.

Format (docs/architecture.md, "Recording format"): UTF-8 newline-delimited JSON. Line 1 is the header
``{"pcigate_recording": 1, "session_id", "user", "target", "level", "lease_id", "policy_digest",
"started_at", "kind", "h"}``; every further line is an event ``{"t", "e", ..., "h"}``; the last one is
``{"e": "end", "reason"}``. ``h_n = sha256(h_{n-1} || canonical(event_n without "h"))`` (hex; ``h_{-1}`` is
the empty string) and each line is ``canonical(event with "h")``, where ``canonical`` is
``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.

Editing, removing, reordering or truncating lines breaks the chain at the first affected line, which
:func:`verify_recording` reports (1-based). Non-canonical lines (even a re-spaced but equal JSON object) are
refused too, so every byte of the file is covered.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pcigate.errors import RecordingError

FORMAT_VERSION = 1
SQL_CAP = 64 * 1024  # characters of SQL kept per statement event
HEADER_FIELDS = ("session_id", "user", "target", "level", "lease_id", "policy_digest", "started_at", "kind")

_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# "h" sorts after "e" and before "t", both always present, so in a canonical line it is always followed
# by a comma: one encode with a placeholder gives both the hashed form and the written line.
_PLACEHOLDER = "0" * 64
_PH_ITEM = f'"h":"{_PLACEHOLDER}",'


def canonical(obj: object) -> bytes:
    return _encoder.encode(obj).encode()


def _chain(prev: str, canon: bytes) -> str:
    return hashlib.sha256(prev.encode() + canon).hexdigest()


def rfc3339(dt: datetime) -> str:
    if dt.tzinfo is None:
        raise ValueError("started_at must be timezone-aware")
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def cap_sql(sql: str, cap: int = SQL_CAP) -> tuple[str, bool]:
    """Cap SQL text for a stmt event: (text, truncated)."""
    if len(sql) <= cap:
        return sql, False
    return sql[:cap], True


@dataclass(frozen=True)
class RecordingHeader:
    session_id: str
    user: str
    target: str
    level: str
    lease_id: str
    policy_digest: str
    started_at: datetime  # aware UTC
    kind: str = "pg"

    def to_json(self) -> dict[str, object]:
        return {
            "pcigate_recording": FORMAT_VERSION,
            "session_id": self.session_id,
            "user": self.user,
            "target": self.target,
            "level": self.level,
            "lease_id": self.lease_id,
            "policy_digest": self.policy_digest,
            "started_at": rfc3339(self.started_at),
            "kind": self.kind,
        }


class RecordingWriter:
    """Appends hash-chained events to a new 0600 file.

    ``event()`` is cheap (one JSON encode + one sha256, then an in-memory append); a background thread
    writes the buffered lines and fsyncs at most every ``fsync_interval`` seconds (group commit), so a burst
    of statements is never throttled by the disk and the event loop never waits on ``fsync``. ``close()``
    appends the ``end`` event, writes, fsyncs and returns the file's SHA-256. Not thread-safe for concurrent
    ``event()`` callers (one event loop owns the writer).
    """

    def __init__(self, path: Path, header: RecordingHeader, *, fsync_interval: float = 0.1) -> None:
        self.path = Path(path)
        self.header = header
        self.events = 0
        self._interval = fsync_interval
        hdr = header.to_json()  # validates started_at before anything touches the disk
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                               0o600)
        except FileExistsError as e:
            raise RecordingError(f"recording {self.path} already exists") from e
        except OSError as e:
            raise RecordingError(f"cannot create recording {self.path}: {e.strerror}") from e
        self._digest = hashlib.sha256()  # whole file, in write order
        canon = canonical(hdr)
        self._h = _chain("", canon)
        hdr["h"] = self._h
        now_wall = datetime.now(UTC)
        self._t0 = time.monotonic() - max(0.0, (now_wall - header.started_at).total_seconds())
        self._last_t = 0.0
        self._buf: list[bytes] = []
        self._cond = threading.Condition()
        self._wlock = threading.Lock()  # keeps the swap-and-write of the thread and flush() in order
        self._closing = False
        self._closed = False
        self._sha: str | None = None
        self._error: OSError | None = None
        self._append(canonical(hdr) + b"\n")
        self._thread = threading.Thread(target=self._run, name=f"recording-{header.session_id}", daemon=True)
        self._thread.start()

    # -- events ------------------------------------------------------------------------------------------

    def event(self, e: str, **fields: object) -> None:
        if self._closing:
            raise RecordingError("recording is closed")
        t = round(time.monotonic() - self._t0, 6)
        if t < self._last_t:
            t = self._last_t
        self._last_t = t
        ev: dict[str, object] = {"t": t, "e": e}
        ev.update(fields)
        ev["h"] = _PLACEHOLDER
        line = _encoder.encode(ev)
        if line.count(_PH_ITEM) == 1:  # always, unless a nested value holds the same item
            i = line.find(_PH_ITEM)
            canon = (line[:i] + line[i + len(_PH_ITEM) :]).encode()
            h = _chain(self._h, canon)
            out = (line[: i + 5] + h + line[i + 5 + 64 :]).encode()
        else:
            del ev["h"]
            canon = canonical(ev)
            h = _chain(self._h, canon)
            ev["h"] = h
            out = canonical(ev)
        self._h = h
        self.events += 1
        self._append(out + b"\n")

    def _append(self, line: bytes) -> None:
        self._digest.update(line)
        with self._cond:
            self._buf.append(line)
            if len(self._buf) == 1:
                self._cond.notify()

    # -- background group commit -------------------------------------------------------------------------

    def _run(self) -> None:
        last_sync = 0.0
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return  # close() writes what is left itself
                wait = last_sync + self._interval - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    if self._closing:
                        return
            with self._wlock:
                with self._cond:
                    chunk = b"".join(self._buf)
                    self._buf.clear()
                try:
                    if chunk:
                        self._write(chunk)
                        os.fsync(self._fd)
                except OSError as e:
                    self._error = e
                    return
            last_sync = time.monotonic()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def flush(self) -> None:
        """Write and fsync everything buffered now (tests, crash-safety points)."""
        with self._wlock:
            with self._cond:
                chunk = b"".join(self._buf)
                self._buf.clear()
            if chunk:
                self._write(chunk)
            os.fsync(self._fd)

    def close(self, reason: str = "client") -> str:
        if self._sha is not None:
            return self._sha
        self.event("end", reason=reason)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        try:
            if self._error is not None:
                raise RecordingError(f"cannot write recording {self.path}: {self._error.strerror}")
            chunk = b"".join(self._buf)
            self._buf.clear()
            try:
                self._write(chunk)
                os.fsync(self._fd)
            except OSError as e:
                raise RecordingError(f"cannot write recording {self.path}: {e.strerror}") from e
        finally:
            os.close(self._fd)
            self._closed = True
        self._sha = self._digest.hexdigest()
        return self._sha

    @property
    def closed(self) -> bool:
        return self._closed


# --------------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingCheck:
    ok: bool
    events: int  # verified event lines after the header (the end event included)
    header: dict[str, object] | None
    error: str | None
    line: int | None  # 1-based first bad line
    sha256: str  # sha256 hex of all bytes fed
    size: int
    truncated: bool = field(default=False)  # the chain is intact but the file stops early (crash, cut)


class RecordingVerifier:
    """Streaming verifier: ``feed()`` chunks in any size, then ``finish()``. Memory is bounded by
    ``max_line``. The first error sticks; later bytes are only hashed."""

    def __init__(self, max_line: int = 1 << 20) -> None:
        self.max_line = max_line
        self._sha = hashlib.sha256()
        self._size = 0
        self._partial = bytearray()
        self._line = 0  # lines completed
        self._h = ""
        self._header: dict[str, object] | None = None
        self._events = 0
        self._last_t = 0.0
        self._ended = False
        self._error: str | None = None
        self._error_line: int | None = None

    def feed(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self._size += len(chunk)
        if self._error is not None:
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                rest = len(chunk) - start
                if len(self._partial) + rest > self.max_line:
                    self._fail(self._line + 1, f"line longer than {self.max_line} bytes")
                    return
                self._partial += chunk[start:]
                return
            if self._partial:
                if len(self._partial) + nl - start > self.max_line:
                    self._fail(self._line + 1, f"line longer than {self.max_line} bytes")
                    return
                self._partial += chunk[start:nl]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = chunk[start:nl]
                if len(line) > self.max_line:
                    self._fail(self._line + 1, f"line longer than {self.max_line} bytes")
                    return
            self._line += 1
            self._check(line)
            if self._error is not None:
                return
            start = nl + 1

    def _fail(self, line: int, msg: str) -> None:
        if self._error is None:
            self._error = msg
            self._error_line = line

    def _check(self, raw: bytes) -> None:
        n = self._line
        if self._ended:
            self._fail(n, "data after the end event")
            return
        try:
            obj = json.loads(raw)
        except ValueError:  # UnicodeDecodeError is a ValueError
            self._fail(n, "not valid UTF-8 JSON")
            return
        if not isinstance(obj, dict):
            self._fail(n, "not a JSON object")
            return
        h = obj.pop("h", None)
        if not isinstance(h, str):
            self._fail(n, 'missing "h"')
            return
        try:
            canon = canonical(obj)
        except ValueError:
            self._fail(n, "not canonical JSON")
            return
        expect = _chain(self._h, canon)
        if h != expect:
            self._fail(n, "digest chain broken (line edited, removed, reordered or inserted)")
            return
        obj["h"] = h
        if canonical(obj) != raw:
            self._fail(n, "line is not in canonical form")
            return
        del obj["h"]
        if n == 1:
            if obj.get("pcigate_recording") != FORMAT_VERSION:
                self._fail(n, "not a pcigate recording header (version 1)")
                return
            for k in HEADER_FIELDS:
                if not isinstance(obj.get(k), str):
                    self._fail(n, f"header field {k!r} missing")
                    return
            try:
                started = datetime.fromisoformat(str(obj["started_at"]).replace("Z", "+00:00"))
            except ValueError:
                self._fail(n, "header started_at is not RFC 3339")
                return
            if started.tzinfo is None:
                self._fail(n, "header started_at has no timezone")
                return
            self._header = obj
        else:
            t = obj.get("t")
            e = obj.get("e")
            if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
                self._fail(n, 'event "t" missing or invalid')
                return
            if t < self._last_t:
                self._fail(n, 'event "t" goes backwards')
                return
            if not isinstance(e, str) or not e:
                self._fail(n, 'event "e" missing')
                return
            if "pcigate_recording" in obj:
                self._fail(n, "second header")
                return
            self._last_t = float(t)
            self._events += 1
            if e == "end":
                self._ended = True
        self._h = h

    def finish(self) -> RecordingCheck:
        sha = self._sha.hexdigest()
        truncated = False
        if self._error is None:
            if self._partial:
                self._fail(self._line + 1, "truncated: last line is incomplete")
                truncated = True
            elif self._line == 0:
                self._fail(1, "empty recording")
            elif not self._ended:
                self._fail(self._line + 1, "truncated: no end event")
                truncated = True
        return RecordingCheck(
            ok=self._error is None,
            events=self._events,
            header=self._header,
            error=self._error,
            line=self._error_line,
            sha256=sha,
            size=self._size,
            truncated=truncated,
        )


def verify_recording(data: bytes) -> RecordingCheck:
    v = RecordingVerifier(max_line=max(1 << 20, len(data)))
    v.feed(data)
    return v.finish()
