"""Session recordings: the format, a writer with group-commit fsync, and a streaming verifier.

Format (docs/architecture.md, "Recording format"): UTF-8 newline-delimited JSON. Line 1 is the header
``{"pcigate_recording": 1, "session_id", "user", "target", "level", "lease_id", "policy_digest",
"started_at", "kind", "h"}``; every further line is an event ``{"t", "e", ..., "h"}``; the last one is
``{"e": "end", "reason"}``. ``h_n = sha256(h_{n-1} || canonical(event_n without "h"))`` (hex; ``h_{-1}`` is
the empty string) and each line is ``canonical(event with "h")``, where ``canonical`` is
``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.

Terminal sessions (``kind = "ssh"``) use the asciicast v2 shapes: the header also carries asciicast's
``version`` (2), ``width``, ``height``, ``timestamp`` and ``env``, and every event is an array
``[t, code, data, h]`` with ``h_n = sha256(h_{n-1} || canonical([t, code, data]))``. Codes: ``o`` output,
``i`` input, ``r`` resize (``"COLSxROWS"``), ``m`` marker, and ``x`` for pcigate's own events (an object
``{"e": ...}``; the last line is ``[t, "x", {"e": "end", "reason"}, h]``). The fourth element makes the file
itself a stricter-than-asciicast document; :func:`asciicast_lines` gives the plain 3-element asciicast v2
file that asciinema's players take.

Editing, removing, reordering or truncating lines breaks the chain at the first affected line, which
:func:`verify_recording` reports (1-based). Non-canonical lines (even a re-spaced but equal JSON object) are
refused too, so every byte of the file is covered.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from pcigate.errors import RecordingError

_crec: ModuleType | None
try:  # stmt lines encoded and chained in the writer thread (cli/pcigate/_crec.c; tests/unit/test_crec.py)
    from pcigate import _crec
except ImportError:  # pragma: no cover - built by the install; the test suite fails without it
    _crec = None

FORMAT_VERSION = 1
SQL_CAP = 64 * 1024  # characters of SQL kept per statement event
WAKE_BYTES = 1 << 20  # queued terminal output that wakes the writer before its interval
MAX_BLOCKED = 1000  # blocked statements a verifier reports (the recording itself holds them all)
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
    # More header keys (ssh: asciicast's version/width/height/timestamp/env, the certificate's serial...).
    # They never replace a field above.
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            **self.extra,
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

    ``event()`` (and its fixed-shape twin :meth:`stmt`) stamps the time, encodes the event to its canonical
    line and extends the hash chain right away, on the caller's thread (~3 µs for a statement), and appends
    the line to a thread-safe deque. A background thread wakes at most every ``fsync_interval`` seconds, takes
    the queued lines, writes them and fsyncs (group commit), so neither a burst of statements nor the disk
    throttles the event loop.

    Why encode on the caller's side: the background thread then only joins bytes and makes system calls,
    which release the GIL. An earlier design that encoded in the background thread cost the tunnel ~30% of
    its pgbench rate, almost all of it GIL hand-offs between the two threads rather than the encoding
    itself (docs/performance.md).

    The exception is :meth:`stmt` of a database recording when the C module ``pcigate._crec`` is there
    (``deferred``): the caller queues only the statement's values, and whoever writes (the background
    thread, ``flush()``, ``close()``) encodes and chains them in C with the GIL released, in queue order,
    together with the other events of the recording, which are then queued unencoded too. The event loop
    then pays ~1 µs per statement instead of ~13 (docs/performance.md); the file is byte for byte the same.

    ``stmt_sink`` (deferred recordings only, else None) is the hot path of that: the queue's own ``append``,
    taking a raw statement ``(end, begin, c, sql, truncated, proto, params, rows, tag, sqlstate, error)``,
    ``end`` and ``begin`` read from ``time.perf_counter()``; the writer computes ``t`` and ``ms`` from them
    (both to the µs, halves up: :func:`_q`), so the caller does no arithmetic, no call and no checks
    (~1 µs less per statement on the tunnel's loop, docs/performance.md). Unlike :meth:`stmt` it neither
    raises after ``close()`` nor stops queuing after a write failure (the session is ended then anyway), so
    its caller must stop using it before ``close()`` (the tunnel is closed, on the loop's thread, before the
    recording is). A tuple the writer cannot use is left out and reported, like any unencodable event.
    Every deferred event's ``t`` is raised to the previous line's when smaller, so ``t`` never goes
    backwards in the file whatever the order of the two clocks' readings.

    ``flush()`` and ``close()`` write what is queued synchronously; ``close()`` appends the ``end`` event,
    writes, fsyncs and returns the file's SHA-256. Field values must be JSON-encodable (str, int, float,
    bool, None, lists, dicts); an event with one that is not is left out (the chain stays intact) and
    reported by ``close()``/``flush()``. One thread owns the writer (``event()`` is not meant for concurrent
    callers).
    """

    def __init__(self, path: Path, header: RecordingHeader, *, fsync_interval: float = 0.1,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self._on_failure = on_failure
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
        # The start on time.perf_counter()'s clock, for raw statements (stmt_sink); the same clock as
        # monotonic() on Linux, and any offset is absorbed by the writer's clamp (_wlast_t).
        self.t0_pc = time.perf_counter() - (time.monotonic() - self._t0)
        self._wlast_t = 0.0  # deferred: t of the last line written; no line gets a smaller t
        # Queued events, oldest first: encoded lines (bytes) or, when deferred, a stmt's values (a tuple) or
        # an event's encoder and arguments (_Pending). deque.append/popleft are atomic, so the owner's
        # thread never takes a lock.
        self._q: deque[bytes | tuple[Any, ...] | _Pending] = deque()
        # The header is written now, not by the first group commit: a CLI killed within the first interval
        # (SIGKILL, no clean-up) leaves a recording that verifies and uploads, not an empty file.
        line = canonical(hdr) + b"\n"
        try:
            self._write(line)
        except OSError as e:
            os.close(self._fd)
            raise RecordingError(f"cannot write recording {self.path}: {e.strerror}") from e
        self._digest.update(line)
        self.deferred = _crec is not None and header.kind == "pg"
        # Deferred recordings: the tunnel's one-call way to record a statement (see stmt_sink's doc below).
        self.stmt_sink: Callable[[tuple[Any, ...]], None] | None = self._q.append if self.deferred else None
        self._wake = threading.Event()
        self._queued = 0  # bytes queued since the last drain (approximate: a hint to wake the writer early)
        self._wlock = threading.Lock()  # one writer at a time: keeps the file in chain order
        self._closing = False
        self._closed = False
        self._sha: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"recording-{header.session_id}", daemon=True)
        self._thread.start()

    # -- events (owner's side: encode, chain, queue; no locks, no I/O) ------------------------------------

    def _now(self) -> float:
        t = round(time.monotonic() - self._t0, 6)
        if t < self._last_t:
            t = self._last_t
        self._last_t = t
        return t

    @property
    def failed(self) -> bool:
        """True once writing failed (disk full, I/O error): nothing more is queued; ``close()`` raises."""
        return isinstance(self._error, OSError)

    def event(self, e: str, **fields: object) -> None:
        """An event ``e`` with ``fields``. In a deferred recording it is encoded when written: a list or dict
        among the values must not be changed afterwards."""
        if self._closing:
            raise RecordingError("recording is closed")
        if self.failed:
            return  # nothing can be written any more: don't let events pile up in memory
        self._add(_encode_event, self._now(), e, fields)

    def _add(self, encode: Callable[..., tuple[bytes, str]], *args: Any) -> int:
        """Encode with ``encode(prev_h, *args)``, chain and queue; the line's length (0: left out or
        deferred)."""
        if self.deferred:
            self._q.append(_Pending(encode, args))
            return 0
        try:
            line, self._h = encode(self._h, *args)
        except (TypeError, ValueError) as exc:
            if self._error is None:
                self._error = exc
            return 0
        self._q.append(line)
        self.events += 1
        return len(line)

    def stmt(self, c: int, sql: str, truncated: bool, proto: str, params: int | None, ms: float,
             rows: int | None, tag: str | None, sqlstate: str | None, error: str | None) -> None:
        """A ``stmt`` event with ``blocked`` null; the same line as ``event("stmt", ...)`` would write."""
        if self._closing:
            raise RecordingError("recording is closed")
        if self.failed:
            return
        t = self._now()
        if self.deferred and type(c) is not float:  # a float c would read as a raw statement's begin
            self._q.append((t, c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error))
            return
        self._add(_encode_stmt, t, (c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error))

    def cast(self, code: str, data: object) -> None:
        """An asciicast event ``[t, code, data, h]`` (terminal recordings, ``kind = "ssh"``)."""
        if self._closing:
            raise RecordingError("recording is closed")
        if self.failed:
            return
        # Terminal output comes in big events: past WAKE_BYTES the writer is woken rather than waiting for its
        # interval, so a fast stream never queues more than about that much.
        self._queued += self._add(_encode_cast, self._now(), code, data)
        if self._queued > WAKE_BYTES:
            self._queued = 0
            self._wake.set()

    # -- writing (background thread, flush, close) ---------------------------------------------------------

    def _drain(self) -> None:
        """Write everything queued now, in order. Caller holds ``_wlock``."""
        q = self._q
        popleft = q.popleft
        items = [popleft() for _ in range(len(q))]
        if self.deferred:
            try:
                chunk = self._encode_queued(items)
            except Exception as exc:  # out of memory in the encoder: as fatal as a failed write
                raise OSError(errno.ENOMEM, f"cannot encode events: {type(exc).__name__}") from exc
        else:
            chunk = b"".join(items)  # type: ignore[arg-type]  # only lines are queued when not deferred
        if chunk:
            self._digest.update(chunk)  # hashlib releases the GIL for large buffers
            self._write(chunk)

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._closing:
                return  # close() writes what is left itself
            if not self._q:
                continue
            with self._wlock:
                if self._closing:
                    return
                try:
                    self._drain()
                    os.fsync(self._fd)
                except OSError as e:
                    self._error = e
                    self._q.clear()
                    if self._on_failure is not None:
                        # Fail closed: the owner ends the session rather than let it run unrecorded.
                        self._on_failure(f"cannot write recording {self.path}: {e.strerror}")
                    return

    def _encode_queued(self, items: list[bytes | tuple[Any, ...] | _Pending]) -> bytes:
        """The lines of deferred events, chained in order from ``_h`` (which it advances). Caller holds
        ``_wlock``. An event that cannot be encoded is left out and kept as the error, as ``_add`` does."""
        out: list[bytes] = []
        h = self._h
        last_t = self._wlast_t
        i, n = 0, len(items)
        while i < n:
            item = items[i]
            if type(item) is tuple:
                assert _crec is not None  # deferred
                lines, h, stop, last_t = _crec.chain_stmts(h, items, i, self.t0_pc, last_t)
                if stop > i:
                    out.append(lines)
                    self.events += stop - i
                    i = stop
                    continue
            try:
                if type(item) is tuple:
                    # values the C encoder does not take (not plain): the Python encoder, as stmt() would
                    item = _Pending(_encode_stmt, _cooked(item, self.t0_pc))
                assert isinstance(item, _Pending)  # a deferred recording queues nothing else
                args = item.args
                if args[0] < last_t:  # every encoder's first argument is the event's t
                    args = (last_t, *args[1:])
                line, h = item.encode(h, *args)
            except Exception as exc:  # left out, the chain intact; close() and flush() report it
                if self._error is None:
                    self._error = exc
                i += 1
                continue
            last_t = args[0]
            out.append(line)
            self.events += 1
            i += 1
        self._h = h
        self._wlast_t = last_t
        return b"".join(out)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def _raise_error(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, OSError):
            raise RecordingError(f"cannot write recording {self.path}: {err.strerror}")
        raise RecordingError(f"cannot record an event in {self.path}: {err}")

    def flush(self) -> None:
        """Write and fsync everything queued now (tests, crash-safety points)."""
        with self._wlock:
            try:
                self._drain()
                os.fsync(self._fd)
            except OSError as e:
                self._error = self._error or e
        self._raise_error()

    def close(self, reason: str = "client") -> str:
        if self._sha is not None:
            return self._sha
        if self.header.kind == "ssh":
            self.cast("x", {"e": "end", "reason": reason})
        else:
            self.event("end", reason=reason)
        self._closing = True
        self._wake.set()
        self._thread.join()
        try:
            with self._wlock:
                if not isinstance(self._error, OSError):
                    try:
                        self._drain()
                        os.fsync(self._fd)
                    except OSError as e:
                        raise RecordingError(f"cannot write recording {self.path}: {e.strerror}") from e
            self._raise_error()
        finally:
            os.close(self._fd)
            self._closed = True
        self._sha = self._digest.hexdigest()
        return self._sha

    @property
    def closed(self) -> bool:
        return self._closed


class _Pending(NamedTuple):
    """A deferred event: ``encode(prev_h, *args)`` gives its line and h when it is written."""

    encode: Callable[..., tuple[bytes, str]]
    args: tuple[Any, ...]


_STMT_KEYS = ("c", "sql", "proto", "params", "ms", "rows", "tag", "sqlstate", "error")
_str_or_null = (str, type(None))
_int_or_null = (int, type(None))


def _stmt_fields(p: tuple[Any, ...]) -> dict[str, object]:
    c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error = p
    fields: dict[str, object] = {"c": c, "sql": sql}
    if truncated:
        fields["sql_truncated"] = True
    fields.update(proto=proto, params=params, ms=ms, rows=rows, tag=tag, sqlstate=sqlstate, error=error,
                  blocked=None)
    return fields


def _j(v: str | None) -> str:
    return "null" if v is None else encode_basestring(v)


def _stmt_parts(t: float, p: tuple[Any, ...]) -> tuple[bytes | None, int]:
    """Canonical JSON of a ``stmt`` event (without "h") by template, and where "h" goes (after "error").

    Returns (None, 0) when a value is not of the plain type the template handles; the caller then takes the
    generic encoder (which gives the same bytes for plain values)."""
    c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error = p
    if not (type(c) is int and type(sql) is str and type(proto) is str and type(ms) is float
            and math.isfinite(ms) and type(t) is float and math.isfinite(t)
            and (params is None or type(params) is int)
            and (rows is None or type(rows) is int) and (tag is None or type(tag) is str)
            and (sqlstate is None or type(sqlstate) is str) and (error is None or type(error) is str)
            and truncated in (True, False)):
        return None, 0
    trunc = '"sql_truncated":true,' if truncated else ""
    head = f'{{"blocked":null,"c":{c},"e":"stmt","error":{_j(error)},'.encode()
    tail = (f'"ms":{ms!r},"params":{"null" if params is None else params},"proto":{encode_basestring(proto)},'
            f'"rows":{"null" if rows is None else rows},"sql":{encode_basestring(sql)},'
            f"{trunc}"
            f'"sqlstate":{_j(sqlstate)},"t":{t!r},"tag":{_j(tag)}}}').encode()
    return head + tail, len(head)


def _q(x: float, scale: float) -> float:
    """``x`` to the nearest multiple of ``1 / scale`` (halves up): floor(x * scale + 0.5) / scale, the same
    double arithmetic as ``_crec.q_units`` (which formats the multiple itself, without the GIL)."""
    y = x * scale + 0.5
    if not math.isfinite(y):
        return y  # the encoder refuses it: that one event is left out and reported
    return math.floor(y) / scale


def _cooked(item: tuple[Any, ...], t0: float) -> tuple[float, tuple[Any, ...]]:
    """(t, payload) of a queued stmt tuple for :func:`_encode_stmt`: a raw one (``stmt_sink``: end and begin
    clock readings first) gets its t and ms computed as ``_crec.chain_stmts`` does."""
    if len(item) == 11 and type(item[1]) is float:
        end, begin, c, sql, truncated, proto, params, rows, tag, sqlstate, error = item
        t = _q(end - t0, 1e6)
        ms = _q((end - begin) * 1000.0, 1e3)
        return t, (c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error)
    t, *payload = item
    return t, tuple(payload)


def _encode_stmt(prev: str, t: float, payload: tuple[Any, ...]) -> tuple[bytes, str]:
    """(line with "h" and newline, new h) for a ``stmt`` event, as :meth:`RecordingWriter.stmt` encodes it."""
    canon, pre = _stmt_parts(t, payload)
    if canon is None:
        return _encode_event(prev, t, "stmt", _stmt_fields(payload))
    h = _chain(prev, canon)
    return b"".join((canon[:pre], b'"h":"', h.encode(), b'",', canon[pre:], b"\n")), h


def _encode_event(prev: str, t: float, e: str, fields: dict[str, object]) -> tuple[bytes, str]:
    """(line with "h" and newline, new h) for a generic event."""
    ev: dict[str, object] = {"t": t, "e": e}
    ev.update(fields)
    ev["h"] = _PLACEHOLDER
    line = _encoder.encode(ev)
    if line.count(_PH_ITEM) == 1:  # always, unless a nested value holds the same item
        i = line.find(_PH_ITEM)
        canon = (line[:i] + line[i + len(_PH_ITEM) :]).encode()
        h = _chain(prev, canon)
        return (line[: i + 5] + h + line[i + 5 + 64 :] + "\n").encode(), h
    del ev["h"]
    canon = canonical(ev)
    h = _chain(prev, canon)
    ev["h"] = h
    return canonical(ev) + b"\n", h


def _encode_cast(prev: str, t: float, code: str, data: object) -> tuple[bytes, str]:
    """(line with "h" and newline, new h) for an asciicast event ``[t, code, data, h]``."""
    canon = canonical([t, code, data])
    h = _chain(prev, canon)
    return b"".join((canon[:-1], b',"', h.encode(), b'"]\n')), h


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
    # the statements the tunnel blocked: (t, rule, SQL text as recorded, already masked), at most MAX_BLOCKED
    blocked: list[tuple[float, str, str]] = field(default_factory=list)


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
        self._blocked: list[tuple[float, str, str]] = []
        self._cast = False  # a terminal recording (kind "ssh"): asciicast array events

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
        if isinstance(obj, list) and n > 1:
            self._check_cast(n, raw, obj)
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
            self._cast = obj.get("kind") == "ssh"
        else:
            t = obj.get("t")
            e = obj.get("e")
            if self._cast:
                self._fail(n, "an object event in a terminal recording")
                return
            if not isinstance(e, str) or not e:
                self._fail(n, 'event "e" missing')
                return
            if "pcigate_recording" in obj:
                self._fail(n, "second header")
                return
            if not self._time_ok(n, t):
                return
            self._events += 1
            if e == "end":
                self._ended = True
            elif e == "stmt" and obj.get("blocked") and len(self._blocked) < MAX_BLOCKED:
                sql = str(obj.get("sql", ""))[:1000]
                self._blocked.append((self._last_t, str(obj["blocked"])[:128], sql))
        self._h = h

    def _time_ok(self, n: int, t: object) -> bool:
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            self._fail(n, 'event "t" missing or invalid')
            return False
        if t < self._last_t:
            self._fail(n, 'event "t" goes backwards')
            return False
        self._last_t = float(t)
        return True

    def _check_cast(self, n: int, raw: bytes, ev: list[Any]) -> None:
        """An asciicast event line ``[t, code, data, h]`` of a terminal recording."""
        if not self._cast:
            self._fail(n, "an array event in a recording that is not a terminal recording")
            return
        if len(ev) != 4 or not isinstance(ev[3], str):
            self._fail(n, "not a [time, code, data, digest] event")
            return
        t, code, data, h = ev
        try:
            canon = canonical([t, code, data])
        except ValueError:
            self._fail(n, "not canonical JSON")
            return
        if h != _chain(self._h, canon):
            self._fail(n, "digest chain broken (line edited, removed, reordered or inserted)")
            return
        if canonical(ev) != raw:
            self._fail(n, "line is not in canonical form")
            return
        if not self._time_ok(n, t):
            return
        if not isinstance(code, str) or not code:
            self._fail(n, "event code missing")
            return
        self._events += 1
        if code == "x" and isinstance(data, dict) and data.get("e") == "end":
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
            blocked=list(self._blocked) if self._error is None else [],
        )


def verify_recording(data: bytes) -> RecordingCheck:
    v = RecordingVerifier(max_line=max(1 << 20, len(data)))
    v.feed(data)
    return v.finish()


def seal_recording(path: Path, reason: str = "client_lost") -> bool:
    """Complete a recording whose writer died (the CLI was killed): drop a torn last line and append a
    chained ``end`` event, so the events written before the crash verify and can be uploaded.

    Only a recording whose chain is intact up to where it stops is sealed; one with an edited or broken line
    is left untouched (it is evidence, and the broker will refuse it). Returns True when it sealed the file,
    False when there was nothing to do (already ended) or nothing it may do (broken, or no complete header).
    The caller must make sure no writer still owns the file (the spool's session lock).
    """
    v = RecordingVerifier()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            v.feed(chunk)
    if v._error is not None or v._line == 0 or v._ended:
        return False
    keep = v._size - len(v._partial)  # everything up to the last complete line
    if v._cast:
        line, _ = _encode_cast(v._h, v._last_t, "x", {"e": "end", "reason": reason})
    else:
        line, _ = _encode_event(v._h, v._last_t, "end", {"reason": reason})
    with path.open("r+b") as fh:
        fh.truncate(keep)
        fh.seek(keep)
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return True


# --------------------------------------------------------------------------------------------------------
# asciicast v2 export
# --------------------------------------------------------------------------------------------------------

ASCIICAST_HEADER_KEYS = ("version", "width", "height", "timestamp", "duration", "idle_time_limit", "command",
                         "title", "env")
ASCIICAST_CODES = frozenset({"o", "i", "r", "m"})


def asciicast_lines(lines: Iterable[bytes]) -> Iterator[bytes]:
    """A terminal recording (its lines, in order) as a plain asciicast v2 file, line by line: the header
    keeps asciicast's own keys (and a ``title`` naming the session), events become ``[t, code, data]`` and
    pcigate's ``x`` events are left out. Streams: one line in memory at a time. The input must have been
    verified (this only reshapes it); raises :class:`RecordingError` on a line that is not a terminal
    recording's."""
    it = iter(lines)
    first = next(it, None)
    if first is None:
        raise RecordingError("empty recording")
    hdr = json.loads(first)
    if not isinstance(hdr, dict) or hdr.get("kind") != "ssh":
        raise RecordingError("not a terminal (ssh) recording")
    out = {k: hdr[k] for k in ASCIICAST_HEADER_KEYS if k in hdr}
    out.setdefault("version", 2)
    out.setdefault("title", f"pcigate session {hdr.get('session_id')} on {hdr.get('target')} by "
                            f"{hdr.get('user')}")
    yield canonical(out) + b"\n"
    for raw in it:
        if not raw.strip():
            continue
        ev = json.loads(raw)
        if not isinstance(ev, list) or len(ev) != 4:
            raise RecordingError("not a terminal recording event")
        if ev[1] in ASCIICAST_CODES:
            yield json.dumps(ev[:3], ensure_ascii=False).encode() + b"\n"
