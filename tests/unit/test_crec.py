"""pcigate._crec (a database recording's statement lines, encoded and chained in the writer thread, in C)
against the Python encoder, byte for byte, and the deferred writer against the inline one."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcigate import recording
from pcigate.errors import RecordingError
from pcigate.recording import RecordingHeader, RecordingWriter, _stmt_parts, verify_recording

H0 = "0123456789abcdef" * 4


def test_the_module_is_built_and_database_recordings_use_it(tmp_path: Path) -> None:
    assert recording._crec is not None, (
        "pcigate._crec is missing: reinstall (pip install -e .) with gcc and libssl-dev"
    )
    pg = RecordingWriter(tmp_path / "pg.rec", header())
    ssh = RecordingWriter(tmp_path / "ssh.rec", header(kind="ssh"))
    try:
        assert pg.deferred
        assert not ssh.deferred  # terminal output: big events, encoded by the relay as they come
    finally:
        pg.close()
        ssh.close()


def header(kind: str = "pg") -> RecordingHeader:
    return RecordingHeader("s-1", "alice", "prod-db", "read", "lease", "0" * 64,
                           datetime(2026, 11, 22, tzinfo=UTC), kind=kind)


def python_lines(prev: str, items: list[tuple[Any, ...]], t0: float = 0.0,
                 last_t: float = 0.0) -> tuple[bytes, str, float]:
    """What the inline writer appends for these stmt values (recording.stmt without the C module): a raw
    item (a float second) gets t = floor((end - t0) * 1e6 + 0.5) / 1e6 and ms = floor((end - begin) * 1000
    * 1e3 + 0.5) / 1e3; every t is raised to the previous one when smaller."""
    out = []
    h = prev
    for item in items:
        if type(item[1]) is float:
            end, begin, c, sql, truncated, proto, params, rows, tag, sqlstate, error = item
            t = math.floor((end - t0) * 1e6 + 0.5) / 1e6
            ms = math.floor((end - begin) * 1000.0 * 1e3 + 0.5) / 1e3
            p = (c, sql, truncated, proto, params, ms, rows, tag, sqlstate, error)
        else:
            t, *rest = item
            p = tuple(rest)
        if t < last_t:
            t = last_t
        last_t = t
        canon, pre = _stmt_parts(t, p)
        assert canon is not None
        h = hashlib.sha256(h.encode() + canon).hexdigest()
        out.append(b"".join((canon[:pre], b'"h":"', h.encode(), b'",', canon[pre:], b"\n")))
    return b"".join(out), h, last_t


def chain(prev: str, items: list[Any], start: int = 0, t0: float = 0.0,
          last_t: float = 0.0) -> tuple[bytes, str, int, float]:
    assert recording._crec is not None
    return recording._crec.chain_stmts(prev, items, start, t0, last_t)  # type: ignore[no-any-return]


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)  # no lone surrogates
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
stmts = st.tuples(floats, ints, texts, st.booleans(), st.sampled_from(["simple", "extended"]),
                  st.none() | ints, floats, st.none() | ints, st.none() | texts, st.none() | texts,
                  st.none() | texts)


clock = st.floats(min_value=0.0, max_value=1e7)  # perf_counter readings: seconds since boot
raw_stmts = st.tuples(clock, clock, ints, texts, st.booleans(), st.sampled_from(["simple", "extended"]),
                      st.none() | ints, st.none() | ints, st.none() | texts, st.none() | texts,
                      st.none() | texts)
hexes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@given(items=st.lists(stmts | raw_stmts, max_size=8), prev=hexes, t0=clock,
       last_t=st.floats(min_value=0.0, max_value=1e7))
def test_same_bytes_and_chain_as_the_python_encoder(items: list[tuple[Any, ...]], prev: str, t0: float,
                                                    last_t: float) -> None:
    lines, h, stop, t = chain(prev, list(items), 0, t0, last_t)
    assert stop == len(items)
    assert (lines, h, t) == python_lines(prev, items, t0, last_t)


@given(items=st.lists(raw_stmts, min_size=1, max_size=8), t0=clock)
def test_raw_statements_get_the_writers_t_and_ms(items: list[tuple[Any, ...]], t0: float) -> None:
    """t to the µs and ms to the µs, as written numbers (what a reader of the file gets back), and t
    never goes backwards."""
    lines, _, _, last = chain(H0, list(items), 0, t0)
    ts = []
    for line, item in zip(lines.splitlines(), items, strict=True):
        obj = json.loads(line)
        assert abs(obj["ms"] - (item[0] - item[1]) * 1000.0) <= 0.0005 + 1e-9 * abs(obj["ms"])
        assert obj["ms"] * 1000 == pytest.approx(round(obj["ms"] * 1000), abs=1e-3)
        t = math.floor((item[0] - t0) * 1e6 + 0.5) / 1e6
        assert abs(t - (item[0] - t0)) <= 0.0000005 + 1e-12 * abs(t)
        assert obj["t"] == max([t, 0.0, *ts])  # 0.0: the last_t given
        ts.append(obj["t"])
    assert ts == sorted(ts)
    assert last == ts[-1]


def test_every_escape_and_non_ascii() -> None:
    text = "".join(chr(i) for i in range(0x80)) + "é€😀\u2028\x7f"
    item = (0.0, 1, text, False, "simple", 0, 1e-06, None, text, "42P01", text)
    assert chain(H0, [item])[:2] == python_lines(H0, [item])[:2]


PLAIN = (1.0, 1, "select 1", False, "simple", 0, 0.5, 1, "SELECT 1", None, None)


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (1, True),  # c: a bool is not a plain int
        (1, 2**64),  # c: beyond 64 bits
        (5, 1.0),  # params: a float
        (7, 2**70),  # rows: beyond 64 bits
        (3, 1),  # truncated: not a bool
        (6, math.inf),  # ms: not finite
        (6, 1),  # ms: an int
        (0, math.nan),  # t: not finite
        (2, "lone \ud800 surrogate"),  # sql: not encodable as UTF-8
        (8, b"SELECT 1"),  # tag: bytes
    ],
)
def test_it_stops_before_values_it_does_not_handle(index: int, value: object) -> None:
    odd = list(PLAIN)
    odd[index] = value
    items: list[Any] = [PLAIN, tuple(odd), PLAIN]
    lines, h, stop, _ = chain(H0, items)
    assert stop == 1
    assert (lines, h) == python_lines(H0, [PLAIN])[:2]
    assert chain(h, items, 2)[2] == 3  # and goes on from after it when asked


def test_it_stops_at_other_queued_events() -> None:
    items: list[Any] = [PLAIN, b"a line", PLAIN]
    assert chain(H0, items)[2] == 1
    assert chain(H0, items, 1, 0.0, 2.5) == (b"", H0, 1, 2.5)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        chain("abc", [PLAIN])
    with pytest.raises(IndexError):
        chain(H0, [PLAIN], 2)
    with pytest.raises(ValueError):
        chain(H0, [PLAIN], 0, math.nan)


RAW = (101.5, 101.25, 1, "select 1", False, "simple", 0, 1, "SELECT 1", None, None)


@pytest.mark.parametrize(("end", "begin"), [(1e308, -1e308), (math.inf, 1.0), (1.0, math.nan)])
def test_a_raw_statement_whose_clock_readings_give_no_finite_t_or_ms_is_not_plain(end: float,
                                                                                  begin: float) -> None:
    odd = (end, begin, *RAW[2:])
    lines, h, stop, last = chain(H0, [RAW, odd, RAW], 0, 100.0)
    assert stop == 1
    assert (lines, h, last) == python_lines(H0, [RAW], 100.0)
    assert b'"t":1.5,' in lines
    assert b'"ms":250.0,' in lines


def write_session(path: Path, monkeypatch: pytest.MonkeyPatch, *, bad_event: bool = False) -> str:
    w = RecordingWriter(path, header())
    times = iter(float(i) / 8 for i in range(100))
    monkeypatch.setattr(w, "_now", lambda: next(times))
    w.event("conn", c=1, peer="127.0.0.1:5000")
    w.stmt(1, "select 1", False, "simple", 0, 0.25, 1, "SELECT 1", None, None)
    w.stmt(1, 'select "x"\n', True, "extended", 2, 1.5, None, None, "42P01", 'relation "x" does not exist')
    w.event("masked", c=1)
    w.stmt(2, "insert 4111 11** **** 1111", False, "simple", None, 3.0, 1, "INSERT 0 1", None, None)
    w.stmt(True, "a bool c", False, "simple", 0, 1.0, 0, "SELECT 0", None, None)  # type: ignore[arg-type]
    w.stmt(3, "rows beyond 64 bits", False, "simple", 0, 1.0, 2**70, "SELECT 0", None, None)
    w.stmt(3, "après", False, "simple", 0, 2.0, 0, "SELECT 0", None, None)
    w.flush()
    if bad_event:
        w.event("odd", value=object())  # not JSON: left out, reported by close()
    w.stmt(3, "after a flush", False, "simple", 0, 2.0, 0, "SELECT 0", None, None)
    monkeypatch.setattr(w, "_now", lambda: 99.0)
    return w.close()


def test_a_recording_is_the_same_file_deferred_or_inline(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    deferred = write_session(tmp_path / "c.rec", monkeypatch)
    monkeypatch.setattr(recording, "_crec", None)
    inline = write_session(tmp_path / "py.rec", monkeypatch)
    data = (tmp_path / "c.rec").read_bytes()
    assert data == (tmp_path / "py.rec").read_bytes()
    assert deferred == inline == hashlib.sha256(data).hexdigest()
    check = verify_recording(data)
    assert check.ok, check.error
    assert check.events == 10  # conn, 7 stmt, masked, end


def test_an_event_that_cannot_be_encoded_is_left_out_and_reported_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("c.rec", "py.rec"):
        if name == "py.rec":
            monkeypatch.setattr(recording, "_crec", None)
        with pytest.raises(RecordingError, match="cannot record an event"):
            write_session(tmp_path / name, monkeypatch, bad_event=True)
    data = (tmp_path / "c.rec").read_bytes()
    assert data == (tmp_path / "py.rec").read_bytes()
    assert verify_recording(data).ok


def test_statements_queued_while_the_writer_drains_keep_their_order(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "r.rec", header(), fsync_interval=0.001)
    assert w.deferred
    for i in range(30_000):
        w.stmt(i % 8, f"select {i}", False, "simple", 0, 0.1, 1, "SELECT 1", None, None)
    w.close()
    data = (tmp_path / "r.rec").read_bytes()
    check = verify_recording(data)
    assert check.ok, check.error
    assert check.events == 30_001
    sqls = [line.split(b'"sql":"', 1)[1].split(b'"', 1)[0] for line in data.splitlines()[1:-1]]
    assert sqls == [f"select {i}".encode() for i in range(30_000)]


def test_an_event_that_breaks_the_encoder_loses_nothing_else(tmp_path: Path) -> None:
    """A value no encoder takes (a lone surrogate in the SQL text) leaves that one event out: the writer
    thread goes on, the events around it are written in order, and close() reports it."""
    w = RecordingWriter(tmp_path / "r.rec", header(), fsync_interval=0.01)
    assert w.deferred
    w.stmt(1, "before", False, "simple", 0, 1.0, 1, "SELECT 1", None, None)
    w.stmt(1, "bad \ud800", False, "simple", 0, 1.0, 1, "SELECT 1", None, None)
    w.stmt(1, "after", False, "simple", 0, 1.0, 1, "SELECT 1", None, None)
    deadline = 50
    while w._q and deadline:  # the writer thread drains them on its own
        deadline -= 1
        threading.Event().wait(0.02)
    assert w._thread.is_alive()
    w.stmt(1, "later", False, "simple", 0, 1.0, 1, "SELECT 1", None, None)
    with pytest.raises(RecordingError, match="surrogates not allowed"):
        w.close()
    data = (tmp_path / "r.rec").read_bytes()
    check = verify_recording(data)
    assert check.ok, check.error
    assert [line.split(b'"sql":"', 1)[1].split(b'"', 1)[0] for line in data.splitlines()[1:-1]] == [
        b"before", b"after", b"later"]


def write_raw_session(path: Path, monkeypatch: pytest.MonkeyPatch, python_only: bool) -> bytes:
    """Statements through stmt_sink (raw clock readings), between events stamped by _now(); some readings
    lie before the event queued ahead of them (two clocks, or a statement that began long ago)."""
    w = RecordingWriter(path, header())
    assert w.deferred
    assert w.stmt_sink is not None
    w.t0_pc = 100.0
    times = iter([0.5, 0.9, 2.0, 7.0])
    monkeypatch.setattr(w, "_now", lambda: next(times))
    if python_only:  # the C module takes nothing: every line goes through the Python reference path
        monkeypatch.setattr(recording, "_crec", type("NoC", (), {
            "chain_stmts": staticmethod(lambda h, items, i, t0, last: (b"", h, i, last))}))
    sink = w.stmt_sink
    w.event("conn", c=1, peer="127.0.0.1:5000")  # t 0.5
    sink((100.75, 100.5, 1, "select 1", False, "simple", 0, 1, "SELECT 1", None, None))  # t 0.75
    sink((100.6, 100.59, 1, "select 2", False, "simple", 0, 1, "SELECT 1", None, None))  # 0.6 -> 0.75
    w.event("masked", c=1)  # t 0.9
    sink((100.8, 100.1, 2, "select 3", True, "extended", 2, None, None, "42P01", "no"))  # 0.8 -> 0.9
    w.flush()
    sink((103.0000004, 101.0, 2, "après", False, "simple", None, 0, "SELECT 0", None, None))  # 3.0
    w.stmt(2, "cooked", False, "simple", 0, 1.0, 0, "SELECT 0", None, None)  # _now 2.0 -> 3.0
    w.close()  # end at 7.0
    return path.read_bytes()


def test_raw_statements_write_the_same_file_through_c_or_python(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    in_c = write_raw_session(tmp_path / "c.rec", monkeypatch, python_only=False)
    monkeypatch.undo()
    in_python = write_raw_session(tmp_path / "py.rec", monkeypatch, python_only=True)
    assert in_c == in_python
    check = verify_recording(in_c)
    assert check.ok, check.error  # verify_recording refuses a t that goes backwards
    events = [json.loads(line) for line in in_c.splitlines()[1:]]
    assert [e["t"] for e in events] == [0.5, 0.75, 0.75, 0.9, 0.9, 3.0, 3.0, 7.0]
    assert [e.get("ms") for e in events if e["e"] == "stmt"] == [250.0, 10.0, 700.0, 2000.0, 1.0]


@given(d=st.floats(min_value=-0.001, max_value=0.001) | st.floats(min_value=0.0, max_value=1e9),
       dur=st.floats(min_value=-0.01, max_value=0.01) | st.floats(min_value=0.0, max_value=1e6), t0=clock)
def test_raw_t_and_ms_are_written_as_python_writes_those_floats(d: float, dur: float, t0: float) -> None:
    """The C module formats a raw statement's t and ms itself (no GIL): tiny values in exponent form
    (5e-06, -1.2e-05), large ones, negative ones, exactly as float.__repr__ (the Python encoder) does."""
    end = t0 + d
    item = (end, end - dur, 1, "s", False, "simple", 0, 1, "SELECT 1", None, None)
    lines, h, stop, _ = chain(H0, [item], 0, t0, -1e12)
    assert stop == 1
    assert (lines, h) == python_lines(H0, [item], t0, -1e12)[:2]


@pytest.mark.parametrize("bad", [(1e308, 1e308, 1, "x", False, "simple", 0, 1, "SELECT 1", None, None),
                                 (), ("end", 1.0, 1, "x", False, "simple", 0, 1, "SELECT 1", None, None)])
def test_a_sink_tuple_the_writer_cannot_use_is_left_out_and_reported(tmp_path: Path, bad: tuple[Any, ...]
                                                                     ) -> None:
    w = RecordingWriter(tmp_path / "r.rec", header())
    assert w.stmt_sink is not None
    w.t0_pc = 0.0
    w.stmt_sink((1.0, 0.5, 1, "before", False, "simple", 0, 1, "SELECT 1", None, None))
    w.stmt_sink(bad)
    w.stmt_sink((2.0, 1.5, 1, "after", False, "simple", 0, 1, "SELECT 1", None, None))
    with pytest.raises(RecordingError, match="cannot record an event"):
        w.close()
    data = (tmp_path / "r.rec").read_bytes()
    check = verify_recording(data)
    assert check.ok, check.error
    assert [json.loads(line).get("sql") for line in data.splitlines()[1:]] == ["before", "after", None]
