"""Masking in the PgTunnel, against a real SCRAM-only cluster through the real psql and pgbench: PANs of
several brands (contiguous, spaced, dashed, inside text and JSON), CVV and track-2 data in result rows, COPY
OUT (text, CSV, binary), a unique-violation DETAIL and a NOTICE, and the recording."""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from tests.stack.loopthread import LoopThread
from tests.stack.pgraw import datarow_fields, raw_login, read_until
from tests.stack.postgres import PgCluster, seed_prod, start_cluster

from pcigate.errors import AccessDenied
from pcigate.masking import float8_text, luhn_ok
from pcigate.models import ColumnMaskRule, DatabaseCredentials, DataPathPolicy, GuardrailRule, MaskingPolicy
from pcigate.recording import RecordingHeader, RecordingWriter, verify_recording
from pcigate.tunnel.pg import PgTunnel
from pcigate.wire import pg

pytestmark = pytest.mark.integration

APP_USER = "mk_user"
TABLE = "mk_cards"


def _with_check(prefix: str) -> str:
    """``prefix`` + the Luhn check digit."""
    for d in "0123456789":
        if luhn_ok((prefix + d).encode()):
            return prefix + d
    raise AssertionError(prefix)


# (brand, PAN): every major brand's lengths
PANS = [
    ("visa16", "4111111111111111"),
    ("visa13", "4222222222222"),
    ("visa19", _with_check("411111111111111111")),
    ("mastercard", "5555555555554444"),
    ("mastercard2", "2223003122003222"),
    ("amex", "378282246310005"),
    ("discover", "6011111111111117"),
    ("diners14", "30569309025904"),
    ("jcb", "3530111333300000"),
    ("unionpay19", _with_check("620000000000000000")),
    ("maestro", "6759649826438453"),
]
for _b, _p in PANS:
    assert luhn_ok(_p.encode()), _b


def spaced(p: str) -> str:
    return " ".join(p[i : i + 4] for i in range(0, len(p), 4))


def dashed(p: str) -> str:
    return "-".join(p[i : i + 4] for i in range(0, len(p), 4))


def truncated(s: str) -> str:
    """First 6 and last 4 digits kept, the digits between starred, separators kept."""
    digits = [i for i, ch in enumerate(s) if ch.isdigit()]
    keep = set(digits[:6]) | set(digits[-4:])
    return "".join(ch if (not ch.isdigit() or i in keep) else "*" for i, ch in enumerate(s))


TRACK2 = ";4111111111111111=25121010000012300000?"
NOT_A_PAN = "4111111111111112"  # fails Luhn: left alone


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[PgCluster, str]]:
    c = start_cluster()
    try:
        seed_prod(c)
        password = secrets.token_urlsafe(24)
        c.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{password}'")
        c.psql(f"GRANT ALL ON DATABASE prod TO {APP_USER}")
        c.psql(f"GRANT ALL ON SCHEMA public TO {APP_USER}", database="prod")
        rows = []
        for i, (brand, p) in enumerate(PANS, start=1):
            note = f"order {i} paid with {spaced(p)} by {brand}"
            doc = json.dumps({"brand": brand, "card": dashed(p), "qty": 2})
            rows.append(f"({i}, '{p}', '{note}', '{doc}', '{i:03d}', '{TRACK2}')")
        c.psql(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int PRIMARY KEY, pan text UNIQUE, "
               f"note text, doc jsonb, cvv text, track text); INSERT INTO {TABLE} VALUES {', '.join(rows)}, "
               f"(100, '{NOT_A_PAN}', 'phone +1 415 555 0100', '{{}}', '999', 'none'); "
               f"ALTER TABLE {TABLE} OWNER TO {APP_USER}", database="prod")
        yield c, password
    finally:
        c.stop()


class Session:
    def __init__(self, loop: LoopThread, tmp: Path, cluster: tuple[PgCluster, str],
                 policy: DataPathPolicy | None, name: str = "s", masking_key: bytes | None = None) -> None:
        c, pw = cluster
        self.loop = loop
        self.secret = secrets.token_urlsafe(32)
        self.rec_path = tmp / name / "s.rec"
        header = RecordingHeader("sess-m", "alice", "prod-db", "read", "lease-1", "d" * 64, datetime.now(UTC))
        self.recorder = RecordingWriter(self.rec_path, header)
        creds = DatabaseCredentials(host="127.0.0.1", port=c.port, database="prod", username=APP_USER,
                                    password=pw, sslmode="prefer")
        self.tunnel = PgTunnel(creds, self.secret, self.recorder, policy=policy, masking_key=masking_key)
        loop.run(self.tunnel.check_upstream())  # as the CLI does: also reads the masked columns' origins
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

    def argv(self, *args: str) -> list[str]:
        return ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.port), "-d", "prod", "-v", "ON_ERROR_STOP=1",
                *args]

    def psql(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env(), capture_output=True, text=True, timeout=60)

    def psql_bytes(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), env=self.env(), capture_output=True, timeout=60)

    def pgbench(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-n", *args, "prod"],
                              env=self.env(), capture_output=True, text=True, timeout=120)

    def finish(self) -> bytes:
        self.loop.run(self.tunnel.close())
        self.recorder.close()
        self.closed = True
        data = self.rec_path.read_bytes()
        check = verify_recording(data)
        assert check.ok, (check.error, check.line)
        return data

    def close(self) -> None:
        if not self.closed:
            self.loop.run(self.tunnel.close())
            self.recorder.close()


@pytest.fixture
def make_session(cluster: tuple[PgCluster, str], loop: LoopThread, tmp_path: Path) -> Iterator[Any]:
    made: list[Session] = []

    def make(policy: DataPathPolicy | None, name: str = "s", masking_key: bytes | None = None) -> Session:
        s = Session(loop, tmp_path, cluster, policy, name, masking_key)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


MASKING = DataPathPolicy(masking=MaskingPolicy(pan="truncate"))
# COPY OUT is only served without column rules (COPY output has no column names): pattern masking only.
PATTERN_ONLY = DataPathPolicy(masking=MaskingPolicy(pan="truncate", sensitive_columns=[]))
CLEAR_FORMS = [f(p) for _, p in PANS for f in (str, spaced, dashed)]


def assert_no_clear_pan(text: str | bytes, *, luhn_scan: bool = True) -> None:
    data = text.encode() if isinstance(text, str) else text
    for form in CLEAR_FORMS:
        assert form.encode() not in data, form
    assert TRACK2.encode() not in data
    if not luhn_scan:
        return
    # no clear PAN hides in another form: every 13-19 digit window of a contiguous run fails Luhn
    for m in re.finditer(rb"(?<![0-9])[0-9]{13,19}(?![0-9])", data):
        assert not luhn_ok(m.group()) or m.group() == NOT_A_PAN.encode(), m.group()


def test_select_masked_through_psql(make_session: Any) -> None:
    s = make_session(MASKING)
    sql = f"SELECT id, pan, note, doc::text, cvv, track FROM {TABLE} ORDER BY id"
    proc = s.psql("-A", "-F", "|", "-c", sql)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    # well-formed: header, one line per row, the row count footer
    assert lines[0] == "id|pan|note|doc|cvv|track"
    assert lines[-1] == f"({len(PANS) + 1} rows)"
    rows = [ln.split("|") for ln in lines[1:-1]]
    assert len(rows) == len(PANS) + 1
    for (brand, p), row in zip(PANS, rows, strict=False):
        assert row[1] == truncated(p), brand
        assert (row[1][:6], row[1][-4:], set(row[1][6:-4])) == (p[:6], p[-4:], {"*"})
        assert truncated(spaced(p)) in row[2], brand
        assert json.loads(row[3])["card"] == truncated(dashed(p)), brand
        assert row[4] == "***"  # cvv: a sensitive column, fully starred
        assert row[5] == "*" * len(TRACK2)  # track 2 data: every byte starred
    assert rows[-1][1] == NOT_A_PAN  # not Luhn-valid: left alone
    assert rows[-1][2] == "phone +1 415 555 0100"
    assert rows[-1][4] == "***"
    assert_no_clear_pan(out)
    # the same query without the tunnel's masking shows the clear data (the table really holds it)
    plain = make_session(None, "plain").psql("-At", "-c", f"SELECT pan FROM {TABLE} WHERE id = 1")
    assert plain.stdout.strip() == PANS[0][1]
    # the recording marks the statement whose results were masked, and only that one
    s.psql("-c", "SELECT 1")
    events = [json.loads(x) for x in s.finish().splitlines()[1:]]
    marked = [events[i - 1]["sql"] for i, e in enumerate(events) if e["e"] == "masked"]
    assert marked == [sql]
    assert all(e["c"] == events[i - 1]["c"] for i, e in enumerate(events) if e["e"] == "masked")


def test_copy_out_refused_under_column_rules(make_session: Any) -> None:
    """The default policy redacts cvv-like columns by name; COPY output has no names, so a cvv column could
    not be told apart: COPY TO STDOUT is refused (fail closed) rather than leak it."""
    s = make_session(MASKING)
    proc = s.psql("-c", f"COPY (SELECT id, pan, cvv FROM {TABLE} ORDER BY id) TO STDOUT")
    assert proc.returncode != 0
    assert "COPY TO STDOUT is refused" in proc.stderr
    assert proc.stdout.strip() == ""  # not one row went out


def test_copy_out_masked(make_session: Any) -> None:
    s = make_session(PATTERN_ONLY)
    for opts in ("", "(FORMAT csv)"):
        # track data in its own COPY: see test_copy_line_with_track_and_overlapping_pan_windows
        for cols in ("id, pan, note, doc", "id, track"):
            proc = s.psql("-c", f"COPY (SELECT {cols} FROM {TABLE} ORDER BY id) TO STDOUT {opts}")
            assert proc.returncode == 0, proc.stderr
            assert_no_clear_pan(proc.stdout)
            lines = proc.stdout.splitlines()
            assert len(lines) == len(PANS) + 1
            for (_, p), line in zip(PANS, lines, strict=False):
                if "track" in cols:
                    assert "*" * len(TRACK2) in line
                else:
                    assert truncated(p) in line
                    assert truncated(spaced(p)) in line
                    assert truncated(dashed(p)) in line
            if "track" not in cols:
                assert NOT_A_PAN in lines[-1]
    binary = f"COPY (SELECT id, pan, note FROM {TABLE} ORDER BY id) TO STDOUT (FORMAT binary)"
    proc_b = s.psql_bytes("-c", binary)
    assert proc_b.returncode == 0, proc_b.stderr
    assert proc_b.stdout.startswith(b"PGCOPY\n\xff\r\n\x00")
    assert_no_clear_pan(proc_b.stdout)
    for _, p in PANS:
        assert truncated(p).encode() in proc_b.stdout
    # the masked binary COPY is still well-formed: it loads back
    load = subprocess.run(s.argv("-c", f"CREATE TABLE {TABLE}_b (id int, pan text, note text)",
                                 "-c", f"COPY {TABLE}_b FROM STDIN (FORMAT binary)",
                                 "-c", f"SELECT count(*), min(pan) FROM {TABLE}_b", "-At"),
                          env=s.env(), input=proc_b.stdout, capture_output=True, timeout=60)
    try:
        assert load.returncode == 0, load.stderr
        last = load.stdout.decode().strip().splitlines()[-1]
        assert last == f"{len(PANS) + 1}|{truncated('2223003122003222')}"
    finally:
        s.psql("-c", f"DROP TABLE IF EXISTS {TABLE}_b")


def test_error_and_notice_masked_and_recording_clean(make_session: Any) -> None:
    s = make_session(MASKING)
    p = PANS[0][1]
    proc = s.psql("-v", "VERBOSITY=verbose", "-c", f"INSERT INTO {TABLE} (id, pan) VALUES (999, '{p}')")
    assert proc.returncode != 0
    assert "23505" in proc.stderr
    assert "already exists" in proc.stderr
    assert f"Key (pan)=({truncated(p)})" in proc.stderr, proc.stderr
    assert_no_clear_pan(proc.stderr)
    amex = PANS[5][1]
    proc = s.psql("-c", f"DO $$BEGIN RAISE NOTICE 'charged %', '{spaced(amex)}'; END$$")
    assert proc.returncode == 0, proc.stderr
    assert f"charged {truncated(spaced(amex))}" in proc.stderr
    assert_no_clear_pan(proc.stderr)
    proc = s.psql("-c", f"SELECT 1 WHERE '{dashed(PANS[3][1])}' = 'x'", "-c", f"SELECT '{TRACK2}'::int")
    assert proc.returncode != 0
    # psql echoes its own copy of the query ("LINE 1: …"); the server's message is masked
    server_lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("LINE ", " "))]
    assert f'"{"*" * len(TRACK2)}"' in "\n".join(server_lines), proc.stderr
    assert_no_clear_pan("\n".join(server_lines))
    s.psql("-c", f"SELECT * FROM {TABLE}")
    data = s.finish()
    assert_no_clear_pan(data, luhn_scan=False)  # the whole file: no stored PAN in any clear form
    # and no Luhn-valid digit run in what was recorded; the running SHA-256 digests ("h", hex) are left out
    # of this scan: a random hex digest contains a Luhn-valid 13-digit run now and then
    content = b"\n".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "h"}).encode()
        for line in data.splitlines()
    )
    assert_no_clear_pan(content)
    events = [json.loads(x) for x in data.splitlines()]
    st = [e for e in events if e.get("e") == "stmt"]
    assert any(e["sqlstate"] == "23505" and truncated(p) in e["sql"] for e in st)
    assert any(e["sqlstate"] == "22P02" for e in st)  # invalid input syntax: its message quoted the track
    assert s.tunnel.errors == []


def test_pgbench_with_masking(make_session: Any, cluster: tuple[PgCluster, str]) -> None:
    c, _ = cluster
    if c.psql("SELECT to_regclass('pgbench_accounts') IS NOT NULL", database="prod") != "t":
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", "prod"], env=c.env, check=True, capture_output=True)
        c.psql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}", database="prod")
    s = make_session(MASKING)
    for mode in ("simple", "extended", "prepared"):
        proc = s.pgbench("-M", mode, "-S", "-c", "2", "-t", "200")
        assert proc.returncode == 0, (mode, proc.stderr)
        assert "number of failed transactions: 0" in proc.stdout, proc.stdout
    assert s.tunnel.errors == []


def test_masking_with_guardrails_and_column_rules(make_session: Any) -> None:
    pol = DataPathPolicy(masking=MaskingPolicy(pan="redact", columns=[ColumnMaskRule(column="note")]),
                         guardrails=[GuardrailRule(name="no-drop", deny=["drop_table"])])
    s = make_session(pol)
    proc = s.psql("-At", "-c", f"SELECT pan, note, cvv FROM {TABLE} WHERE id = 2")
    assert proc.returncode == 0, proc.stderr
    pan, note, cvv = proc.stdout.strip().split("|")
    assert pan == "*" * len(PANS[1][1])
    assert set(note) == {"*"}
    assert cvv == "***"
    proc = s.psql("-v", "VERBOSITY=verbose", "-c", f"DROP TABLE {TABLE}")
    assert proc.returncode != 0
    assert "42501" in proc.stderr, proc.stderr
    assert s.psql("-At", "-c", f"SELECT count(*) FROM {TABLE}").stdout.strip() == str(len(PANS) + 1)


def test_hash_rules_need_the_masking_key(cluster: tuple[PgCluster, str], loop: LoopThread) -> None:
    c, pw = cluster
    creds = DatabaseCredentials(host="127.0.0.1", port=c.port, database="prod", username=APP_USER,
                                password=pw)
    pol = DataPathPolicy(masking=MaskingPolicy(columns=[ColumnMaskRule(column="email", action="hash")]))
    t = PgTunnel(creds, "x", None, policy=pol)
    with pytest.raises(AccessDenied, match="masking key"):
        loop.run(t.start())
    keyed = PgTunnel(creds, "x", None, policy=pol, masking_key=b"k" * 32)
    assert loop.run(keyed.start()) > 0
    loop.run(keyed.close())
    t2 = PgTunnel(creds, "x", None, policy=MASKING)
    assert loop.run(t2.start()) > 0
    loop.run(t2.close())


def test_copy_line_with_track_and_overlapping_pan_windows(make_session: Any) -> None:
    s = make_session(PATTERN_ONLY)
    p = PANS[2][1]  # visa19: its 16-digit prefix is Luhn-valid too
    proc = s.psql("-c", f"COPY (SELECT note, track FROM {TABLE} WHERE pan = '{p}') TO STDOUT")
    assert proc.returncode == 0, proc.stderr
    assert truncated(spaced(p)) in proc.stdout, proc.stdout


# -- extended protocol: rows whose columns were not described in the same exchange -------------------------


def _undescribed_rows(s: Session, describe: bool = False) -> list[tuple[int, bytes]]:
    sock = raw_login(s.port, s.secret)
    try:
        q = f"SELECT pan, cvv FROM {TABLE} WHERE id = 1".encode()
        sync = pg.message(b"S")
        # with ``describe``, the statement is described in this first exchange (as asyncpg and pgjdbc do)
        sock.sendall(pg.message(b"P", b"s1\0" + q + b"\0\0\0")
                     + (pg.message(b"D", b"Ss1\0") if describe else b"") + sync)
        assert any(t == ord("T") for t, _ in read_until(sock, b"Z")) is describe
        # Bind + Execute without Describe: the rows come with no RowDescription in this exchange
        bind = pg.message(b"B", b"\0s1\0" + struct.pack("!hhh", 0, 0, 0))
        sock.sendall(bind + pg.message(b"E", b"\0\0\0\0\0") + sync)
        return read_until(sock, b"Z")
    finally:
        sock.close()


def test_rows_of_a_statement_described_earlier_use_its_columns(make_session: Any) -> None:
    """The statement was described (Describe S) in an earlier exchange: its rows are masked by those
    columns, column rules included."""
    s = make_session(MASKING)
    got = _undescribed_rows(s, describe=True)
    rows = [b for t, b in got if t == ord("D")]
    assert len(rows) == 1
    assert rows[0] == (struct.pack("!hi", 2, 16) + truncated(PANS[0][1]).encode()
                       + struct.pack("!i", 3) + b"***")
    assert s.tunnel.errors == []


def test_undescribed_rows_fail_closed_with_column_rules(make_session: Any) -> None:
    s = make_session(MASKING)  # default sensitive columns (cvv, …): the columns must be known
    got = _undescribed_rows(s)
    assert not any(t == ord("D") for t, _ in got)
    errs = [pg.parse_error_fields(b) for t, b in got if t == ord("E")]
    assert errs
    assert errs[0]["C"] == "0A000"
    assert "row description" in errs[0]["M"]


def test_undescribed_rows_masked_by_pattern_without_column_rules(make_session: Any) -> None:
    s = make_session(DataPathPolicy(masking=MaskingPolicy(sensitive_columns=[])))
    got = _undescribed_rows(s)
    rows = [b for t, b in got if t == ord("D")]
    assert len(rows) == 1
    assert truncated(PANS[0][1]).encode() in rows[0]
    assert PANS[0][1].encode() not in rows[0]
    assert s.tunnel.errors == []


def _people_and_other(c: PgCluster) -> None:
    """Two tables with a column of the same name (holder), for rules scoped to one of them."""
    c.psql("DROP TABLE IF EXISTS mk_people; DROP TABLE IF EXISTS mk_other; "
           "CREATE TABLE mk_people (id int, holder text, email text); "
           "INSERT INTO mk_people VALUES (1, 'Ada Lovelace', 'ada@example.com'); "
           "CREATE TABLE mk_other (id int, holder text); INSERT INTO mk_other VALUES (1, 'Not Secret'); "
           f"ALTER TABLE mk_people OWNER TO {APP_USER}; ALTER TABLE mk_other OWNER TO {APP_USER}",
           database="prod")


def test_a_whole_row_holding_a_rule_column_is_judged_as_that_column(
    cluster: tuple[PgCluster, str], make_session: Any
) -> None:
    """``SELECT c FROM cards c`` sends the whole row as one value of the table's row type, so the CVV the
    column rules redact came out in it ((1,...,001,...)); now a value of the row type of a table holding a
    rule column (or an array of them, in text or binary) is redacted whole. Another table's rows, and rows of
    a table whose same-named column a table-scoped rule does not cover, stay as they are."""
    import psycopg

    c, _pw = cluster
    _people_and_other(c)
    pol = DataPathPolicy(masking=MaskingPolicy(
        sensitive_columns=["cvv"], columns=[ColumnMaskRule(table="public.mk_people", column="holder",
                                                           action="redact")]))
    s = make_session(pol, "wholerow")
    out = s.psql("-At", "-F", "|", "-c", f"SELECT c, c.id FROM {TABLE} c WHERE id = 1").stdout.strip()
    whole, ident = out.split("|")
    assert set(whole) == {"*"}, out  # the row, CVV and all
    assert ident == "1"
    arr = s.psql("-At", "-c", f"SELECT array_agg(c) FROM {TABLE} c").stdout.strip()
    assert set(arr) == {"*"}, arr
    people = s.psql("-At", "-c", "SELECT p FROM mk_people p").stdout.strip()
    assert set(people) == {"*"}, people
    assert s.psql("-At", "-c", "SELECT o FROM mk_other o").stdout.strip() == "(1,\"Not Secret\")"
    conninfo = f"host=127.0.0.1 port={s.port} dbname=prod passfile={s.passfile} connect_timeout=10"
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(f"SELECT c, c.cvv FROM {TABLE} c WHERE id = 1", binary=True).fetchall()
    assert rows == [(None, "***")]  # binary: no well-formed stand-in for a record, so NULL
    assert "001" not in out + arr
    assert s.tunnel.errors == []


def test_json_members_named_like_rule_columns_are_judged_as_them(make_session: Any) -> None:
    """``row_to_json(c)``, ``json_agg(c)``, ``to_jsonb(c)``: a row's columns become JSON members, which no
    column rule saw ({"cvv":"001"} came out in clear). Members named like a rule column now get its
    treatment, in text and in binary jsonb; the PAN scan still runs over the rest."""
    import psycopg

    s = make_session(MASKING)  # the default sensitive columns: cvv, cvc, pin, ...
    one = s.psql("-At", "-c", f"SELECT row_to_json(c) FROM {TABLE} c WHERE id = 1").stdout.strip()
    doc = json.loads(one)
    assert doc["cvv"] == "***"
    assert doc["pan"] == truncated(PANS[0][1])
    assert doc["id"] == 1
    agg = json.loads(s.psql("-At", "-c", f"SELECT json_agg(c ORDER BY id) FROM {TABLE} c").stdout)
    assert [d["cvv"] for d in agg] == ["***"] * len(agg)
    conninfo = f"host=127.0.0.1 port={s.port} dbname=prod passfile={s.passfile} connect_timeout=10"
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(f"SELECT to_jsonb(c), jsonb_build_object('CVV', cvv) FROM {TABLE} c ORDER BY id",
                            binary=True).fetchall()
    # a whole row keeps its column names as member names: masked member by member, the rest still readable
    assert [r[0]["cvv"] for r in rows] == ["***"] * len(rows)
    # a value built from the cvv column itself is a computed column of it: redacted whole, whatever the
    # member is called (a JSON string of stars: still well-formed jsonb)
    assert {r[1] for r in rows} == {"*" * (len('{"CVV": "001"}') - 2)}  # the quotes are the string's
    assert all(r[0]["id"] for r in rows)
    assert_no_clear_pan(one + json.dumps(agg) + json.dumps([r[0] for r in rows]))
    assert s.tunnel.errors == []


# (query, whether its one result column is computed from cvv): cvv is a default sensitive column (redact)
COMPUTED = [
    (f"SELECT cvv || '' AS x FROM {TABLE} WHERE id = 1", True),
    (f"SELECT upper(cvv) FROM {TABLE} WHERE id = 1", True),
    (f"SELECT max(cvv) FROM {TABLE}", True),
    (f"SELECT cvv::int + 0 FROM {TABLE} WHERE id = 1", True),
    (f"SELECT c::text FROM {TABLE} c WHERE id = 1", True),
    (f"SELECT cvv AS x FROM {TABLE} WHERE id = 1 UNION ALL SELECT 'no'", True),
    (f"WITH s(a) AS (SELECT cvv FROM {TABLE}) SELECT min(a || '') FROM s", True),
    (f"SELECT (SELECT cvv FROM {TABLE} WHERE id = 1)", True),
    (f"SELECT * FROM (SELECT lower(cvv) FROM {TABLE} WHERE id = 1) s", True),
    (f"VALUES ((SELECT cvv FROM {TABLE} WHERE id = 1))", True),
    (f"SELECT s::text FROM (SELECT * FROM {TABLE} WHERE id = 1) s", True),
    (f"SELECT x FROM {TABLE}, unnest(ARRAY[cvv]) AS u(x) WHERE id = 1", True),
    # a query given as text: what it reads cannot be told (<cvv>001</cvv> came out)
    (f"SELECT query_to_xml('SELECT cvv FROM {TABLE} WHERE id = 1', true, false, '')", True),
    (f"SELECT count(*) FROM {TABLE} WHERE cvv = '001'", False),  # a condition is not a value
    (f"SELECT upper(note) IS NOT NULL FROM {TABLE} WHERE id = 1", False),
]


def test_computed_columns_of_a_rule_column_are_judged_as_it(make_session: Any) -> None:
    """A computed result column (an expression, an aggregate, a cast of the whole row, a UNION's output)
    arrives without a table OID, so the cvv rule never saw it: `SELECT cvv || '' AS x` showed "001". The
    tunnel now reads the statement with PostgreSQL's parser and judges a computed column made from cvv as
    cvv: through psql (simple protocol, several statements in one string) and psycopg (extended protocol,
    text and binary)."""
    import psycopg

    s = make_session(MASKING)
    for sql, computed in COMPUTED:
        out = s.psql("-At", "-c", sql).stdout.strip()
        assert out, sql
        if computed:
            assert set(out.replace("\n", "")) == {"*"}, (sql, out)  # every row's value
        else:
            assert "*" not in out, (sql, out)
    # with guardrails on too (their own path reads the client's messages first)
    guarded = make_session(DataPathPolicy(masking=MaskingPolicy(pan="truncate"),
                                          guardrails=[GuardrailRule(name="no-drop", deny=["drop_table"])]),
                           "guarded")
    assert guarded.psql("-At", "-c", f"SELECT upper(cvv) FROM {TABLE} WHERE id = 1").stdout.strip() == "***"
    # one string, several statements: the second one's computed column is the one judged
    both = s.psql("-At", "-c", f"SELECT upper(note) IS NULL FROM {TABLE} WHERE id = 1; "
                               f"SELECT cvv || '!' FROM {TABLE} WHERE id = 1").stdout.split()
    assert both == ["f", "*" * len("001!")]
    # a statement PREPAREd in SQL, or a cursor DECLAREd, carries its query's columns to EXECUTE / FETCH, in
    # the same string or later on the connection
    named = s.psql("-qAt", "-c", f"PREPARE p AS SELECT id, upper(cvv) FROM {TABLE} WHERE id = 2",
                   "-c", "EXECUTE p",
                   "-c", f"DEALLOCATE p; PREPARE p AS SELECT id, note IS NULL FROM {TABLE} WHERE id = 2; "
                         "EXECUTE p",  # redefined: its new query carries nothing
                   "-c", f"BEGIN; DECLARE cur CURSOR FOR SELECT cvv || '' FROM {TABLE} ORDER BY id; "
                         "FETCH 2 FROM cur; COMMIT").stdout.split()
    assert named == ["2|***", "2|f", "***", "***"], named
    conninfo = f"host=127.0.0.1 port={s.port} dbname=prod passfile={s.passfile} connect_timeout=10"
    with psycopg.connect(conninfo) as conn:
        for binary in (False, True):
            row = conn.execute(f"SELECT id, cvv || %s FROM {TABLE} WHERE id = %s", ("", 3),
                               binary=binary).fetchone()
            assert row == (3, "***"), (binary, row)
        # binary int4: no well-formed stand-in exists, so NULL (in text, psql shows "*")
        row = conn.execute(f"SELECT id, cvv::int FROM {TABLE} WHERE id = 3", binary=True).fetchone()
        assert row == (3, None)

    async def prepared() -> list[tuple[Any, ...]]:
        # asyncpg: Parse + Describe S once, then Bind + Execute with no RowDescription in the exchange
        conn = await asyncpg.connect(host="127.0.0.1", port=s.port, database="prod", user="any",
                                     passfile=str(s.passfile), ssl=False, timeout=10)
        try:
            stmt = await conn.prepare(f"SELECT id, lower(cvv), md5(cvv) FROM {TABLE} WHERE id < $1 "
                                      "ORDER BY id")
            return [tuple(r) for _ in range(2) for r in await stmt.fetch(3)]
        finally:
            await conn.close()

    import asyncio

    import asyncpg

    assert asyncio.run(prepared()) == [(1, "***", "*" * 32), (2, "***", "*" * 32)] * 2
    assert s.tunnel.errors == []


def test_rule_columns_copied_into_a_table_during_the_session_stay_judged(make_session: Any) -> None:
    """A read-level user may still create TEMP tables: `CREATE TEMP TABLE t AS SELECT cvv AS x ...` then
    `SELECT x FROM t` showed the CVV (t's OID is no rule's). A statement writing rule columns' values into
    a relation (CREATE TABLE AS, SELECT INTO, INSERT ... SELECT, UPDATE ... SET) now teaches the session's
    tunnel that relation, for every connection: its named columns carry the rule; where the columns are not
    known by name (INSERT without a column list), every column read from it is judged."""
    s = make_session(MASKING)
    out = s.psql("-qAt",
                 "-c", f"CREATE TEMP TABLE tt AS SELECT id, cvv AS x FROM {TABLE} WHERE id = 1",
                 "-c", "SELECT id, x, x || '' FROM tt",
                 "-c", "SELECT * FROM tt",  # a * spells out x where the text does not name it
                 "-c", f"SELECT cvv AS y INTO TEMP ti FROM {TABLE} WHERE id = 2",
                 "-c", "SELECT y FROM ti",
                 "-c", "CREATE TEMP TABLE tu (a int, b text); "
                       f"INSERT INTO tu SELECT id, cvv FROM {TABLE} WHERE id = 3",
                 "-c", "SELECT a, b FROM tu",
                 "-c", "CREATE TEMP TABLE tv (a int, b text); INSERT INTO tv VALUES (4, 'plain')",
                 "-c", "SELECT a, b FROM tv").stdout.split()
    # tu: which column holds the CVV is not known, so all of them are judged (fail closed)
    assert out == ["1|***|***", "*|***", "***", "*|***", "4|plain"], out
    # another connection of the same session: a table (not TEMP) filled by the first
    s.psql("-c", f"DROP TABLE IF EXISTS mk_copy; CREATE TABLE mk_copy AS SELECT id, cvv AS x FROM {TABLE}")
    try:
        assert s.psql("-At", "-c", "SELECT id, x FROM mk_copy WHERE id = 5").stdout.strip() == "5|***"
    finally:
        s.psql("-c", "DROP TABLE mk_copy")
    assert s.tunnel.errors == []


def test_functions_that_read_a_rule_column_are_judged(cluster: tuple[PgCluster, str],
                                                     make_session: Any) -> None:
    """A function reads the table itself, so `SELECT get_cvv(1)` showed the CVV, and a DO block printed it
    in a NOTICE. Functions whose definition names a rule column (read at session start, or created during
    the session) are judged as every rule column when called; a DO block or CALL naming one gets its
    notices' and errors' message, detail and hint starred."""
    c, _pw = cluster
    c.psql(f"CREATE OR REPLACE FUNCTION mk_get_cvv(i int) RETURNS text LANGUAGE sql STABLE "
           f"AS $$ SELECT cvv FROM {TABLE} WHERE id = i $$; "
           f"ALTER FUNCTION mk_get_cvv(int) OWNER TO {APP_USER}", database="prod")
    s = make_session(MASKING)
    assert s.psql("-At", "-c", "SELECT 1, mk_get_cvv(1)").stdout.strip() == "1|***"
    out = s.psql("-qAt",
                 "-c", "CREATE FUNCTION pg_temp.mine(i int) RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
                       f"RETURN (SELECT cvv FROM {TABLE} WHERE id = i); END $$",
                 "-c", "SELECT pg_temp.mine(2)",
                 "-c", "SELECT length('plain')")
    assert out.stdout.split() == ["***", "5"], out.stdout + out.stderr
    notice = s.psql("-c", "DO $$ BEGIN RAISE NOTICE 'code %', "
                          f"(SELECT cvv FROM {TABLE} WHERE id = 3); END $$")
    assert "003" not in notice.stderr
    assert "NOTICE:  ********" in notice.stderr, notice.stderr
    plain = s.psql("-c", "DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
    assert "NOTICE:  hello" in plain.stderr  # a DO block naming no rule column keeps its notices
    assert s.tunnel.errors == []


def test_data_exceptions_of_statements_naming_a_rule_column_are_starred(make_session: Any) -> None:
    """`SELECT 1 FROM cards WHERE cvv::date IS NULL` failed with `invalid input syntax for type date: "001"`:
    the CVV, in an error no pattern matches. A data exception (SQLSTATE class 22) raised by a statement that
    names a rule column anywhere has its message and detail starred; other errors are left readable."""
    s = make_session(MASKING)
    for sql in (f"SELECT 1 FROM {TABLE} WHERE id = 1 AND cvv::date IS NULL",
                f"SELECT cvv::uuid FROM {TABLE} WHERE id = 1"):
        err = s.psql("-c", sql).stderr
        assert "001" not in err, err
        assert "ERROR:  ****" in err, err
    clear = s.psql("-c", "SELECT 'abc'::int").stderr  # names no rule column
    assert 'invalid input syntax for type integer: "abc"' in clear, clear
    typo = s.psql("-c", f"SELECT cvv FROM {TABLE}_nope").stderr  # not a data exception
    assert f'relation "{TABLE}_nope" does not exist' in typo, typo


def test_notifications_after_a_rule_column_was_sent_are_starred(make_session: Any) -> None:
    """`SELECT pg_notify('ch', cvv) FROM cards` hands the CVV to whoever LISTENs, later and on any
    connection, where no column rule sees it. Once a statement sends a payload computed from a rule column,
    the session's notification payloads are starred (the channel stays readable)."""
    s = make_session(MASKING)
    out = s.psql("-qAt", "-c", "LISTEN ch", "-c", "SELECT pg_notify('ch', 'hello')",
                 "-c", f"SELECT pg_notify('ch', cvv) FROM {TABLE} WHERE id = 1",
                 "-c", "SELECT pg_notify('ch', 'again')").stdout
    payloads = re.findall(r'notification "ch" with payload "([^"]*)"', out)
    assert payloads == ["hello", "***", "*****"], out
    assert "001" not in out


def test_rule_columns_kept_in_server_state_are_judged_when_read_back(make_session: Any) -> None:
    """set_config('my.x', cvv), setval('s', cvv::int) and pg_advisory_lock(cvv::int) keep the CVV in server
    state, and `SHOW my.x`, `current_setting`, `currval` or `pg_locks` gave it back in clear. Such a call
    (its result is a computed column, masked) teaches the session what reads that state back."""
    s = make_session(MASKING)
    out = s.psql("-qAt",
                 "-c", "CREATE TEMP SEQUENCE sq",
                 "-c", "SELECT current_setting('application_name') IS NOT NULL, currval IS NULL "
                       "FROM (SELECT 1 AS currval) x",  # nothing learnt yet: clear
                 "-c", "SELECT set_config('my.x', cvv, false), setval('sq', cvv::int) "
                       f"FROM {TABLE} WHERE id = 7",
                 "-c", "SHOW my.x",
                 "-c", "SELECT current_setting('my.x'), currval('sq')",
                 "-c", f"SELECT pg_advisory_lock(cvv::int) FROM {TABLE} WHERE id = 8",
                 "-c", "SELECT objid FROM pg_locks WHERE locktype = 'advisory'").stdout.split()
    # (pg_advisory_lock returns void: psql prints an empty line)
    assert out == ["t|f", "***|*", "***", "***|*", "*"], out
    assert "007" not in " ".join(out)


def test_statistics_of_rule_columns_are_judged(cluster: tuple[PgCluster, str], make_session: Any) -> None:
    """ANALYZE keeps sample values of every column: `SELECT histogram_bounds FROM pg_stats WHERE attname =
    'cvv'` listed the CVVs. The statistics views' value columns are judged as every rule column."""
    c, _pw = cluster
    c.psql(f"ANALYZE {TABLE}", database="prod")
    s = make_session(MASKING)
    row = s.psql("-At", "-c", "SELECT attname, histogram_bounds, null_frac FROM pg_stats "
                              f"WHERE tablename = '{TABLE}' AND attname = 'cvv'").stdout.strip()
    name, bounds, null_frac = row.split("|")
    assert (name, null_frac) == ("cvv", "0")
    assert bounds, row
    assert set(bounds) == {"*"}, row
    assert "001" not in s.psql("-At", "-c", f"SELECT * FROM pg_stats WHERE tablename = '{TABLE}'").stdout


def test_view_columns_computed_from_a_rule_column_are_judged_as_it(
    cluster: tuple[PgCluster, str], make_session: Any
) -> None:
    """A view reports its own OID and attribute numbers, so `SELECT code FROM v` over a view that renames cvv
    came out in clear. The tunnel reads every view's definition at session start and judges a view column
    made from a rule column as it (views over views, materialized views, and a value of the view's row type
    too); a JSON of whole rows keeps its member-by-member treatment."""
    c, _pw = cluster
    c.psql(f"DROP VIEW IF EXISTS mk_v2; DROP VIEW IF EXISTS mk_v; DROP MATERIALIZED VIEW IF EXISTS mk_mv; "
           f"CREATE VIEW mk_v AS SELECT id, cvv AS code, upper(note) AS shout, to_jsonb(k) AS j "
           f"FROM {TABLE} k; "
           f"CREATE VIEW mk_v2(i, c2) AS SELECT id, code || '' FROM mk_v; "
           f"CREATE MATERIALIZED VIEW mk_mv AS SELECT id, lower(cvv) AS l FROM {TABLE}; "
           f"ALTER VIEW mk_v OWNER TO {APP_USER}; ALTER VIEW mk_v2 OWNER TO {APP_USER}; "
           f"ALTER MATERIALIZED VIEW mk_mv OWNER TO {APP_USER}", database="prod")
    s = make_session(MASKING)
    row = s.psql("-At", "-c", "SELECT id, code, upper(code), shout IS NULL, j->>'cvv' FROM mk_v WHERE id = 1")
    assert row.stdout.strip() == "1|***|***|f|***", row.stdout + row.stderr
    doc = json.loads(s.psql("-At", "-c", "SELECT j FROM mk_v WHERE id = 1").stdout)
    assert (doc["id"], doc["cvv"], doc["pan"]) == (1, "***", truncated(PANS[0][1]))
    assert s.psql("-At", "-c", "SELECT i, c2 FROM mk_v2 WHERE i = 2").stdout.strip() == "2|***"
    assert s.psql("-At", "-c", "SELECT id, l FROM mk_mv WHERE id = 3").stdout.strip() == "3|***"
    whole = s.psql("-At", "-c", "SELECT v FROM mk_v v WHERE id = 1").stdout.strip()
    assert set(whole) == {"*"}, whole
    assert s.tunnel.errors == []


def test_column_rules_follow_the_origin_column_and_hash_with_the_key(
    cluster: tuple[PgCluster, str], make_session: Any
) -> None:
    """A table-scoped rule hits its table's column under any alias, not another table's column of the same
    name; a hash rule gives the same keyed hash in two sessions (joins work) and another with another key."""
    c, _pw = cluster
    _people_and_other(c)
    pol = DataPathPolicy(masking=MaskingPolicy(columns=[
        ColumnMaskRule(table="public.mk_people", column="holder", action="redact"),
        ColumnMaskRule(table="mk_people", column="email", action="hash"),
    ]))
    key = b"k" * 32
    s = make_session(pol, "origins", key)
    assert s.tunnel.origins, s.tunnel.errors  # read from the catalog by check_upstream
    out = s.psql("-At", "-c", "SELECT holder AS h, email AS e, upper(holder) AS u FROM mk_people").stdout
    hashed = out.strip().split("|")
    assert hashed[0] == "*" * len("Ada Lovelace")  # aliased, still the rule's column
    assert hashed[1].startswith("h:")
    assert len(hashed[1]) == 2 + 16
    assert "ada@" not in out
    # a computed column has no origin, but it is computed from the rule's column: judged as that column
    assert hashed[2] == "*" * len("ADA LOVELACE")
    # the same column name in another table is not the rule's
    assert s.psql("-At", "-c", "SELECT holder FROM mk_other").stdout.strip() == "Not Secret"
    # a join on the hashed value works across sessions: same key, same hash
    again = make_session(pol, "origins2", key).psql("-At", "-c", "SELECT email FROM mk_people").stdout.strip()
    assert again == hashed[1]
    other = make_session(pol, "origins3", b"z" * 32).psql("-At", "-c", "SELECT email FROM mk_people")
    assert other.stdout.strip().startswith("h:")
    assert other.stdout.strip() != hashed[1]


def test_binary_results_of_a_driver_masked(make_session: Any) -> None:
    """Drivers that ask for binary results (psycopg's binary cursors, asyncpg, pgjdbc for int8) get a PAN
    stored as a number as 8 raw bytes (bigint) or base-10000 digits (numeric), where no digit pattern shows.
    The tunnel reads such values as the number they are: a Luhn-valid 13-19 digit number arrives as NULL
    (no masked stand-in exists in those formats), any other number unchanged; text columns are masked as
    in text format."""
    import psycopg

    s = make_session(MASKING)
    sql = (f"SELECT id, pan::bigint AS n, pan::numeric AS m, ('0.' || pan)::numeric AS frac, "
           f"(-pan::numeric)::numeric(30, 2) AS neg, ARRAY[pan::bigint, id] AS arr, pan AS t, "
           f"(id * 1000000000000000)::bigint AS big FROM {TABLE} ORDER BY id")
    conninfo = f"host=127.0.0.1 port={s.port} dbname=prod passfile={s.passfile} connect_timeout=10"
    with psycopg.connect(conninfo) as conn:
        binary = conn.execute(sql, binary=True).fetchall()
    assert len(binary) == len(PANS) + 1
    for (brand, p), row in zip(PANS, binary, strict=False):
        assert row[1:5] == (None, None, None, None), brand  # bigint, numeric; behind a point or a sign too
        assert row[5] == [None, row[0]], brand  # an array element, the rest of the array kept
        assert row[6] == truncated(p), brand
        assert row[7] == row[0] * 10**15  # 16 digits, Luhn-invalid: a number like any other
    last = binary[-1]
    assert (last[1], str(last[2]), last[5]) == (int(NOT_A_PAN), NOT_A_PAN, [int(NOT_A_PAN), 100])
    # in text format (psql) the same numbers are masked by pattern, as ever
    text = s.psql("-At", "-F", "|", "-c", sql).stdout.splitlines()
    for (brand, p), line in zip(PANS, text, strict=False):
        assert line.split("|")[1:5] == [truncated(p), truncated(p), "0." + truncated(p),
                                        "-" + truncated(p) + ".00"], brand
    assert_no_clear_pan(repr(binary) + "\n".join(text))
    assert s.tunnel.errors == []


def test_binary_float8_records_and_bytea_masked_as_their_text_would_be(make_session: Any) -> None:
    """Binary float8 (and float8[]) values are judged by the text PostgreSQL would print for them: NULL
    exactly where psql's text shows a masked number (a 16-digit card in float8out's exponent notation,
    4.111111111111111e+15, is masked in its digits), the same number elsewhere. A record's text fields and a
    bytea's bytes are masked in place (before: their bytes passed as they were)."""
    import psycopg

    s = make_session(MASKING)
    sql = (f"SELECT id, pan::float8 AS f, ARRAY[pan::float8, id] AS fa, (pan::float8 / 1e4) AS g, "
           f"row(id, pan, note) AS r, convert_to(pan, 'UTF8') AS b FROM {TABLE} ORDER BY id")
    conninfo = f"host=127.0.0.1 port={s.port} dbname=prod passfile={s.passfile} connect_timeout=10"
    with psycopg.connect(conninfo) as conn:
        binary = conn.execute(sql, binary=True).fetchall()
    text = [line.split("|") for line in s.psql("-At", "-F", "|", "-c", sql).stdout.splitlines()]
    assert len(binary) == len(text) == len(PANS) + 1
    nulled = 0
    for row, line in zip(binary, text, strict=True):
        for value, shown in ((row[1], line[1]), (row[3], line[3]), (row[2][0], line[2][1:].split(",")[0])):
            if "*" in shown:
                assert value is None, (row[0], shown)
                nulled += 1
            else:
                assert value == float(shown), (row[0], shown)
        assert row[2][1] == row[0]
    assert nulled >= 2 * sum(len(p) <= 16 for _, p in PANS)  # f and its array element, at least
    shown = dict(zip([b for b, _ in PANS], [line[1] for line in text], strict=False))
    assert shown["visa16"] == "4.11111******1111e+15"  # psql's own spelling, masked in its digits
    assert shown["amex"] == truncated("378282246310005")
    # COPY has no column types: its rows are looked at for the notation too
    copied = make_session(PATTERN_ONLY, "copyfloat").psql(
        "-c", f"COPY (SELECT pan::float8 FROM {TABLE} ORDER BY id) TO STDOUT").stdout.splitlines()
    assert copied[0] == "4.11111******1111e+15"
    assert copied == [line[1] for line in text]
    for (brand, p), row in zip(PANS, binary, strict=False):
        assert row[4][1] == truncated(p), brand
        assert row[4][2] == f"order {row[0]} paid with {truncated(spaced(p))} by {brand}", brand
        assert bytes(row[5]) == truncated(p).encode(), brand
    assert_no_clear_pan(repr(binary))
    assert s.tunnel.errors == []


def test_float8_text_is_what_postgres_prints(cluster: tuple[PgCluster, str]) -> None:
    """pcigate.masking.float8_text against the server's own float8out, over doubles of every magnitude."""
    import random

    rnd = random.Random(20261204)
    values = [0.0, -0.0, 5e-324, 1.7976931348623157e308, 1e15, 1e-4, 999999999999999.9, 0.0001 * (1 - 2**-52)]
    values += [struct.unpack("!d", rnd.randbytes(8))[0] for _ in range(600)]
    values += [rnd.uniform(-1, 1) * 10 ** rnd.randint(-8, 20) for _ in range(600)]
    values += [float(rnd.randrange(10**12, 10**19)) for _ in range(300)]
    values = [v for v in values if v == v and abs(v) != float("inf")]
    literal = ",".join(repr(v) for v in values)  # read by float8in (numeric literals would lose -0)
    out = cluster[0].psql(f"SELECT string_agg(v::text, ' ' ORDER BY i) "
                          f"FROM unnest('{{{literal}}}'::float8[]) WITH ORDINALITY AS t(v, i)")
    printed = out.split()
    assert len(printed) == len(values)
    for v, shown in zip(values, printed, strict=True):
        assert float8_text(v) == shown.encode(), (v, shown)


def test_asyncpg_prepared_binary_results_masked(make_session: Any) -> None:
    """asyncpg describes a statement once (Parse, Describe S, Flush) and then runs it with Bind + Execute and
    binary results, with no RowDescription in that exchange: the tunnel masks those rows by the statement's
    columns in the formats of the Bind, column rules included, on every run of the statement."""
    import asyncio

    import asyncpg

    s = make_session(MASKING)
    sql = f"SELECT id, pan, pan::bigint AS n, pan::numeric AS m, cvv, doc FROM {TABLE} ORDER BY id"

    async def run() -> list[list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(host="127.0.0.1", port=s.port, database="prod", user="any",
                                     passfile=str(s.passfile), ssl=False, timeout=10)
        try:
            stmt = await conn.prepare(sql)
            runs = [[tuple(r) for r in await stmt.fetch()] for _ in range(2)]
            # a literal that names PREPARE is no SQL that replaces a statement: the description stands
            assert await conn.fetchval("SELECT 'please prepare the order'") == "please prepare the order"
            runs.append([tuple(r) for r in await stmt.fetch()])
            # a server-side cursor fetched 3 rows at a time (Execute with a row limit: PortalSuspended),
            # after a failed statement and a pipelined executemany
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn.fetch("SELECT 1/0")
            await conn.execute("CREATE TEMP TABLE t (id int, pan text)")
            await conn.executemany("INSERT INTO t VALUES ($1, $2)", [(i, p) for i, (_, p) in enumerate(PANS)])
            async with conn.transaction():
                cursor = conn.cursor("SELECT id, pan, pan::bigint AS n FROM t ORDER BY id", prefetch=3)
                runs.append([(r["id"], r["pan"], r["n"]) async for r in cursor])
            return runs
        finally:
            await conn.close()

    runs = asyncio.run(run())
    cursor_rows = runs.pop()
    assert cursor_rows == [(i, truncated(p), None) for i, (_, p) in enumerate(PANS)]
    for rows in runs:
        assert len(rows) == len(PANS) + 1
        for (brand, p), row in zip(PANS, rows, strict=False):
            assert row[1] == truncated(p), brand
            assert row[2:4] == (None, None), brand  # bigint, numeric: NULL
            assert row[4] == "***", brand  # cvv: a sensitive column (a column rule)
            assert json.loads(row[5])["card"] == truncated(dashed(p)), brand  # jsonb in binary
        assert rows[-1][1:5] == (NOT_A_PAN, int(NOT_A_PAN), Decimal(NOT_A_PAN), "***")
    assert_no_clear_pan(repr(runs))
    assert s.tunnel.errors == []


def _bind(stmt: bytes, portal: bytes = b"", result_formats: tuple[int, ...] = ()) -> bytes:
    return pg.message(b"B", portal + b"\0" + stmt + b"\0" + struct.pack("!hh", 0, 0)
                      + struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats))


def _execute(portal: bytes = b"", limit: int = 0) -> bytes:
    return pg.message(b"E", portal + b"\0" + struct.pack("!i", limit))


def test_pipelined_statements_keep_their_own_columns(make_session: Any) -> None:
    """Several prepared statements described in one exchange and run interleaved in the next, an error that
    makes the server skip the rest of its batch, and a portal run in pieces (PortalSuspended): each result is
    masked by its own statement's columns and formats."""
    s = make_session(MASKING)
    sock = raw_login(s.port, s.secret)
    sync = pg.message(b"S")
    a = f"SELECT pan, cvv FROM {TABLE} WHERE id <= 2 ORDER BY id".encode()
    b = f"SELECT id, pan::bigint FROM {TABLE} WHERE id <= 2 ORDER BY id".encode()
    pan1, pan2 = PANS[0][1].encode(), PANS[1][1].encode()
    try:
        # a batch that fails at its first message: its Describe is never answered
        sock.sendall(pg.message(b"P", b"bad\0SELEC nonsense\0\0\0") + pg.message(b"D", b"Sbad\0") + sync)
        got = read_until(sock, b"Z")
        assert [chr(t) for t, _ in got] == ["E", "Z"]
        # describe two statements in one exchange ...
        sock.sendall(pg.message(b"P", b"a\0" + a + b"\0\0\0") + pg.message(b"P", b"b\0" + b + b"\0\0\0")
                     + pg.message(b"D", b"Sa\0") + pg.message(b"D", b"Sb\0") + sync)
        got = read_until(sock, b"Z")
        assert [chr(t) for t, _ in got] == ["1", "1", "t", "T", "t", "T", "Z"]
        # ... and run them interleaved, b in binary, a's portal in pieces of one row
        sock.sendall(_bind(b"b", b"pb", (1,)) + _bind(b"a", b"pa") + _execute(b"pa", 1) + _execute(b"pb")
                     + _execute(b"pa", 1) + sync)
        got = read_until(sock, b"Z")
        assert [chr(t) for t, _ in got] == ["2", "2", "D", "s", "D", "D", "C", "D", "s", "Z"]
        rows = [datarow_fields(body) for t, body in got if t == ord("D")]
        assert rows[0] == [truncated(PANS[0][1]).encode(), b"***"]  # a, first piece
        assert rows[1] == [struct.pack("!i", 1), None]  # b: int4 id, the bigint PAN as NULL
        assert rows[2] == [struct.pack("!i", 2), None]
        assert rows[3] == [truncated(PANS[1][1]).encode(), b"***"]  # a, second piece
        # an error inside a batch: the server skips the Execute after it; the next batch is still right
        sock.sendall(_bind(b"b", b"", (1,)) + _execute(b"", 1) + _bind(b"nonesuch") + _execute()
                     + _bind(b"a") + _execute() + sync + _bind(b"b", b"", (1,)) + _execute() + sync)
        got = read_until(sock, b"Z", 2)
        assert [chr(t) for t, _ in got] == ["2", "D", "s", "E", "Z", "2", "D", "D", "C", "Z"]
        rows = [datarow_fields(body) for t, body in got if t == ord("D")]
        one, two = struct.pack("!i", 1), struct.pack("!i", 2)
        assert rows == [[one, None], [one, None], [two, None]]
        assert pan1 not in b"".join(body for _, body in got)
        assert pan2 not in b"".join(body for _, body in got)
    finally:
        sock.close()
    assert s.tunnel.errors == []


def _parse(name: bytes, sql: str) -> bytes:
    return pg.message(b"P", name + b"\0" + sql.encode() + b"\0\0\0")


def _query(sql: str) -> bytes:
    return pg.message(b"Q", sql.encode() + b"\0")


_SYNC = pg.message(b"S")
_PAN_INT8 = struct.pack("!q", int(PANS[0][1]))


def _described_then_run(sock: Any) -> list[tuple[int, bytes]]:
    """asyncpg's way: the statement described and run in one batch, results in binary."""
    sock.sendall(_parse(b"probe", f"SELECT pan::bigint AS n, cvv FROM {TABLE} WHERE id = 1")
                 + pg.message(b"D", b"Sprobe\0") + _bind(b"probe", b"", (1,)) + _execute() + _SYNC)
    return read_until(sock, b"Z")


def _copy_in_extended(sock: Any) -> None:
    """libpq's PQexecParams("COPY ... FROM STDIN"): P B D E S, then the data, CopyDone, Sync. The server
    ignores the first Sync (it is in COPY IN then): one ReadyForQuery for two Syncs."""
    sock.sendall(_query("CREATE TEMP TABLE ci (x text)"))
    read_until(sock, b"Z")
    sock.sendall(_parse(b"", "COPY ci FROM STDIN") + _bind(b"") + pg.message(b"D", b"P\0") + _execute()
                 + _SYNC)
    read_until(sock, b"G")
    sock.sendall(pg.message(b"d", b"a\n") + pg.message(b"c") + _SYNC)
    assert [chr(t) for t, _ in read_until(sock, b"Z")][-2:] == ["C", "Z"]


def _copy_in_failed_then_copydone(sock: Any) -> None:
    """COPY FROM STDIN that the server aborts at a bad row while the client still sends to the end (psql's
    \\copy, libpq): the client's CopyDone arrives after the server's error."""
    sock.sendall(_query("CREATE TEMP TABLE cn (x int)"))
    read_until(sock, b"Z")
    sock.sendall(_query("COPY cn FROM STDIN"))
    read_until(sock, b"G")
    sock.sendall(pg.message(b"d", b"notanint\n"))
    assert [chr(t) for t, _ in read_until(sock, b"Z")] == ["E", "Z"]
    sock.sendall(pg.message(b"d", b"1\n") + pg.message(b"c"))


def _query_skipped_after_error(sock: Any) -> None:
    """A Query inside an extended batch whose Parse fails: the server skips it up to the Sync."""
    sock.sendall(_parse(b"", "SELEC bad") + _query("SELECT 1") + _SYNC)
    assert [chr(t) for t, _ in read_until(sock, b"Z")] == ["E", "Z"]


def _statement_replaced_by_sql(sock: Any) -> None:
    """A described statement replaced through SQL (DEALLOCATE + PREPARE) behind the protocol's back."""
    sock.sendall(_parse(b"probe", "SELECT 1::int8 AS n, 2::int4 AS cvv") + pg.message(b"D", b"Sprobe\0")
                 + _SYNC)
    read_until(sock, b"Z")
    sock.sendall(_query(f"DEALLOCATE probe; PREPARE probe AS SELECT pan AS n, cvv FROM {TABLE} WHERE id = 1"))
    read_until(sock, b"Z")


@pytest.mark.parametrize("before",
                         [_copy_in_extended, _copy_in_failed_then_copydone, _query_skipped_after_error],
                         ids=lambda f: f.__name__)
def test_answers_stay_matched_to_their_messages(make_session: Any, before: Any) -> None:
    """The tunnel matches each server answer to the client message it answers (_mq): exchanges where the
    server answers fewer messages than were sent leave no stale entry that would shift later plans."""
    s = make_session(MASKING)
    sock = raw_login(s.port, s.secret)
    try:
        before(sock)
        got = _described_then_run(sock)
    finally:
        sock.close()
    assert [datarow_fields(b) for t, b in got if t == ord("D")] == [[None, b"***"]]
    assert s.tunnel.errors == []


def _run_replaced(sock: Any) -> list[tuple[int, bytes]]:
    sock.sendall(_bind(b"probe", b"", (1,)) + _execute() + _SYNC)
    return read_until(sock, b"Z")


def _run_big_bind(sock: Any) -> list[tuple[int, bytes]]:
    """A Bind too large for the tunnel to keep whole (a 400 KB parameter): its result formats are unread."""
    sock.sendall(_parse(b"big", f"SELECT pan::bigint AS n FROM {TABLE} WHERE id = 1 AND $1::text <> ''")
                 + pg.message(b"D", b"Sbig\0") + _SYNC)
    read_until(sock, b"Z")
    big = b"x" * 400_000
    sock.sendall(pg.message(b"B", b"\0big\0" + struct.pack("!hhi", 0, 1, len(big)) + big
                            + struct.pack("!hh", 1, 1)) + _execute() + _SYNC)
    return read_until(sock, b"Z")


def _run_never_described(sock: Any) -> list[tuple[int, bytes]]:
    sock.sendall(_parse(b"", f"SELECT pan::bigint AS n FROM {TABLE} WHERE id = 1") + _bind(b"", b"", (1,))
                 + _execute() + _SYNC)
    return read_until(sock, b"Z")


@pytest.mark.parametrize(("policy", "before", "run"), [
    (MASKING, _statement_replaced_by_sql, _run_replaced),
    (MASKING, None, _run_big_bind),
    (PATTERN_ONLY, None, _run_never_described),
], ids=["statement-replaced-by-sql", "bind-too-large-to-read", "binary-rows-never-described"])
def test_rows_masking_cannot_read_fail_closed(make_session: Any, policy: DataPathPolicy, before: Any,
                                              run: Any) -> None:
    """Where the tunnel cannot know the columns or formats of rows (a statement replaced through SQL, a Bind
    whose result formats it did not read, binary rows never described) the connection is failed before a
    row is passed on."""
    s = make_session(policy)
    sock = raw_login(s.port, s.secret)
    try:
        if before is not None:
            before(sock)
        got = run(sock)
    finally:
        sock.close()
    assert not any(t == ord("D") for t, _ in got)
    data = b"".join(b for _, b in got)
    assert PANS[0][1].encode() not in data
    assert _PAN_INT8 not in data
    errs = [pg.parse_error_fields(b) for t, b in got if t == ord("E")]
    assert [e["C"] for e in errs] == ["0A000"]


def test_statement_names_are_told_apart_by_their_bytes(make_session: Any) -> None:
    """Two statement names that differ only in bytes that are not UTF-8 (client_encoding LATIN1) are two
    statements: the rows of one are never read by the other's description."""
    s = make_session(MASKING)
    sock = raw_login(s.port, s.secret, params={"client_encoding": "LATIN1"})
    try:
        sock.sendall(_parse(b"a\xfe", f"SELECT pan AS a, cvv AS b FROM {TABLE} WHERE id = 1")
                     + _parse(b"a\xff", "SELECT 1::int4 AS a, 2::int4 AS b") + pg.message(b"D", b"Sa\xff\0")
                     + _SYNC)
        read_until(sock, b"Z")
        sock.sendall(_bind(b"a\xfe", b"", (1,)) + _execute() + _SYNC)
        got = read_until(sock, b"Z")
    finally:
        sock.close()
    assert PANS[0][1].encode() not in b"".join(b for _, b in got)
    assert [pg.parse_error_fields(b)["C"] for t, b in got if t == ord("E")] == ["0A000"]  # never described


def test_bookkeeping_does_not_grow_with_portals_of_ended_transactions(make_session: Any) -> None:
    """Portals end with their transaction: a client binding a new named portal in every autocommit
    exchange (pgjdbc's fetch-size cursors are named C_1, C_2, ...) leaves the tunnel's bookkeeping small."""
    s = make_session(MASKING)
    sock = raw_login(s.port, s.secret)
    try:
        sock.sendall(_parse(b"st", "SELECT 1") + pg.message(b"D", b"Sst\0") + _SYNC)
        read_until(sock, b"Z")
        for i in range(300):
            sock.sendall(_bind(b"st", f"C_{i}".encode()) + _execute(f"C_{i}".encode()) + _SYNC)
        got = read_until(sock, b"Z", 300)
        assert sum(t == ord("D") for t, _ in got) == 300
        (conn,) = s.tunnel._conns
        assert len(conn._m_portals) <= 1
        assert len(conn._mq or ()) == 0
    finally:
        sock.close()


def test_pgjdbc_style_statement_described_through_its_portal(make_session: Any) -> None:
    """pgjdbc describes a named statement's first portal (Describe P) and later binds it in binary without a
    Describe: those rows are read by the columns the portal's description gave, in the new Bind's formats."""
    s = make_session(MASKING)
    sock = raw_login(s.port, s.secret)
    try:
        sock.sendall(_parse(b"S_1", f"SELECT id, pan::bigint AS n, cvv FROM {TABLE} WHERE id = 1")
                     + _bind(b"S_1") + pg.message(b"D", b"P\0") + _execute() + _SYNC)
        first = [datarow_fields(b) for t, b in read_until(sock, b"Z") if t == ord("D")]
        sock.sendall(_bind(b"S_1", b"", (1, 1, 0)) + _execute() + _SYNC)
        again = [datarow_fields(b) for t, b in read_until(sock, b"Z") if t == ord("D")]
    finally:
        sock.close()
    assert first == [[b"1", truncated(PANS[0][1]).encode(), b"***"]]
    assert again == [[struct.pack("!i", 1), None, b"***"]]
    assert s.tunnel.errors == []


def test_notify_payload_and_function_result_masked(make_session: Any) -> None:
    s = make_session(MASKING)
    sock = raw_login(s.port, s.secret)
    try:
        sock.sendall(_query(f"LISTEN c; SELECT pg_notify('c', 'card ' || pan) FROM {TABLE} WHERE id = 1"))
        notified = [b for t, b in read_until(sock, b"Z") if t == ord("A")]
        sock.sendall(_query("SELECT 'textcat(text,text)'::regprocedure::oid"))
        oid = int(next(datarow_fields(b) for t, b in read_until(sock, b"Z") if t == ord("D"))[0] or b"0")
        args = [b"card ", PANS[0][1].encode()]
        body = struct.pack("!ihh", oid, 0, len(args)) + b"".join(struct.pack("!i", len(a)) + a for a in args)
        sock.sendall(pg.message(b"F", body + struct.pack("!h", 0)))
        result = [b for t, b in read_until(sock, b"Z") if t == ord("V")]
        # and the connection goes on in step
        got = _described_then_run(sock)
    finally:
        sock.close()
    assert len(notified) == 1
    assert notified[0].endswith(b"c\0card " + truncated(PANS[0][1]).encode() + b"\0")
    assert result == [struct.pack("!i", 21) + b"card " + truncated(PANS[0][1]).encode()]
    assert [datarow_fields(b) for t, b in got if t == ord("D")] == [[None, b"***"]]


def test_query_during_copy_in_fails_the_connection(make_session: Any) -> None:
    """A client that sends a Query while the server is in COPY IN breaks the protocol (the server ends the
    COPY and never answers that Query): the tunnel fails the connection rather than lose step."""
    s = make_session(MASKING)
    sock = raw_login(s.port, s.secret)
    try:
        sock.sendall(_query("CREATE TEMP TABLE ci (x int)"))
        read_until(sock, b"Z")
        sock.sendall(_query("COPY ci FROM STDIN"))
        read_until(sock, b"G")
        sock.sendall(_query("SELECT 1"))
        got = read_until(sock, b"Z")
    finally:
        sock.close()
    assert any(t == ord("E") and b"during COPY" in b for t, b in got)
    assert any("during COPY" in e for e in s.tunnel.errors)


def test_pipelined_executemany_paced_not_failed(make_session: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg's executemany sends every row's Bind and Execute before one Sync; when too many messages are
    unanswered the tunnel stops reading the client until the server catches up (the marks are lowered here
    so 20,000 rows cross them), instead of failing the connection or queueing without bound."""
    import asyncio

    import asyncpg

    from pcigate.tunnel import pg as tunnel_pg

    monkeypatch.setattr(tunnel_pg, "_MQ_HIGH", 2_000)
    monkeypatch.setattr(tunnel_pg, "_MQ_LOW", 1_000)
    peak = [0]
    track = tunnel_pg._Conn._mask_track

    def tracked(self: Any, m: Any) -> None:
        track(self, m)
        peak[0] = max(peak[0], len(self._mq or ()))

    monkeypatch.setattr(tunnel_pg._Conn, "_mask_track", tracked)
    s = make_session(MASKING)

    async def run() -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=s.port, database="prod", user="any",
                                     passfile=str(s.passfile), ssl=False, timeout=10)
        try:
            await conn.execute("CREATE TEMP TABLE many (id int)")
            await asyncio.wait_for(conn.executemany("INSERT INTO many VALUES ($1)",
                                                    [(i,) for i in range(20_000)]), 60)
            return int(await conn.fetchval("SELECT count(*) FROM many"))
        finally:
            await conn.close()

    assert asyncio.run(run()) == 20_000
    assert s.tunnel.errors == []
    assert 2_000 < peak[0] < 20_000  # paused above the mark: far from all 40,000 messages at once
