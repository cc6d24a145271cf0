"""Guardrails in the PgTunnel, against a real SCRAM-only cluster through the real psql and pgbench."""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.stack.loopthread import LoopThread
from tests.stack.pgraw import raw_login, read_until
from tests.stack.postgres import PgCluster, seed_prod, start_cluster

from pcigate.errors import AccessDenied
from pcigate.models import ColumnMaskRule, DatabaseCredentials, DataPathPolicy, GuardrailRule, MaskingPolicy
from pcigate.recording import RecordingHeader, RecordingWriter, verify_recording
from pcigate.tunnel.pg import PgTunnel
from pcigate.wire import pg

pytestmark = pytest.mark.integration

APP_USER = "gr_user"
TABLE = "gr_t"

RULES = [
    GuardrailRule(name="no-drop", deny=["drop_table", "drop_schema", "drop_database"],
                  message="pcigate: dropping is not allowed at this level"),
    GuardrailRule(name="no-truncate", deny=["truncate"], message="pcigate: TRUNCATE is not allowed"),
    GuardrailRule(name="no-unbounded", deny=["delete_without_where", "update_without_where"],
                  message="pcigate: DELETE/UPDATE need a WHERE clause"),
    GuardrailRule(name="no-admin", deny=["alter_system", "grant", "revoke", "role_admin"],
                  message="pcigate: no administration through this session"),
    GuardrailRule(name="no-program", deny=["copy_program", "copy_file"],
                  message="pcigate: COPY to or from a program or server file is not allowed"),
    GuardrailRule(name="no-do", deny=["do_block"], message="pcigate: DO blocks are not allowed"),
]
MESSAGES = {r.name: r.message or "" for r in RULES}

# (sql, rule expected to block it)
BYPASS = [
    (f"DROP TABLE {TABLE}", "no-drop"),
    (f'drop   table   "{TABLE}"', "no-drop"),
    (f"/* harmless */ DrOp /* really */ TABLE public.{TABLE} CASCADE", "no-drop"),
    ('DROP TABLE U&"gr\\005ft"', "no-drop"),
    ("DROP SCHEMA public CASCADE", "no-drop"),
    (f"TRUNCATE {TABLE}", "no-truncate"),
    (f"truncate table only {TABLE} restart identity", "no-truncate"),
    (f"DELETE FROM {TABLE}", "no-unbounded"),
    (f"delete from {TABLE} -- where id = 1", "no-unbounded"),
    (f"DELETE FROM {TABLE} AS x /* WHERE x.id = 1 */", "no-unbounded"),
    (f"UPDATE {TABLE} SET v = 'gone'", "no-unbounded"),
    ("ALTER SYSTEM SET work_mem = '64MB'", "no-admin"),
    (f"GRANT ALL ON {TABLE} TO PUBLIC", "no-admin"),
    (f"REVOKE SELECT ON {TABLE} FROM PUBLIC", "no-admin"),
    (f"COPY {TABLE} TO PROGRAM 'cat > /dev/null'", "no-program"),
    (f"copy (select * from {TABLE}) to program $$cat$$", "no-program"),
    (f"DO $$ BEGIN DELETE FROM {TABLE} WHERE id = 1; END $$", "no-do"),
    (f"DO $body$BEGIN EXECUTE 'DROP TABLE {TABLE}'; END$body$ LANGUAGE plpgsql", "no-do"),
    (f"WITH d AS (DELETE FROM {TABLE} RETURNING *) SELECT count(*) FROM d", "no-unbounded"),
    (f"SELECT 1; SELECT 2; DROP TABLE {TABLE}", "no-drop"),
    (f"SELECT 'a;'; DELETE FROM {TABLE}", "no-unbounded"),
    (f"select E'\\''; delete from {TABLE}", "no-unbounded"),
    (f"SELECT $q$ ; $q$; TRUNCATE {TABLE}", "no-truncate"),
    (f"INSERT INTO {TABLE} VALUES (9, 'x'); TRUNCATE {TABLE}", "no-truncate"),
    (f"PREPARE x AS DELETE FROM {TABLE}", "no-unbounded"),
    (f"PREPARE y AS DELETE FROM {TABLE}; EXECUTE y", "no-unbounded"),
    (f"EXPLAIN ANALYZE DELETE FROM {TABLE}", "no-unbounded"),
]
# look dangerous to a regular expression, harmless to the parser
HARMLESS = [
    f"SELECT $$; DROP TABLE {TABLE}; $$",
    f"SELECT 'DELETE FROM {TABLE}'",
    f"SELECT count(*) FROM {TABLE} /* TRUNCATE {TABLE} */",
    f"DELETE FROM {TABLE} WHERE id = 12345",
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[PgCluster, str]]:
    c = start_cluster()
    try:
        seed_prod(c)
        password = secrets.token_urlsafe(24)
        c.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{password}'")
        c.psql(f"GRANT ALL ON DATABASE prod TO {APP_USER}")
        c.psql(f"GRANT ALL ON SCHEMA public TO {APP_USER}", database="prod")
        yield c, password
    finally:
        c.stop()


def reset_table(c: PgCluster) -> None:
    c.psql(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int PRIMARY KEY, v text); "
           f"INSERT INTO {TABLE} VALUES (1, 'a'), (2, 'b'), (3, 'c'); "
           f"ALTER TABLE {TABLE} OWNER TO {APP_USER}", database="prod")


def intact(c: PgCluster) -> bool:
    return c.psql(f"SELECT string_agg(id || v, ',' ORDER BY id) FROM {TABLE}", database="prod") == "1a,2b,3c"


class Session:
    def __init__(self, loop: LoopThread, tmp: Path, cluster: tuple[PgCluster, str],
                 rules: list[GuardrailRule] | None, name: str = "s") -> None:
        c, pw = cluster
        self.loop = loop
        self.secret = secrets.token_urlsafe(32)
        self.rec_path = tmp / name / "s.rec"
        header = RecordingHeader("sess-g", "alice", "prod-db", "write", "lease-1", "d" * 64,
                                 datetime.now(UTC))
        self.recorder = RecordingWriter(self.rec_path, header)
        creds = DatabaseCredentials(host="127.0.0.1", port=c.port, database="prod", username=APP_USER,
                                    password=pw, sslmode="prefer")
        policy = DataPathPolicy(guardrails=rules) if rules is not None else None
        self.tunnel = PgTunnel(creds, self.secret, self.recorder, policy=policy)
        self.port = loop.run(self.tunnel.start())
        self.passfile = tmp / name / "pgpass"
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"127.0.0.1:{self.port}:*:*:{self.secret}\n".encode())
        os.close(fd)
        self.closed = False

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSFILE=str(self.passfile), PGCONNECT_TIMEOUT="10")
        return env

    def psql(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.port), "-d", "prod", "-v", "ON_ERROR_STOP=1",
                "-v", "VERBOSITY=verbose", "-At", *args]
        return subprocess.run(argv, env=self.env(), input=input, capture_output=True, text=True, timeout=60)

    def pgbench(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-n", *args, "prod"],
                              env=self.env(), capture_output=True, text=True, timeout=120)

    def finish(self) -> list[dict[str, Any]]:
        self.loop.run(self.tunnel.close())
        self.recorder.close()
        self.closed = True
        data = self.rec_path.read_bytes()
        check = verify_recording(data)
        assert check.ok, (check.error, check.line)
        return [json.loads(x) for x in data.splitlines()]

    def close(self) -> None:
        if not self.closed:
            self.loop.run(self.tunnel.close())
            self.recorder.close()


@pytest.fixture
def make_session(cluster: tuple[PgCluster, str], loop: LoopThread, tmp_path: Path) -> Iterator[Any]:
    made: list[Session] = []

    def make(rules: list[GuardrailRule] | None, name: str = "s") -> Session:
        s = Session(loop, tmp_path, cluster, rules, name)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def stmts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("e") == "stmt"]


# -- simple protocol through psql ------------------------------------------------------------------------


def test_bypass_corpus_blocked_through_psql(make_session: Any, cluster: tuple[PgCluster, str]) -> None:
    c, _ = cluster
    reset_table(c)
    s = make_session(RULES)
    for sql, rule in BYPASS:
        # the same connection goes on after the block: the next statement runs
        proc = s.psql("-c", sql, "-c", "SELECT 'still here'")
        assert proc.returncode != 0, sql
        assert f"ERROR:  42501: {MESSAGES[rule]}" in proc.stderr, (sql, proc.stderr)
        assert intact(c), sql
        proc = s.psql("-v", "ON_ERROR_STOP=0", "-c", sql, "-c", "SELECT 'still here'")
        assert "still here" in proc.stdout, (sql, proc.stderr)
    for sql in HARMLESS:
        proc = s.psql("-c", sql)
        assert proc.returncode == 0, (sql, proc.stderr)
    assert intact(c)
    assert c.psql("SHOW work_mem") != "64MB"
    events = s.finish()
    blocked = [e for e in stmts(events) if e["blocked"] is not None]
    expected = [(sql, rule) for sql, rule in BYPASS for _ in (1, 2)]
    assert [(e["sql"], e["blocked"]) for e in blocked] == expected
    for e in blocked:
        assert (e["sqlstate"], e["proto"], e["rows"], e["tag"]) == ("42501", "simple", None, None)
        assert e["error"] == MESSAGES[e["blocked"]]
    ran = [e["sql"] for e in stmts(events) if e["blocked"] is None]
    assert ran.count("SELECT 'still here'") == len(BYPASS)
    assert set(HARMLESS) <= set(ran)
    assert s.tunnel.stats.blocked == 2 * len(BYPASS)
    assert s.tunnel.errors == []


def test_same_statements_allowed_when_rule_off(make_session: Any, cluster: tuple[PgCluster, str]) -> None:
    """The guarded path, with a rule that names none of the corpus's classes, forwards them all."""
    c, _ = cluster
    s = make_session([GuardrailRule(name="no-call", deny=["call"])])
    for sql, rule in BYPASS:
        reset_table(c)
        proc = s.psql("-c", sql)
        # forwarded: they run (or fail in the server, for want of superuser rights), never blocked by us
        assert MESSAGES[rule] not in proc.stderr, sql
        if proc.returncode == 0 and rule in ("no-drop", "no-truncate", "no-unbounded") \
                and not sql.startswith("PREPARE x"):
            assert not (c.psql(f"SELECT to_regclass('{TABLE}') IS NOT NULL", database="prod") == "t"
                        and intact(c)), sql
    events = s.finish()
    assert all(e["blocked"] is None for e in stmts(events))
    assert {e["sql"] for e in stmts(events)} >= {sql for sql, _ in BYPASS}
    c.psql("CREATE SCHEMA IF NOT EXISTS public", database="prod")
    c.psql(f"GRANT ALL ON SCHEMA public TO {APP_USER}", database="prod")


def test_unparseable_denied(make_session: Any, cluster: tuple[PgCluster, str]) -> None:
    c, _ = cluster
    reset_table(c)
    s = make_session(RULES)
    proc = s.psql("-c", "SELEC 1 FROM")
    assert proc.returncode != 0
    assert "ERROR:  42501: pcigate: statement blocked: it could not be parsed" in proc.stderr
    # bytes that are not valid in the client encoding (UTF8) cannot be judged: denied
    sock = raw_login(s.port, s.secret)
    sock.sendall(pg.message(b"Q", b"SELECT '\xff\xfe'\x00"))
    msgs = read_until(sock, b"Z", nothing_after=True)
    assert [m[0] for m in msgs] == [ord("E"), ord("Z")]
    assert pg.parse_error_fields(msgs[0][1])["C"] == "42501"
    sock.sendall(pg.query("SELECT 41 + 1"))
    assert any(t == ord("D") and b"42" in b for t, b in read_until(sock, b"Z", nothing_after=True))
    sock.close()
    events = s.finish()
    assert [e["blocked"] for e in stmts(events) if e["blocked"]] == ["unparseable", "unparseable"]


def test_start_refuses_unsupported_masking_but_accepts_guardrails(cluster: tuple[PgCluster, str],
                                                      loop: LoopThread) -> None:
    c, pw = cluster
    creds = DatabaseCredentials(host="127.0.0.1", port=c.port, database="prod", username=APP_USER,
                                password=pw)
    hashing = MaskingPolicy(columns=[ColumnMaskRule(column="email", action="hash")])  # no key yet: refused
    t = PgTunnel(creds, "x", None, policy=DataPathPolicy(masking=hashing, guardrails=RULES))
    with pytest.raises(AccessDenied):
        loop.run(t.start())
    t2 = PgTunnel(creds, "x", None, policy=DataPathPolicy(guardrails=RULES))
    assert loop.run(t2.start()) > 0
    loop.run(t2.close())


# -- extended protocol -------------------------------------------------------------------------------------


def parse(sql: str, name: str = "") -> bytes:
    return pg.message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))


def bind(stmt: str = "", portal: str = "") -> bytes:
    return pg.message(b"B", portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!HHH", 0, 0, 0))


def execute(portal: str = "") -> bytes:
    return pg.message(b"E", portal.encode() + b"\0" + struct.pack("!I", 0))


SYNC = pg.message(b"S")
FLUSH = pg.message(b"H")


def types(msgs: list[tuple[int, bytes]]) -> str:
    return "".join(chr(t) for t, _ in msgs)


def test_raw_extended_protocol(make_session: Any, cluster: tuple[PgCluster, str]) -> None:
    c, _ = cluster
    reset_table(c)
    s = make_session(RULES)
    sock = raw_login(s.port, s.secret)
    # a denied Parse: ErrorResponse 42501, the rest of the batch dropped, its Sync answered
    sock.sendall(parse(f"DELETE FROM {TABLE}") + bind() + execute() + SYNC)
    msgs = read_until(sock, b"Z", nothing_after=True)
    assert types(msgs) == "EZ"
    f = pg.parse_error_fields(msgs[0][1])
    assert (f["S"], f["C"], f["M"]) == ("ERROR", "42501", MESSAGES["no-unbounded"])
    assert msgs[1][1] == b"I"
    # the connection goes on
    sock.sendall(parse(f"SELECT count(*) FROM {TABLE}") + bind() + execute() + SYNC)
    msgs = read_until(sock, b"Z", nothing_after=True)
    assert types(msgs) == "12DCZ"
    assert msgs[2][1].endswith(b"3")
    # a batch whose allowed prefix is in the same packet as the denied Parse (pipelining)
    sock.sendall(parse("SELECT 1") + bind() + execute() + parse(f"TRUNCATE {TABLE}") + bind() + execute()
                 + parse("SELECT 2") + bind() + execute() + SYNC)
    msgs = read_until(sock, b"Z", nothing_after=True)
    assert types(msgs) == "12DCEZ"
    assert pg.parse_error_fields(msgs[4][1])["C"] == "42501"
    # the prefix reached the server in an earlier read (Flush): the tunnel ends it with its own Sync, whose
    # ReadyForQuery the client never sees
    sock.sendall(pg.query("BEGIN"))
    assert types(read_until(sock, b"Z", nothing_after=True))[-1] == "Z"
    sock.sendall(parse(f"INSERT INTO {TABLE} VALUES (4, 'd')") + bind() + execute() + FLUSH)
    assert types(read_until(sock, b"C", nothing_after=True)) == "12C"
    sock.sendall(parse(f"DROP TABLE {TABLE}") + bind() + execute() + SYNC)
    msgs = read_until(sock, b"Z", nothing_after=True)
    assert types(msgs) == "EZ"
    assert msgs[1][1] == b"T"  # still in the transaction the server reported
    sock.sendall(pg.query("ROLLBACK"))
    assert types(read_until(sock, b"Z", nothing_after=True))[-1] == "Z"
    # in a transaction block, a blocked simple Query keeps the status
    sock.sendall(pg.query("BEGIN; SELECT 1"))
    read_until(sock, b"Z", nothing_after=True)
    sock.sendall(pg.query(f"DELETE FROM {TABLE}"))
    msgs = read_until(sock, b"Z", nothing_after=True)
    assert types(msgs) == "EZ"
    assert msgs[1][1] == b"T"
    sock.sendall(pg.query("COMMIT"))
    read_until(sock, b"Z", nothing_after=True)
    # protocol-level named statement, then SQL EXECUTE and DEALLOCATE
    sock.sendall(parse(f"SELECT v FROM {TABLE} WHERE id = 1", "named") + SYNC)
    assert types(read_until(sock, b"Z", nothing_after=True)) == "1Z"
    sock.sendall(pg.query("EXECUTE named; DEALLOCATE named"))
    assert "D" in types(read_until(sock, b"Z", nothing_after=True))
    sock.sendall(pg.message(b"X"))
    sock.close()
    assert intact(c)
    events = s.finish()
    blocked = [(e["sql"], e["proto"], e["blocked"]) for e in stmts(events) if e["blocked"]]
    assert blocked == [
        (f"DELETE FROM {TABLE}", "extended", "no-unbounded"),
        (f"TRUNCATE {TABLE}", "extended", "no-truncate"),
        (f"DROP TABLE {TABLE}", "extended", "no-drop"),
        (f"DELETE FROM {TABLE}", "simple", "no-unbounded"),
    ]
    ran = [e["sql"] for e in stmts(events) if not e["blocked"]]
    assert "SELECT 2" not in ran  # dropped with the rest of the denied batch
    assert "SELECT 1" in ran
    assert s.tunnel.errors == []


def test_prepare_execute_blocked(make_session: Any, cluster: tuple[PgCluster, str]) -> None:
    c, _ = cluster
    reset_table(c)
    s = make_session(RULES)
    proc = s.psql("-v", "ON_ERROR_STOP=0", "-c", f"PREPARE x AS DELETE FROM {TABLE}", "-c", "EXECUTE x")
    assert proc.stderr.count("42501") == 1  # the PREPARE is blocked; EXECUTE x then names nothing
    assert "prepared statement \"x\" does not exist" in proc.stderr
    proc = s.psql("-c", f"PREPARE x AS DELETE FROM {TABLE}; EXECUTE x;")
    assert MESSAGES["no-unbounded"] in proc.stderr
    # an allowed prepared statement runs through EXECUTE
    proc = s.psql("-c", f"PREPARE ok AS SELECT count(*) FROM {TABLE}", "-c", "EXECUTE ok")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "3"
    assert intact(c)
    s.finish()


@pytest.fixture
def pgbench_tables(cluster: tuple[PgCluster, str]) -> None:
    c, _ = cluster
    if c.psql("SELECT to_regclass('pgbench_accounts') IS NOT NULL", database="prod") != "t":
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", "prod"], env=c.env, check=True, capture_output=True)
        c.psql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}", database="prod")


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pgbench_extended_denied_then_allowed(make_session: Any, cluster: tuple[PgCluster, str],
                                              pgbench_tables: None, tmp_path: Path, mode: str) -> None:
    c, _ = cluster
    reset_table(c)
    s = make_session(RULES)
    bad = tmp_path / "bad.sql"
    bad.write_text(f"DELETE FROM {TABLE};\n")
    proc = s.pgbench("-M", mode, "-t", "1", "-f", str(bad))
    assert proc.returncode != 0
    assert MESSAGES["no-unbounded"] in proc.stderr
    assert intact(c)
    proc = s.pgbench("-M", mode, "-S", "-c", "2", "-t", "50")
    assert proc.returncode == 0, proc.stderr
    events = s.finish()
    ext = [e for e in stmts(events) if e["proto"] == "extended"]
    assert [(e["sql"], e["blocked"], e["sqlstate"]) for e in ext if e["blocked"]] == [
        (f"DELETE FROM {TABLE};", "no-unbounded", "42501")]
    ok = [e for e in ext if not e["blocked"] and e["sqlstate"] is None]
    assert len(ok) == 100
    # -M prepared binds the statement whose Parse was denied: the server answers as for a failed Parse
    assert [e["sqlstate"] for e in ext if not e["blocked"] and e["sqlstate"]] == (
        ["26000"] if mode == "prepared" else [])
    assert all(e["rows"] == 1 and e["tag"] == "SELECT 1" for e in ok)


def _tps(out: str) -> float:
    m = re.search(r"tps = ([0-9.]+)", out)
    assert m, out
    return float(m.group(1))


def test_pgbench_select_only_with_rules(make_session: Any, pgbench_tables: None) -> None:
    """Works, and reports numbers (no timing assertion). -M simple sends a new text per transaction (the aid
    is a literal), so every statement is parsed; -M prepared parses once and the cache is not even asked."""
    results: dict[str, float] = {}
    for mode in ("simple", "extended", "prepared"):
        for name, rules in (("off", None), ("on", RULES)):
            s = make_session(rules, f"{mode}-{name}")
            t0 = time.monotonic()
            proc = s.pgbench("-S", "-M", mode, "-c", "4", "-j", "2", "-T", "3")
            assert proc.returncode == 0, proc.stderr
            results[f"{mode}/{name}"] = _tps(proc.stdout)
            assert time.monotonic() - t0 < 60
            events = s.finish()
            assert not [e for e in stmts(events) if e["blocked"]]
            assert s.tunnel.errors == []
            if rules and mode == "extended":
                info = s.tunnel.guard.cache_info()
                assert info.hits > info.misses
    print(f"\npgbench -S tps through the tunnel: {results}")
