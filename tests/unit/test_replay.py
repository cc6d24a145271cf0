"""``pcigate replay``: the pure timeline and player (pcigate.replay) and the command around them."""

from __future__ import annotations

import hashlib
import json
import os
import select
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate import replay as rp
from pcigate.client import BrokerClient
from pcigate.errors import ExitCode, RecordingError
from pcigate.recording import RecordingHeader, RecordingWriter

PCIGATE = Path(sys.executable).parent / "pcigate"
START = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PG_HEADER = RecordingHeader(session_id="s-pg", user="alice", target="prod-db", level="read",
                            lease_id="database/creds/ro/abc", policy_digest="0" * 64, started_at=START)
SSH_HEADER = RecordingHeader(session_id="s-ssh", user="bob", target="web-1", level="ops", lease_id="ssh/x",
                             policy_digest="1" * 64, started_at=START, kind="ssh",
                             extra={"version": 2, "width": 80, "height": 24, "timestamp": 1714564800,
                                    "env": {"TERM": "xterm-256color"}})


def _clock(writer: RecordingWriter, times: list[float]) -> None:
    """Stamp the writer's events with these offsets (the last one repeats)."""
    it = iter(times)
    last = [0.0]

    def now() -> float:
        last[0] = next(it, last[0])
        return last[0]

    writer._now = now  # type: ignore[method-assign]


def _stmt(sql: str, **over: object) -> dict[str, object]:
    fields: dict[str, object] = {"c": 1, "sql": sql, "proto": "simple", "params": None, "ms": 1.25, "rows": 1,
                                 "tag": "SELECT 1", "sqlstate": None, "error": None, "blocked": None}
    fields.update(over)
    return fields


def pg_recording(tmp_path: Path, name: str = "pg.rec") -> Path:
    w = RecordingWriter(tmp_path / name, PG_HEADER)
    _clock(w, [0.0, 0.5, 1.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0])
    w.event("conn", c=1, peer="127.0.0.1:5000", app="psql")
    w.stmt(1, "select\n  1", False, "simple", None, 0.5, 1, "SELECT 1", None, None)
    w.event("stmt", **_stmt("select pan from cards", rows=2, tag="SELECT 2"))
    w.event("masked", c=1)  # as the tunnel writes it
    w.event("stmt", **_stmt("drop table cards", rows=None, tag=None, sqlstate="42501",
                            error="statement blocked by pcigate: no_ddl", blocked="no_ddl", ms=0.0))
    w.event("stmt", **_stmt("select nope", rows=None, tag=None, sqlstate="42703",
                            error='column "nope" does not exist'))
    w.event("copy", c=1, direction="out", bytes=1234, rows=10)
    w.event("cancel", c=1)
    w.event("stmt", **_stmt("select 2"))
    w.event("disconn", c=1, reason="client")
    w.close()
    return w.path


def ssh_recording(tmp_path: Path, frames: list[tuple[float, str, object]], name: str = "ssh.rec",
                  header: RecordingHeader = SSH_HEADER) -> Path:
    w = RecordingWriter(tmp_path / name, header)
    _clock(w, [t for t, _, _ in frames])
    for _, code, data in frames:
        w.cast(code, data)
    w.close()
    return w.path


SSH_FRAMES: list[tuple[float, str, object]] = [
    (0.1, "o", "$ "),
    (0.5, "i", "ls\r"),
    (0.6, "o", "ls\r\n"),
    (0.7, "o", "a.txt  b.txt\r\n$ "),
    (0.8, "r", "100x30"),
    (0.9, "x", {"e": "exit", "status": 0}),
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCIGATE_")}
    return subprocess.run([str(PCIGATE), *args], capture_output=True, text=True, env=env, timeout=30,
                          stdin=subprocess.DEVNULL)


def played(*args: str) -> tuple[int, str]:
    """(exit code, stdout exactly: no newline translation) of ``pcigate replay ARGS``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCIGATE_")}
    proc = subprocess.run([str(PCIGATE), "replay", *args], capture_output=True, env=env, timeout=30,
                          stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout.decode()


def main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         *args: str) -> tuple[int, str, str]:
    """``pcigate ARGS`` in this process (its real error handling): (exit code, stdout, stderr)."""
    import pcigate.app

    monkeypatch.setattr(sys, "argv", ["pcigate", *args])
    code = 0
    try:
        pcigate.app.main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --------------------------------------------------------------------------------------------------------
# Database timeline (pure)
# --------------------------------------------------------------------------------------------------------


def _ev(t: float, e: str, **fields: object) -> bytes:
    return json.dumps({"t": t, "e": e, **fields, "h": "x"}).encode() + b"\n"


def test_masked_joins_the_previous_statement_of_its_connection() -> None:
    lines = [
        _ev(1, "stmt", c=1, sql="select pan from cards"),
        _ev(2, "stmt", c=2, sql="select 1"),
        _ev(3, "masked", c=1),
        _ev(4, "masked", c=3),  # no statement of c3 before it: an entry of its own
        _ev(5, "end", reason="client"),
    ]
    entries = list(rp.pg_entries(lines))
    assert [(e.t, e.e, e.c, e.masked) for e in entries] == [
        (1, "stmt", 1, True), (2, "stmt", 2, None), (4, "masked", 3, None), (5, "end", None, None)]


def test_held_statements_are_capped() -> None:
    lines = [_ev(0, "stmt", c=1, sql="a"), *(_ev(i, "stmt", c=i + 1, sql="b") for i in range(1, 4)),
             _ev(5, "masked", c=1)]
    entries = list(rp.pg_entries(lines, cap=2))
    assert [e.e for e in entries] == ["stmt", "stmt", "stmt", "stmt", "masked"]  # c1's stmt went out first
    assert entries[0].masked is None


def test_lines_of_other_shapes_are_skipped() -> None:
    lines = [b"not json\n", b"[1, 2]\n", _ev(1, "stmt", c=1, sql="x"), b'{"e": "stmt"}\n', b"\xff\n"]
    assert [e.fields["sql"] for e in rp.pg_entries(lines)] == ["x"]


def test_format_statement_marks_and_sql() -> None:
    entry = rp.PgEntry(12.3456, "stmt", 4, {"sql": "select\t*\n from  cards", "ms": 3.21, "tag": "SELECT 5",
                                           "blocked": None}, masked=True)
    assert rp.format_entry(entry) == ("   +12.346s  c4        3.2ms  SELECT 5  MASKED  "
                                      "select * from cards")
    blocked = rp.PgEntry(1.0, "stmt", 1, {"sql": "drop table cards", "ms": 0.0, "sqlstate": "42501",
                                          "error": "blocked: no_ddl", "blocked": "no_ddl"})
    line = rp.format_entry(blocked)
    assert "42501 blocked: no_ddl  BLOCKED (no_ddl)  drop table cards" in line


def test_sql_is_cut_to_the_width_and_controls_are_escaped() -> None:
    entry = rp.PgEntry(0.0, "stmt", 1, {"sql": "select '\x1b[2J" + "x" * 300 + "'", "ms": 1.0, "rows": 3})
    line = rp.format_entry(entry, width=100)
    assert len(line) == 100
    assert line.endswith("…")
    assert "\x1b" not in line
    assert "\\x1b[2J" in line
    assert "3 rows" in line
    assert rp.format_entry(rp.PgEntry(0.0, "stmt", 1, {"sql": "x" * 2000})).endswith("x")


def test_other_event_lines() -> None:
    fmt = rp.format_entry
    assert fmt(rp.PgEntry(0, "conn", 1, {"peer": "127.0.0.1:1", "app": "psql"})).endswith(
        "c1    conn from 127.0.0.1:1 (psql)")
    assert fmt(rp.PgEntry(0, "disconn", 1, {"reason": "client"})).endswith("disconn (client)")
    assert fmt(rp.PgEntry(0, "copy", 1, {"direction": "out", "bytes": 5, "rows": 1})).endswith(
        "copy out: 5 bytes, 1 rows")
    assert fmt(rp.PgEntry(0, "cancel", 1, {})).endswith("cancel")
    assert fmt(rp.PgEntry(9.5, "end", None, {"reason": "client"})) == "    +9.500s  -     end (client)"
    assert fmt(rp.PgEntry(0, "weird", None, {"k": 1})).endswith('weird {"k": 1}')


def test_timeline_and_summary(tmp_path: Path) -> None:
    header, events = rp.split_header(lines_of(pg_recording(tmp_path)))
    assert header["session_id"] == "s-pg"
    assert "h" not in header
    summary = rp.PgSummary()
    text = list(rp.pg_timeline(events, summary))
    assert len(text) == 11  # conn, 5 stmts, copy, cancel, disconn, end (masked joined), summary
    assert text[-1] == "5 statements, 1 blocked, 1 masked, 2 failed, 1 connections; duration 6.000s"
    assert "MASKED  select pan from cards" in text[2]
    assert "BLOCKED (no_ddl)" in text[3]
    assert text[1].endswith("SELECT 1  select 1")


def test_pg_json_document(tmp_path: Path) -> None:
    header, events = rp.split_header(lines_of(pg_recording(tmp_path)))
    doc = json.loads("".join(rp.pg_json(header, events)))
    assert doc["kind"] == "pg"
    assert doc["session"]["user"] == "alice"
    assert "h" not in doc["session"]
    assert [s["sql"] for s in doc["statements"]] == [
        "select\n  1", "select pan from cards", "drop table cards", "select nope", "select 2"]
    assert [s["masked"] for s in doc["statements"]] == [None, True, None, None, None]
    assert doc["statements"][2]["blocked"] == "no_ddl"
    assert all("h" not in s and "e" not in s for s in doc["statements"])
    assert [e["e"] for e in doc["events"]] == ["conn", "copy", "cancel", "disconn", "end"]
    assert doc["summary"]["blocked"] == 1


def test_empty_json_lists() -> None:
    header = {"kind": "pg", "session_id": "s"}
    doc = json.loads("".join(rp.pg_json(header, [])))
    assert doc["statements"] == []
    assert doc["events"] == []


def test_split_header_refuses_what_is_no_recording() -> None:
    with pytest.raises(RecordingError):
        rp.split_header([b"garbage\n"])
    with pytest.raises(RecordingError):
        rp.split_header([])
    with pytest.raises(RecordingError):
        rp.recording_kind({"kind": "rdp"})


# --------------------------------------------------------------------------------------------------------
# Terminal player (pure)
# --------------------------------------------------------------------------------------------------------

EVENTS = [rp.CastEvent(0.5, "o", "a"), rp.CastEvent(1.0, "i", "x"), rp.CastEvent(10.0, "o", "b"),
          rp.CastEvent(10.2, "o", "c"), rp.CastEvent(11.0, "x", {"e": "exit"}), rp.CastEvent(12.0, "o", "d")]


def player(events: list[rp.CastEvent] = EVENTS, **kw: object) -> rp.Player:
    return rp.Player(lambda: iter(events), **kw)  # type: ignore[arg-type]


def test_idle_gaps_are_capped() -> None:
    frames = list(rp.output_frames(EVENTS, 2.0))
    assert [(round(t, 6), s) for t, s in frames] == [(0.5, "a"), (2.5, "b"), (2.7, "c"), (4.5, "d")]
    assert [t for t, _ in rp.output_frames(EVENTS, None)] == [0.5, 10.0, 10.2, 12.0]
    assert [t for t, _ in rp.output_frames(EVENTS, 0.0)] == [0.0, 0.0, 0.0, 0.0]


def test_idle_limit_option_beats_the_header() -> None:
    assert rp.idle_limit(None, {"idle_time_limit": 2}) == 2.0
    assert rp.idle_limit(0.5, {"idle_time_limit": 2}) == 0.5
    assert rp.idle_limit(None, {}) is None
    assert rp.idle_limit(None, {"idle_time_limit": "x"}) is None


def test_waits_scale_with_speed() -> None:
    p = player(speed=2.0, idle=2.0)
    assert p.until_next() == 0.25
    assert p.advance(0.2) == ""
    assert p.until_next() == pytest.approx(0.05)
    assert p.advance(0.05) == "a"
    assert p.until_next() == pytest.approx(1.0)  # (2.5 - 0.5) / 2
    p.command("faster")
    assert p.speed == 4.0
    assert p.until_next() == pytest.approx(0.5)
    p.command("slower")
    p.command("slower")
    assert p.speed == 1.0
    assert p.advance(100) == "bcd"
    assert p.done
    assert p.until_next() is None


def test_idle_limit_zero_plays_everything_at_once() -> None:
    p = player(idle=0.0)
    assert p.advance(0.0) == "abcd"
    assert p.done


def test_pause_and_step() -> None:
    p = player()
    assert p.command("step") == ""  # only while paused
    p.command("pause")
    assert p.until_next() is None
    assert p.advance(100) == ""
    assert p.clock == 0.0
    assert p.command("step") == "a"
    assert p.clock == 0.5
    assert p.command("step") == "b"
    p.command("pause")
    assert p.until_next() == pytest.approx(0.2)
    assert p.advance(0.2) == "c"


def test_seek_forward_and_back() -> None:
    calls = []

    def source() -> Iterator[rp.CastEvent]:
        calls.append(1)
        return iter(EVENTS)

    p = rp.Player(source)
    assert p.command("forward") == "a"
    assert p.clock == 5.0
    assert p.command("forward") == "b"  # c is at 10.2
    assert p.command("back") == rp.RESET + "a"  # at 5.0: the screen as it was then
    assert p.clock == 5.0
    assert len(calls) == 2
    assert p.command("back") == rp.RESET
    assert p.clock == 0.0
    assert p.command("back") == ""  # already at the start
    assert p.advance(12.0) == "abcd"


def test_player_refuses_a_bad_speed() -> None:
    with pytest.raises(ValueError):
        player(speed=0.0)


def test_parse_keys() -> None:
    assert rp.parse_keys(b" .+-q") == (["pause", "step", "faster", "slower", "quit"], b"")
    assert rp.parse_keys(b"\x1b[C\x1b[Dz\x1b[A") == (["forward", "back"], b"")
    assert rp.parse_keys(b"+\x1b") == (["faster"], b"\x1b")
    assert rp.parse_keys(b"\x1b[") == ([], b"\x1b[")
    assert rp.parse_keys(b"\x1bq") == (["quit"], b"")


frames_st = st.lists(st.tuples(st.floats(0, 20), st.sampled_from("oix"), st.text("ab\r\n ", max_size=4)),
                     max_size=15)


def _events(frames: list[tuple[float, str, str]]) -> list[rp.CastEvent]:
    t = 0.0
    out = []
    for gap, code, text in frames:
        t += gap
        out.append(rp.CastEvent(t, code, text))
    return out


@settings(max_examples=200, deadline=None)
@given(frames_st, st.floats(0, 100), st.floats(-100, 100), st.sampled_from([None, 0.0, 1.0, 3.0]))
def test_seek_anywhere_then_play_shows_what_playing_straight_shows(
    frames: list[tuple[float, str, str]], first: float, delta: float, idle: float | None
) -> None:
    events = _events(frames)
    straight = player(events, idle=idle).advance(1e9)
    p = player(events, idle=idle)
    before = p.advance(first)
    jump = p.seek(delta)
    rest = p.advance(1e9)
    screen = jump[len(rp.RESET):] if jump.startswith(rp.RESET) else before + jump
    assert screen + rest == straight
    assert p.done


@settings(max_examples=100, deadline=None)
@given(frames_st, st.lists(st.floats(0, 5), max_size=30), st.floats(0.1, 10))
def test_small_steps_add_up_to_the_whole(
    frames: list[tuple[float, str, str]], steps: list[float], speed: float
) -> None:
    events = _events(frames)
    p = player(events, speed=speed)
    played = "".join(p.advance(s) for s in steps) + p.advance(1e9)
    assert played == "".join(str(e.data) for e in events if e.code == "o")


def test_ssh_json_document(tmp_path: Path) -> None:
    header, events = rp.split_header(lines_of(ssh_recording(tmp_path, SSH_FRAMES)))
    doc = json.loads("".join(rp.ssh_json(header, events)))
    assert doc["kind"] == "ssh"
    assert doc["session"]["width"] == 80
    assert doc["events"][0] == [0.1, "o", "$ "]
    assert doc["events"][-1] == [0.9, "x", {"e": "end", "reason": "client"}]
    assert all(len(e) == 3 for e in doc["events"])


# --------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------


def test_pg_timeline_command(tmp_path: Path) -> None:
    proc = run("replay", "--file", str(pg_recording(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "    +0.000s  c1    conn from 127.0.0.1:5000 (psql)"
    assert any("BLOCKED (no_ddl)" in x and "drop table cards" in x for x in lines)
    assert any("MASKED" in x for x in lines)
    assert any("42703 column \"nope\" does not exist" in x for x in lines)
    assert lines[-1].startswith("5 statements, 1 blocked, 1 masked")
    assert proc.stderr == ""


def test_pg_json_command(tmp_path: Path) -> None:
    proc = run("replay", "s-pg", "--file", str(pg_recording(tmp_path)), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["session"]["session_id"] == "s-pg"
    assert len(doc["statements"]) == 5


def test_ssh_plays_the_output(tmp_path: Path) -> None:
    path = ssh_recording(tmp_path, [(0.0, "o", "one\r\n"), (30.0, "o", "two ü\r\n"), (31.0, "i", "q")])
    started = time.monotonic()
    assert played("--file", str(path), "--idle-limit", "0.1") == (0, "one\r\ntwo ü\r\n")
    assert time.monotonic() - started < 10
    assert played("--file", str(path), "--speed", "1000") == (0, "one\r\ntwo ü\r\n")


def test_ssh_json_and_cast_commands(tmp_path: Path) -> None:
    path = ssh_recording(tmp_path, SSH_FRAMES)
    doc = json.loads(run("--json", "replay", "--file", str(path)).stdout)
    assert [e[1] for e in doc["events"]] == ["o", "i", "o", "o", "r", "x", "x"]
    out = tmp_path / "out.cast"
    proc = run("replay", "--file", str(path), "--cast", str(out))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    head, *events = [json.loads(x) for x in out.read_text().splitlines()]
    assert head["version"] == 2
    assert (head["width"], head["height"]) == (80, 24)
    assert all(isinstance(e, list) and len(e) == 3 and e[1] in "oirm" for e in events)
    assert [e[2] for e in events if e[1] == "o"] == ["$ ", "ls\r\n", "a.txt  b.txt\r\n$ "]
    assert not list(tmp_path.glob(".*.partial"))


def test_cast_of_a_database_session_is_a_usage_error(tmp_path: Path) -> None:
    proc = run("replay", "--file", str(pg_recording(tmp_path)), "--cast", str(tmp_path / "x.cast"))
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.startswith("error: --cast needs a terminal (ssh) recording")
    assert not (tmp_path / "x.cast").exists()


def _tamper(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b"select pan from cards", b"select 1 from cards  "))


def test_tampered_recording_is_refused(tmp_path: Path) -> None:
    path = pg_recording(tmp_path)
    _tamper(path)
    proc = run("replay", "--file", str(path))
    assert proc.returncode == ExitCode.RECORDING_ERROR
    assert proc.stdout == ""
    first, hint = proc.stderr.splitlines()
    assert first.startswith(f"error: recording {path} fails verification at line 4: digest chain broken")
    assert hint == "hint: --force replays it anyway"
    assert "Traceback" not in proc.stderr


def test_force_replays_with_a_warning(tmp_path: Path) -> None:
    path = pg_recording(tmp_path)
    _tamper(path)
    proc = run("replay", "--file", str(path), "--force")
    assert proc.returncode == 0, proc.stderr
    assert "warning: recording" in proc.stderr
    assert "at line 4" in proc.stderr
    assert "select 1 from cards" in proc.stdout


def test_truncated_terminal_recording_with_force(tmp_path: Path) -> None:
    path = ssh_recording(tmp_path, SSH_FRAMES)
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"[0.7")] + b'[0.7,"o","cut')
    refused = run("replay", "--file", str(path))
    assert refused.returncode == ExitCode.RECORDING_ERROR
    assert "truncated" in refused.stderr
    assert played("--file", str(path), "--force", "--speed", "1000") == (0, "$ ls\r\n")


def test_usage_errors(tmp_path: Path) -> None:
    missing = run("replay", "--file", str(tmp_path / "absent.rec"))
    assert missing.returncode == ExitCode.USAGE
    assert missing.stderr == f"error: cannot read {tmp_path / 'absent.rec'}: No such file or directory\n"
    assert run("replay", "--file", str(tmp_path)).returncode == ExitCode.USAGE
    assert run("replay").stderr.startswith("error: give a SESSION id")
    other = run("replay", "s-other", "--file", str(pg_recording(tmp_path)))
    assert other.returncode == ExitCode.USAGE
    assert "session s-pg, not s-other" in other.stderr
    assert run("replay", "s", "--speed", "0").returncode == ExitCode.USAGE
    not_rec = tmp_path / "x.rec"
    not_rec.write_text("hello\n")
    assert run("replay", "--file", str(not_rec), "--force").returncode == ExitCode.RECORDING_ERROR


def test_help() -> None:
    proc = run("replay", "--help")
    assert proc.returncode == 0
    for opt in ("--file", "--speed", "--idle-limit", "--json", "--cast", "--force"):
        assert opt in proc.stdout


def test_broker_down() -> None:
    proc = subprocess.run(
        [str(PCIGATE), "--broker", "http://127.0.0.1:9", "replay", "s-1"], capture_output=True, text=True,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PCIGATE_")}, "PCIGATE_TOKEN": "x"},
        timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == ExitCode.BROKER_UNAVAILABLE
    assert proc.stderr == "error: cannot reach the broker at http://127.0.0.1:9\n"


def _serve(monkeypatch: pytest.MonkeyPatch, body: bytes | None, recorded: str | None = None) -> list[str]:
    """The command's broker: a real client over a mock transport serving ``body`` (None: 404) as the
    recording of a session whose summary says it was uploaded with SHA-256 ``recorded`` (default: body's)."""
    from pcigate.commands import replay as cmd

    asked: list[str] = []
    sha = recorded or hashlib.sha256(body or b"").hexdigest()

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        if body is None:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no session s-x"}})
        if not request.url.path.endswith("/recording"):
            sid = request.url.path.rsplit("/", 1)[1]
            return httpx.Response(200, json={
                "session_id": sid, "user": "alice", "client_kind": "human", "target": "prod-db",
                "level": "read", "status": "ended", "started_at": "2026-11-22T00:00:00Z",
                "expires_at": "2026-11-22T01:00:00Z", "lease_id": "", "lease_revoked": True,
                "recording_sha256": sha})
        return httpx.Response(200, content=body)

    monkeypatch.setattr(cmd, "broker", lambda ctx: BrokerClient(
        "http://broker.test", token=lambda: "tok", transport=httpx.MockTransport(handler)))
    return asked


def test_downloads_from_the_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    asked = _serve(monkeypatch, pg_recording(tmp_path).read_bytes())
    code, out, err = main(monkeypatch, capsys, "replay", "s-pg")
    assert code == 0, err
    assert asked == ["/v1/sessions/s-pg", "/v1/sessions/s-pg/recording"]
    assert out.splitlines()[-1].startswith("5 statements")


def test_a_download_that_is_not_what_was_uploaded_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A rewritten file with a valid chain (rebuilt by whoever could write the store) is caught by the
    digest the broker recorded when it took the upload."""
    _serve(monkeypatch, pg_recording(tmp_path).read_bytes(), recorded="0" * 64)
    code, out, err = main(monkeypatch, capsys, "replay", "s-pg")
    assert code == ExitCode.RECORDING_ERROR
    assert "SHA-256 is not the one the broker recorded at upload" in err
    assert out == ""


def test_downloaded_tampered_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = pg_recording(tmp_path)
    _tamper(path)
    _serve(monkeypatch, path.read_bytes())
    code, out, err = main(monkeypatch, capsys, "replay", "s-pg")
    assert code == ExitCode.RECORDING_ERROR
    assert err.startswith("error: recording of session s-pg fails verification at line 4")
    assert out == ""


def test_unknown_session(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _serve(monkeypatch, None)
    code, out, err = main(monkeypatch, capsys, "replay", "s-x")
    assert code == ExitCode.NOT_FOUND
    assert err == "error: no session s-x\n"
    assert out == ""


# --------------------------------------------------------------------------------------------------------
# On a terminal: keys in cbreak mode, restored at the end
# --------------------------------------------------------------------------------------------------------


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not in {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break


def test_keys_on_a_terminal(tmp_path: Path) -> None:
    path = ssh_recording(tmp_path, [(0.0, "o", "one\r\n"), (60.0, "o", "two\r\n"), (120.0, "o", "three\r\n")])
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCIGATE_")}
    proc = subprocess.Popen([str(PCIGATE), "replay", "--file", str(path)], stdin=slave, stdout=slave,
                            stderr=slave, env=env, start_new_session=True)
    try:
        seen = bytearray()
        _read_until(master, b"one", seen)
        os.write(master, b" .")  # pause, next frame
        _read_until(master, b"two", seen)
        os.write(master, b"q")
        assert proc.wait(timeout=15) == 0
        assert b"three" not in seen
        assert b"keys: space" in seen
        attrs = termios.tcgetattr(slave)
        assert attrs[3] & termios.ICANON
        assert attrs[3] & termios.ECHO
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        os.close(slave)
