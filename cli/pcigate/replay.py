"""Replaying recordings: pure logic, no I/O (``pcigate replay``; the adapter is ``pcigate.commands.replay``).

Everything here works on the lines (bytes) of a recording handed in, as an iterable, so a 1 GB recording is
never whole in memory:

* :func:`split_header` takes the header line off; :func:`pg_entries` turns the events of a database
  recording into :class:`PgEntry` items, each ``masked`` event joined to its connection's statement;
  :func:`format_entry` and :class:`PgSummary` make the timeline's text; :func:`pg_json` and :func:`ssh_json`
  stream the ``--json`` documents.
* :class:`Player` replays a terminal recording's output frames: given the elapsed wall time it says what to
  print and how long to wait, and it pauses, steps, seeks and changes speed on the keys :func:`parse_keys`
  decodes. Seeking back re-reads the recording from its start (the ``source`` factory) and returns a
  terminal reset followed by all output up to the new position.

Parsing is lenient: the caller verifies the chain first, and only with ``--force`` hands in a recording that
failed; lines that are not events of the expected shape are then skipped rather than trusted.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from pcigate.errors import RecordingError

SEEK_STEP = 5.0  # seconds the arrow keys seek
RESET = "\x1bc"  # RIS, full terminal reset: before the output re-emitted up to a position seeked back to
PENDING_CAP = 1024  # timeline entries held back while waiting for a statement's "masked" event

KEYS: dict[str, str] = {
    " ": "pause",
    ".": "step",
    "\x1b[C": "forward",
    "\x1b[D": "back",
    "+": "faster",
    "-": "slower",
    "q": "quit",
}


# --------------------------------------------------------------------------------------------------------
# Lines → header and events
# --------------------------------------------------------------------------------------------------------


def _number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


_decode = json.JSONDecoder().decode


def _json(raw: bytes) -> object:
    try:
        return _decode(raw.decode())
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None


def split_header(lines: Iterable[bytes]) -> tuple[dict[str, object], Iterator[bytes]]:
    """(the header without "h", the remaining lines). RecordingError when line 1 is no pcigate header."""
    it = iter(lines)
    obj = _json(next(it, b""))
    if not isinstance(obj, dict) or "pcigate_recording" not in obj or not isinstance(obj.get("kind"), str):
        raise RecordingError("not a pcigate recording (no header on line 1)")
    obj.pop("h", None)
    return obj, it


def recording_kind(header: dict[str, object]) -> str:
    kind = header.get("kind")
    if kind not in ("pg", "ssh"):
        raise RecordingError(f"unknown recording kind {kind!r}")
    return str(kind)


# --------------------------------------------------------------------------------------------------------
# Database recordings: the timeline
# --------------------------------------------------------------------------------------------------------


@dataclass
class PgEntry:
    """One timeline item: an event of a database recording (a ``stmt`` with its ``masked`` count joined)."""

    t: float
    e: str
    c: int | None
    fields: dict[str, object]  # the event without t, e, c and h
    masked: bool | None = None  # stmt only: the tunnel masked card data in its results

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"t": self.t}
        if self.e != "stmt":
            out["e"] = self.e
        if self.c is not None:
            out["c"] = self.c
        out.update(self.fields)
        if self.e == "stmt":
            out["masked"] = self.masked
        return out


def _pg_entry(obj: object) -> PgEntry | None:
    if not isinstance(obj, dict):
        return None
    t = _number(obj.pop("t", None))
    e = obj.pop("e", None)
    if t is None or not isinstance(e, str):
        return None
    obj.pop("h", None)
    c = obj.pop("c", None)
    if isinstance(c, bool) or not isinstance(c, int):
        c = None
    return PgEntry(t, e, c, obj)


def pg_entries(lines: Iterable[bytes], cap: int = PENDING_CAP) -> Iterator[PgEntry]:
    """The timeline of a database recording's event lines, in recording order.

    A ``masked`` event follows the ``stmt`` of its connection whose results had card data masked: it is
    joined to that statement (``masked`` set) instead of being an entry of its own. A statement is
    therefore held back until the next event of the same connection (or the end), and so is everything after
    it; at most ``cap`` entries are held, then the oldest go out as they are (a ``masked`` event arriving
    later for one of them stays an entry of its own)."""
    held: deque[PgEntry] = deque()
    open_stmt: dict[int, PgEntry] = {}
    for raw in lines:
        entry = _pg_entry(_json(raw))
        if entry is None:
            continue
        prev = open_stmt.pop(entry.c, None) if entry.c is not None else None
        if entry.e == "masked" and prev is not None:
            prev.masked = True
        else:
            held.append(entry)
            if entry.e == "stmt" and entry.c is not None:
                open_stmt[entry.c] = entry
        while held and (len(held) > cap or not _waiting(held[0], open_stmt)):
            first = held.popleft()
            if first.c is not None and open_stmt.get(first.c) is first:
                del open_stmt[first.c]
            yield first
    yield from held


def _waiting(entry: PgEntry, open_stmt: dict[int, PgEntry]) -> bool:
    return entry.c is not None and open_stmt.get(entry.c) is entry


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: object, limit: int | None = None) -> str:
    """Text for one timeline line: whitespace runs become one space, other control characters are shown
    escaped (recorded SQL must not drive the auditor's terminal), at most ``limit`` characters (``…``)."""
    s = " ".join(str(text).split())
    if not s.isprintable():
        s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)
    if limit is not None and len(s) > limit:
        return s[: max(0, limit - 1)] + "…"
    return s


def _ms(v: object) -> str:
    n = _number(v)
    return "-" if n is None else f"{n:.1f}ms"


def _result(f: dict[str, object]) -> str:
    if f.get("sqlstate"):
        return one_line(f"{f['sqlstate']} {f.get('error') or ''}".strip(), 80)
    if f.get("tag"):
        return one_line(f["tag"], 40)
    rows = f.get("rows")
    return f"{rows} rows" if isinstance(rows, int) and not isinstance(rows, bool) else "-"


def _marks(entry: PgEntry) -> list[str]:
    marks = []
    if entry.fields.get("blocked"):
        marks.append(f"BLOCKED ({one_line(entry.fields['blocked'], 60)})")
    if entry.masked:
        marks.append("MASKED")
    return marks


def _detail(entry: PgEntry) -> str:
    f = entry.fields
    match entry.e:
        case "conn":
            return one_line(f"conn from {f.get('peer', '?')} ({f.get('app') or 'no application name'})")
        case "disconn":
            return one_line(f"disconn ({f.get('reason', '?')})")
        case "copy":
            rows = f.get("rows")
            extra = f", {rows} rows" if rows is not None else ""
            return one_line(f"copy {f.get('direction', '?')}: {f.get('bytes', '?')} bytes{extra}")
        case "cancel":
            return "cancel"
        case "masked":
            return "masked (results of a statement not in this recording)"
        case "end":
            return one_line(f"end ({f.get('reason', '?')})")
    return one_line(f"{entry.e} {json.dumps(f, sort_keys=True)}", 200)


def format_entry(entry: PgEntry, width: int | None = None) -> str:
    """One timeline line: ``+offset  cN  duration  result  marks  SQL``; the SQL is cut to ``width``."""
    conn = f"c{entry.c}" if entry.c is not None else "-"
    head = f"{f'+{entry.t:.3f}s':>11}  {conn:<4}"
    if entry.e != "stmt":
        return f"{head}  {_detail(entry)}"
    f = entry.fields
    prefix = "  ".join([head, f"{_ms(f.get('ms')):>9}", _result(f), *_marks(entry)]) + "  "
    sql = str(f.get("sql", "")) + ("…" if f.get("sql_truncated") else "")
    return prefix + one_line(sql, None if width is None else max(20, width - len(prefix)))


@dataclass
class PgSummary:
    statements: int = 0
    blocked: int = 0
    masked: int = 0  # statements with masked values
    errors: int = 0  # statements that failed (blocked ones included)
    connections: int = 0
    duration: float = 0.0

    def add(self, entry: PgEntry) -> None:
        self.duration = max(self.duration, entry.t)
        if entry.e == "conn":
            self.connections += 1
        elif entry.e == "stmt":
            self.statements += 1
            self.blocked += bool(entry.fields.get("blocked"))
            self.masked += bool(entry.masked)
            self.errors += bool(entry.fields.get("sqlstate"))

    def line(self) -> str:
        return (f"{self.statements} statements, {self.blocked} blocked, {self.masked} masked, "
                f"{self.errors} failed, {self.connections} connections; duration {self.duration:.3f}s")

    def to_json(self) -> dict[str, object]:
        return {"statements": self.statements, "blocked": self.blocked, "masked": self.masked,
                "errors": self.errors, "connections": self.connections, "duration": self.duration}


def pg_timeline(lines: Iterable[bytes], summary: PgSummary, width: int | None = None) -> Iterator[str]:
    """The timeline's lines (without newlines), then the summary line; ``summary`` is filled on the way."""
    for entry in pg_entries(lines):
        summary.add(entry)
        yield format_entry(entry, width)
    yield summary.line()


def pg_json(header: dict[str, object], lines: Iterable[bytes]) -> Iterator[str]:
    """The ``--json`` document of a database recording, in pieces: ``{"session", "kind": "pg",
    "statements": [...], "events": [...], "summary"}``. Statements are streamed; the other events (fewer:
    conn, disconn, copy, cancel, end) are kept until the statements are out."""
    summary = PgSummary()
    others: list[dict[str, object]] = []
    yield '{"session": ' + json.dumps(header, sort_keys=True) + ', "kind": "pg", "statements": ['
    sep = "\n"
    for entry in pg_entries(lines):
        summary.add(entry)
        if entry.e == "stmt":
            yield sep + json.dumps(entry.to_json(), sort_keys=True)
            sep = ",\n"
        else:
            others.append(entry.to_json())
    yield '\n], "events": [' + ",\n".join(json.dumps(o, sort_keys=True) for o in others)
    yield '], "summary": ' + json.dumps(summary.to_json(), sort_keys=True) + "}\n"


# --------------------------------------------------------------------------------------------------------
# Terminal recordings: events, the player, keys
# --------------------------------------------------------------------------------------------------------


class CastEvent(NamedTuple):
    t: float
    code: str
    data: object


def cast_events(lines: Iterable[bytes]) -> Iterator[CastEvent]:
    """The ``[t, code, data, h]`` events of a terminal recording's event lines (after the header)."""
    for raw in lines:
        obj = _json(raw)
        if not isinstance(obj, list) or len(obj) < 3:
            continue
        t = _number(obj[0])
        if t is None or not isinstance(obj[1], str):
            continue
        yield CastEvent(t, obj[1], obj[2])


def ssh_json(header: dict[str, object], lines: Iterable[bytes]) -> Iterator[str]:
    """The ``--json`` document of a terminal recording: ``{"session", "kind": "ssh", "events": [[t, code,
    data], ...]}`` (every event, pcigate's "x" ones included), in pieces."""
    yield '{"session": ' + json.dumps(header, sort_keys=True) + ', "kind": "ssh", "events": ['
    sep = "\n"
    for ev in cast_events(lines):
        yield sep + json.dumps([ev.t, ev.code, ev.data])
        sep = ",\n"
    yield "\n]}\n"


def idle_limit(option: float | None, header: dict[str, object]) -> float | None:
    """The idle limit to apply: ``--idle-limit`` when given, else the header's ``idle_time_limit``."""
    if option is not None:
        return option
    limit = _number(header.get("idle_time_limit"))
    return limit if limit is not None and limit >= 0 else None


def output_frames(events: Iterable[CastEvent], idle: float | None) -> Iterator[tuple[float, str]]:
    """(time on the played timeline, text) of each output ("o") event: every gap between two outputs (and
    before the first) is capped at ``idle`` seconds."""
    last_t = 0.0
    played = 0.0
    for ev in events:
        if ev.code != "o" or not isinstance(ev.data, str):
            continue
        gap = max(0.0, ev.t - last_t)
        played += gap if idle is None else min(gap, idle)
        last_t = max(last_t, ev.t)
        yield played, ev.data


@dataclass
class Player:
    """The timing of a terminal replay, without clocks or sleeping.

    ``clock`` is the position on the played timeline (idle gaps capped). The caller loops: wait
    :meth:`until_next` wall seconds (or for a key), then print :meth:`advance` of the wall time that really
    passed, and hand keys to :meth:`command`, printing what it returns. ``source`` gives the recording's
    events from the start each time it is called (seeking back re-reads them)."""

    source: Callable[[], Iterable[CastEvent]]
    speed: float = 1.0
    idle: float | None = None
    clock: float = 0.0
    paused: bool = False
    _frames: Iterator[tuple[float, str]] = field(init=False, repr=False)
    _next: tuple[float, str] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError("speed must be > 0")
        self._rewind()

    def _rewind(self) -> None:
        self._frames = output_frames(self.source(), self.idle)
        self._next = next(self._frames, None)

    @property
    def done(self) -> bool:
        """Every output frame has been returned."""
        return self._next is None

    def until_next(self) -> float | None:
        """Wall seconds until the next frame is due (0 when due); None when paused or done."""
        if self.paused or self._next is None:
            return None
        return max(0.0, (self._next[0] - self.clock) / self.speed)

    def _take_until(self, t: float) -> str:
        parts = []
        while self._next is not None and self._next[0] <= t:
            parts.append(self._next[1])
            self._next = next(self._frames, None)
        return "".join(parts)

    def advance(self, wall: float) -> str:
        """Let ``wall`` seconds pass (nothing moves while paused); the output now due."""
        if self.paused:
            return ""
        self.clock += max(0.0, wall) * self.speed
        return self._take_until(self.clock)

    def step(self) -> str:
        """The next frame at once (the clock jumps to it)."""
        if self._next is None:
            return ""
        self.clock = max(self.clock, self._next[0])
        return self._take_until(self.clock)

    def seek(self, delta: float) -> str:
        """Move the clock by ``delta`` seconds. Forward: the output skipped over. Back: a terminal reset and
        all output up to the new position, the recording re-read from its start."""
        target = max(0.0, self.clock + delta)
        if target >= self.clock:
            self.clock = target
            return self._take_until(target)
        self._rewind()
        self.clock = target
        return RESET + self._take_until(target)

    def command(self, name: str) -> str:
        """Apply a key's command (:data:`KEYS`, "quit" aside); the text to print."""
        match name:
            case "pause":
                self.paused = not self.paused
            case "step" if self.paused:
                return self.step()
            case "forward":
                return self.seek(SEEK_STEP)
            case "back":
                return self.seek(-SEEK_STEP)
            case "faster":
                self.speed *= 2
            case "slower":
                self.speed /= 2
        return ""


def parse_keys(data: bytes) -> tuple[list[str], bytes]:
    """Key presses → (commands of :data:`KEYS`, an incomplete escape sequence to prepend to the next
    read). Other keys and escape sequences are ignored."""
    text = data.decode("latin-1")
    cmds: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "\x1b":
            if text[i] in KEYS:
                cmds.append(KEYS[text[i]])
            i += 1
            continue
        seq = text[i : i + 3]
        if len(seq) < 3 and "\x1b[".startswith(seq):
            return cmds, data[i:]  # the rest of the sequence comes with the next read
        if seq in KEYS:
            cmds.append(KEYS[seq])
            i += 3
        else:
            i += 2 if seq[1:2] == "[" else 1  # an escape sequence we don't know: skip its introducer
    return cmds, b""
