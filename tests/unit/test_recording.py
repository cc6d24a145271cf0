"""pcigate.recording: the chain, the writer, the streaming verifier."""

from __future__ import annotations

import itertools
import json
import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate.errors import RecordingError
from pcigate.recording import (
    SQL_CAP,
    RecordingHeader,
    RecordingVerifier,
    RecordingWriter,
    canonical,
    cap_sql,
    verify_recording,
)

HEADER = RecordingHeader(
    session_id="s-1", user="alice", target="prod-db", level="read", lease_id="database/creds/ro/abc",
    policy_digest="0" * 64, started_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
)


def _write(tmp_path: Path, n: int = 5) -> tuple[Path, str]:
    w = RecordingWriter(tmp_path / "rec" / "s.rec", HEADER)
    w.event("conn", c=1, peer="127.0.0.1:5000", app="psql")
    for i in range(n):
        w.event("stmt", c=1, sql=f"select {i} -- ünïcode \"q\"", proto="simple", params=0, ms=0.5, rows=1,
                tag="SELECT 1", sqlstate=None, error=None, blocked=None)
    w.event("disconn", c=1, reason="client")
    sha = w.close()
    return w.path, sha


def test_writer_file_and_verify(tmp_path: Path) -> None:
    path, sha = _write(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    data = path.read_bytes()
    check = verify_recording(data)
    assert check.ok, check.error
    assert check.sha256 == sha
    assert check.size == len(data)
    assert check.events == 5 + 3
    assert check.header is not None
    assert check.header["user"] == "alice"
    assert check.header["started_at"] == "2024-05-01T12:00:00Z"
    lines = data.split(b"\n")
    assert lines[-1] == b""
    objs = [json.loads(x) for x in lines[:-1]]
    assert objs[-1]["e"] == "end"
    assert objs[-1]["reason"] == "client"
    ts = [o["t"] for o in objs[1:]]
    assert ts == sorted(ts)
    for raw, o in zip(lines, objs, strict=False):
        assert canonical(o) == raw  # every line is canonical
    stmt = objs[2]
    assert stmt["sql"].startswith("select 0 -- ünïcode")
    assert stmt["rows"] == 1
    assert stmt["sqlstate"] is None


def test_close_idempotent_and_event_after_close(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "a.rec", HEADER)
    sha = w.close("shutdown")
    assert w.close() == sha
    with pytest.raises(RecordingError):
        w.event("stmt")


def test_exclusive_create(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "a.rec", HEADER)
    w.close()
    with pytest.raises(RecordingError, match="exists"):
        RecordingWriter(tmp_path / "a.rec", HEADER)


def test_nested_values_supported(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "a.rec", HEADER)
    w.event("note", data={"k": [1, 2]}, h="ignored")
    w.close()
    assert verify_recording((tmp_path / "a.rec").read_bytes()).ok


def test_group_commit_flushes_in_background(tmp_path: Path) -> None:
    import time

    w = RecordingWriter(tmp_path / "a.rec", HEADER, fsync_interval=0.01)
    for i in range(1000):
        w.event("stmt", c=1, sql=f"select {i}")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (tmp_path / "a.rec").read_bytes().count(b"\n") < 1001:
        time.sleep(0.01)
    assert (tmp_path / "a.rec").read_bytes().count(b"\n") == 1001
    w.close()


# -- tamper detection ---------------------------------------------------------------------------------------


def _lines(tmp_path: Path) -> list[bytes]:
    path, _ = _write(tmp_path)
    return path.read_bytes().split(b"\n")[:-1]


def _join(lines: list[bytes]) -> bytes:
    return b"".join(x + b"\n" for x in lines)


def test_edit_detected_at_line(tmp_path: Path) -> None:
    lines = _lines(tmp_path)
    for k in range(len(lines)):
        edited = list(lines)
        obj = json.loads(edited[k])
        obj["zz_extra"] = 1
        edited[k] = canonical(obj)
        check = verify_recording(_join(edited))
        assert not check.ok
        assert check.line == k + 1, (k, check.error)


def test_edit_value_keeping_hash_detected(tmp_path: Path) -> None:
    lines = _lines(tmp_path)
    edited = list(lines)
    edited[3] = edited[3].replace(b"select 1", b"select 9")
    check = verify_recording(_join(edited))
    assert (check.ok, check.line) == (False, 4)


def test_whitespace_edit_detected(tmp_path: Path) -> None:
    lines = _lines(tmp_path)
    edited = list(lines)
    edited[2] = edited[2].replace(b'","', b'", "', 1)
    check = verify_recording(_join(edited))
    assert (check.ok, check.line) == (False, 3)
    assert check.error is not None
    assert "canonical" in check.error


def test_delete_detected(tmp_path: Path) -> None:
    lines = _lines(tmp_path)
    for k in range(1, len(lines) - 1):
        check = verify_recording(_join(lines[:k] + lines[k + 1 :]))
        assert (check.ok, check.line) == (False, k + 1)


def test_reorder_detected(tmp_path: Path) -> None:
    lines = _lines(tmp_path)
    for k in range(1, len(lines) - 1):
        swapped = list(lines)
        swapped[k], swapped[k + 1] = swapped[k + 1], swapped[k]
        check = verify_recording(_join(swapped))
        assert (check.ok, check.line) == (False, k + 1)


def test_truncation_detected(tmp_path: Path) -> None:
    lines = _lines(tmp_path)
    # cut after a complete line: no end event
    check = verify_recording(_join(lines[:4]))
    assert (check.ok, check.line, check.truncated, check.events) == (False, 5, True, 3)
    # torn last line
    data = _join(lines)
    check = verify_recording(data[: len(data) - 10])
    assert (check.ok, check.line, check.truncated) == (False, len(lines), True)
    assert check.events == len(lines) - 2
    assert check.error is not None
    assert "truncated" in check.error


def test_data_after_end_and_empty(tmp_path: Path) -> None:
    lines = _lines(tmp_path)
    check = verify_recording(_join([*lines, lines[1]]))
    assert (check.ok, check.line) == (False, len(lines) + 1)
    assert verify_recording(b"").line == 1
    assert verify_recording(b"garbage\n").line == 1


def test_not_a_header(tmp_path: Path) -> None:
    obj: dict[str, object] = {"x": 1}
    from pcigate.recording import _chain

    obj["h"] = _chain("", canonical({"x": 1}))
    check = verify_recording(canonical(obj) + b"\n")
    assert (check.ok, check.line) == (False, 1)


def test_max_line(tmp_path: Path) -> None:
    v = RecordingVerifier(max_line=100)
    v.feed(b"x" * 50)
    v.feed(b"x" * 60)
    check = v.finish()
    assert (check.ok, check.line) == (False, 1)
    assert check.size == 110


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4000), max_size=20))
def test_streaming_any_chunking(tmp_path_factory: pytest.TempPathFactory, cuts: list[int]) -> None:
    tmp = tmp_path_factory.mktemp("r")
    path, sha = _write(tmp, n=30)
    data = path.read_bytes()
    v = RecordingVerifier()
    pts = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(pts):
        v.feed(data[a:b])
    check = v.finish()
    assert check.ok
    assert check.sha256 == sha
    assert check.events == 33


@given(st.binary(max_size=500))
def test_random_bytes_never_crash(data: bytes) -> None:
    check = verify_recording(data)
    assert not check.ok


def test_cap_sql() -> None:
    assert cap_sql("x" * 10) == ("x" * 10, False)
    text, cut = cap_sql("y" * (SQL_CAP + 5))
    assert cut
    assert len(text) == SQL_CAP


def test_naive_started_at_refused(tmp_path: Path) -> None:
    bad = RecordingHeader("s", "u", "t", "l", "lease", "d", datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        RecordingWriter(tmp_path / "x.rec", bad)


# -- the fast stmt path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    (1, "select 1", False, "simple", 0, 0.5, 1, "SELECT 1", None, None),
    (7, 'select "ünï\\code"\n\t\x01 -- \u2028', True, "extended", None, 12.0, None, None, "42P01",
     'relation "x" does not exist'),
    (2**40, "", False, "simple", 3, 1e-05, 0, "", "", ""),
    (3, "x", False, "simple", True, 0.25, 1, None, None, None),  # not plain: generic encoder path
])
def test_stmt_fast_path_matches_generic_event(tmp_path: Path, args: tuple[object, ...]) -> None:
    from pcigate.recording import _stmt_fields

    w = RecordingWriter(tmp_path / "a.rec", HEADER)
    w.stmt(*args)  # type: ignore[arg-type]
    w.event("stmt", **_stmt_fields(args))
    w.close()
    data = (tmp_path / "a.rec").read_bytes()
    check = verify_recording(data)
    assert check.ok, check.error
    fast, generic = (json.loads(x) for x in data.split(b"\n")[1:3])
    for o in (fast, generic):
        del o["h"], o["t"]
    assert fast == generic
    assert fast["blocked"] is None
    assert fast["e"] == "stmt"
    assert ("sql_truncated" in fast) is bool(args[2])


def test_unencodable_value_reported_at_close(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "a.rec", HEADER)
    w.event("note", v=float("nan"))
    w.event("note", v=1)
    with pytest.raises(RecordingError, match="cannot record"):
        w.close()
    check = verify_recording((tmp_path / "a.rec").read_bytes())
    assert check.ok, check.error  # the bad event is left out, the chain stays intact


def test_flush_writes_queue_in_order(tmp_path: Path) -> None:
    w = RecordingWriter(tmp_path / "a.rec", HEADER, fsync_interval=60)
    for i in range(100):
        w.stmt(1, f"select {i}", False, "simple", 0, 0.1, 1, "SELECT 1", None, None)
    w.flush()
    lines = (tmp_path / "a.rec").read_bytes().split(b"\n")
    assert len(lines) == 102
    assert [json.loads(x)["sql"] for x in lines[1:-1]] == [f"select {i}" for i in range(100)]
    w.close()
    assert verify_recording((tmp_path / "a.rec").read_bytes()).ok


# -- sealing a recording whose writer died ------------------------------------------------------------------


def _crashed_recording(tmp_path: Path, torn: bytes = b"") -> tuple[Path, bytes]:
    """A recording as a killed CLI leaves it: events flushed, no end event, maybe a torn last line."""
    from pcigate.recording import RecordingHeader, RecordingWriter

    path = tmp_path / "crashed.rec"
    w = RecordingWriter(path, RecordingHeader("s1", "alice", "prod-db", "read", "lease/1", "d" * 64,
                                              datetime.now(UTC)))
    w.event("conn", c=1, peer="127.0.0.1:5000", app="psql")
    w.stmt(1, "select 1", False, "simple", None, 0.5, 1, "SELECT 1", None, None)
    w.flush()
    intact = path.read_bytes()
    if torn:
        with path.open("ab") as fh:
            fh.write(torn)
    return path, intact


@pytest.mark.parametrize("torn", [b"", b'{"c":1,"e":"stmt","h":"ab'])
def test_seal_completes_a_crashed_recording(tmp_path: Path, torn: bytes) -> None:
    from pcigate.recording import seal_recording

    path, intact = _crashed_recording(tmp_path, torn)
    before = verify_recording(path.read_bytes())
    assert not before.ok
    assert before.truncated
    assert seal_recording(path, reason="client_lost") is True
    data = path.read_bytes()
    assert data.startswith(intact)  # nothing recorded is lost; only the torn tail goes
    check = verify_recording(data)
    assert check.ok, check.error
    assert check.events == 3
    last = json.loads(data.splitlines()[-1])
    assert last["e"] == "end"
    assert last["reason"] == "client_lost"
    assert seal_recording(path) is False  # already ended: untouched
    assert path.read_bytes() == data


def test_a_cli_killed_before_the_first_group_commit_leaves_a_sealable_recording(tmp_path: Path) -> None:
    """The header is on disk when the writer is made (CI once killed the CLI within the first 0.1 s and the
    spooled file was empty: it could never be uploaded)."""
    from pcigate.recording import RecordingHeader, RecordingWriter, seal_recording

    path = tmp_path / "killed.rec"
    RecordingWriter(path, RecordingHeader("s1", "alice", "prod-db", "read", "lease/1", "d" * 64,
                                          datetime.now(UTC)), fsync_interval=3600)
    data = path.read_bytes()  # as SIGKILL leaves it: nothing flushed by the writer
    assert data.endswith(b"\n")
    assert verify_recording(data).truncated
    assert seal_recording(path, reason="client_lost") is True
    assert verify_recording(path.read_bytes()).ok


def test_seal_leaves_a_tampered_recording_alone(tmp_path: Path) -> None:
    from pcigate.recording import seal_recording

    path, intact = _crashed_recording(tmp_path)
    tampered = intact.replace(b"select 1", b"select 2")
    path.write_bytes(tampered)
    assert seal_recording(path) is False
    assert path.read_bytes() == tampered


# -- a recording that cannot be written (disk full) ---------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs: a disk that fills up (needs root, as the suite's machines and CI have)."""
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_fails_closed_and_stops_queueing(tiny_fs: Path) -> None:
    from pcigate.recording import RecordingHeader, RecordingWriter

    failures: list[str] = []
    w = RecordingWriter(tiny_fs / "s.rec", RecordingHeader("s1", "alice", "prod-db", "read", "l", "d" * 64,
                                                           datetime.now(UTC)),
                        fsync_interval=0.01, on_failure=failures.append)
    sql = "select " + "x" * 4000
    deadline = time.monotonic() + 10
    while not w.failed and time.monotonic() < deadline:
        w.stmt(1, sql, False, "simple", None, 0.1, 1, "SELECT 1", None, None)
        time.sleep(0.001)
    assert w.failed
    assert failures
    assert "cannot write recording" in failures[0]
    queued = len(w._q)
    for _ in range(1000):  # later events are dropped, not piled up in memory
        w.stmt(1, sql, False, "simple", None, 0.1, 1, "SELECT 1", None, None)
    assert len(w._q) == queued == 0
    with pytest.raises(RecordingError, match="cannot write recording"):
        w.close()
