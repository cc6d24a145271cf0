"""pcigate._crec (a database recording's statement lines, encoded and chained in the writer thread, in C)
against the Python encoder, byte for byte, and the deferred writer against the inline one."""

from __future__ import annotations

import hashlib
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


def python_lines(prev: str, items: list[tuple[Any, ...]]) -> tuple[bytes, str]:
    """What the inline writer appends for these stmt values (recording.stmt without the C module)."""
    out = []
    h = prev
    for t, *p in items:
        canon, pre = _stmt_parts(t, tuple(p))
        assert canon is not None
        h = hashlib.sha256(h.encode() + canon).hexdigest()
        out.append(b"".join((canon[:pre], b'"h":"', h.encode(), b'",', canon[pre:], b"\n")))
    return b"".join(out), h


def chain(prev: str, items: list[Any], start: int = 0) -> tuple[bytes, str, int]:
    assert recording._crec is not None
    return recording._crec.chain_stmts(prev, items, start)  # type: ignore[no-any-return]


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=120)  # no lone surrogates
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
stmts = st.tuples(floats, ints, texts, st.booleans(), st.sampled_from(["simple", "extended"]),
                  st.none() | ints, floats, st.none() | ints, st.none() | texts, st.none() | texts,
                  st.none() | texts)


@given(items=st.lists(stmts, max_size=8), prev=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
def test_same_bytes_and_chain_as_the_python_encoder(items: list[tuple[Any, ...]], prev: str) -> None:
    lines, h, stop = chain(prev, list(items))
    assert stop == len(items)
    assert (lines, h) == python_lines(prev, items)


def test_every_escape_and_non_ascii() -> None:
    text = "".join(chr(i) for i in range(0x80)) + "é€😀\u2028\x7f"
    item = (0.0, 1, text, False, "simple", 0, 1e-06, None, text, "42P01", text)
    assert chain(H0, [item])[:2] == python_lines(H0, [item])


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
    lines, h, stop = chain(H0, items)
    assert stop == 1
    assert (lines, h) == python_lines(H0, [PLAIN])
    assert chain(h, items, 2)[2] == 3  # and goes on from after it when asked


def test_it_stops_at_other_queued_events() -> None:
    items: list[Any] = [PLAIN, b"a line", PLAIN]
    assert chain(H0, items)[2] == 1
    assert chain(H0, items, 1) == (b"", H0, 1)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        chain("abc", [PLAIN])
    with pytest.raises(IndexError):
        chain(H0, [PLAIN], 2)


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
