"""PgTunnel against a real SCRAM-only PostgreSQL cluster, driven by the real psql and pgbench."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from tests.stack.ports import free_port
from tests.stack.postgres import PgCluster, seed_prod, start_cluster

from pcigate.errors import DatabaseUnavailable, PortInUse, UsageError
from pcigate.models import DatabaseCredentials
from pcigate.recording import RecordingHeader, RecordingWriter, verify_recording
from pcigate.tunnel.pg import PgTunnel
from pcigate.wire import pg
from pcigate.wire.scram import ScramClient

pytestmark = pytest.mark.integration

T = TypeVar("T")
APP_USER = "app_user"


@pytest.fixture(scope="session")
def cluster() -> Iterator[tuple[PgCluster, str]]:
    c = start_cluster()
    try:
        seed_prod(c)
        password = secrets.token_urlsafe(24)
        c.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{password}'")
        c.psql(f"GRANT ALL ON DATABASE prod TO {APP_USER}")
        c.psql(f"GRANT ALL ON SCHEMA public TO {APP_USER}; "
               f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER};"
               f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {APP_USER}", database="prod")
        yield c, password
    finally:
        c.stop()


class LoopThread:
    """An event loop in a thread (uvloop if importable, as the CLI runs) so blocking psql runs beside it."""

    def __init__(self) -> None:
        try:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


def creds(cluster: PgCluster, password: str, **kw: Any) -> DatabaseCredentials:
    base: dict[str, Any] = {"host": "127.0.0.1", "port": cluster.port, "database": "prod",
                            "username": APP_USER, "password": password, "sslmode": "prefer"}
    base.update(kw)
    return DatabaseCredentials(**base)


class Session:
    """A running tunnel with a recorder, a PGPASSFILE, and helpers to run psql/pgbench through it."""

    def __init__(self, loop: LoopThread, tmp: Path, c: DatabaseCredentials, record: bool = True) -> None:
        self.loop = loop
        self.secret = secrets.token_urlsafe(32)
        self.rec_path = tmp / "rec" / "s.rec"
        header = RecordingHeader("sess-1", "alice", "prod-db", "write", "lease-1", "d" * 64,
                                 datetime.now(UTC))
        self.recorder = RecordingWriter(self.rec_path, header) if record else None
        self.tunnel = PgTunnel(c, self.secret, self.recorder)
        loop.run(self.tunnel.check_upstream())
        self.port = loop.run(self.tunnel.start())
        self.passfile = tmp / "pgpass"
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, f"127.0.0.1:{self.port}:*:*:{self.secret}\n".encode())
        os.close(fd)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSFILE=str(self.passfile), PGCONNECT_TIMEOUT="10")
        return env

    def psql(self, *args: str, input: str | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.port), "-d", "prod", "-v", "ON_ERROR_STOP=1",
                "-At", *args]
        proc = subprocess.run(argv, env=self.env(), input=input, capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    def finish(self) -> tuple[list[dict[str, Any]], bytes]:
        self.loop.run(self.tunnel.close())
        assert self.recorder is not None
        self.recorder.close()
        data = self.rec_path.read_bytes()
        check = verify_recording(data)
        assert check.ok, (check.error, check.line)
        return [json.loads(x) for x in data.splitlines()], data


@pytest.fixture
def session(cluster: tuple[PgCluster, str], loop: LoopThread, tmp_path: Path) -> Iterator[Session]:
    c, pw = cluster
    s = Session(loop, tmp_path, creds(c, pw))
    yield s
    loop.run(s.tunnel.close())
    if s.recorder is not None:
        s.recorder.close()


def stmts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("e") == "stmt"]


# -- the data path ------------------------------------------------------------------------------------------


def test_psql_select_insert_copy_and_recording(session: Session, cluster: tuple[PgCluster, str]) -> None:
    _, password = cluster
    out = session.psql("-c", "SELECT name FROM customers ORDER BY id").stdout.strip().split("\n")
    assert out == ["Ada Lovelace", "Alan Turing", "Grace Hopper"]
    session.psql("-c", "CREATE TABLE IF NOT EXISTS t_tunnel (id int, v text); TRUNCATE t_tunnel")
    session.psql("-c", "INSERT INTO t_tunnel VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    # COPY FROM STDIN and TO STDOUT through psql's \copy (COPY ... FROM STDIN / TO STDOUT on the wire)
    rows = "".join(f"{i}\tcopy{i}\n" for i in range(10, 1010))
    session.psql("-c", "\\copy t_tunnel FROM STDIN", input=rows)
    dumped = session.psql("-c", "COPY (SELECT * FROM t_tunnel WHERE id >= 10 ORDER BY id) TO STDOUT").stdout
    assert dumped == rows
    # multi-statement string and an error
    assert session.psql("-c", "SELECT 1; SELECT 2 UNION SELECT 3").stdout.split() == ["1", "2", "3"]
    err = session.psql("-c", "SELECT 1/0", check=False)
    assert err.returncode != 0
    assert "division by zero" in err.stderr
    # ps argv / environment of the client never carries the database password
    assert password not in " ".join(session.env().values())
    events, raw = session.finish()
    assert password.encode() not in raw
    ss = stmts(events)
    by_sql = {e["sql"]: e for e in ss}
    sel = by_sql["SELECT name FROM customers ORDER BY id"]
    assert (sel["rows"], sel["tag"], sel["proto"], sel["sqlstate"], sel["error"]) == (3, "SELECT 3", "simple",
                                                                                      None, None)
    assert sel["ms"] >= 0
    assert by_sql["INSERT INTO t_tunnel VALUES (1, 'a'), (2, 'b'), (3, 'c')"]["rows"] == 3
    multi = by_sql["SELECT 1; SELECT 2 UNION SELECT 3"]
    assert (multi["rows"], multi["tag"]) == (3, "SELECT 2")
    div = by_sql["SELECT 1/0"]
    assert (div["sqlstate"], div["error"], div["rows"]) == ("22012", "division by zero", None)
    copies = [e for e in events if e.get("e") == "copy"]
    assert {(c["direction"], c["rows"]) for c in copies} == {("in", 1000), ("out", 1000)}
    for c in copies:
        assert c["bytes"] == len(rows.encode())
    conns = [e for e in events if e.get("e") == "conn"]
    disconns = [e for e in events if e.get("e") == "disconn"]
    assert len(conns) == len(disconns) == 7
    assert all(e["app"] == "psql" for e in conns)
    assert {e["reason"] for e in disconns} == {"client"}
    assert session.tunnel.stats.connections == 7
    assert session.tunnel.stats.statements == len(ss)
    assert session.tunnel.errors == []


def _pgbench(session: Session, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(session.port), "-n", *args, "prod"],
                          env=session.env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("mode", ["extended", "prepared"])
def test_pgbench_extended_protocol(session: Session, cluster: tuple[PgCluster, str], mode: str) -> None:
    c, _ = cluster
    if c.psql("SELECT to_regclass('pgbench_accounts') IS NOT NULL", database="prod") != "t":
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", "prod"], env=c.env, check=True, capture_output=True)
        c.psql(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {APP_USER}", database="prod")
    _pgbench(session, "-M", mode, "-S", "-c", "2", "-t", "50")
    events, _ = session.finish()
    ext = [e for e in stmts(events) if e["proto"] == "extended"]
    assert len(ext) == 100
    assert {e["sql"] for e in ext} == {"SELECT abalance FROM pgbench_accounts WHERE aid = $1;"}
    assert all(e["params"] == 1 and e["rows"] == 1 and e["tag"] == "SELECT 1" for e in ext)
    assert len({e["c"] for e in ext}) == 2  # pgbench's own first connection runs no benchmark statement


def test_extended_protocol_error_recorded(session: Session, cluster: tuple[PgCluster, str]) -> None:
    _c, _ = cluster
    script = session.rec_path.parent.parent / "bad.sql"
    script.write_text("SELECT 1/(random()*0)::int;\n")
    proc = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(session.port), "-n", "-M", "extended",
                           "-t", "1", "-f", str(script), "prod"], env=session.env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    events, _ = session.finish()
    (e,) = [e for e in stmts(events) if e["proto"] == "extended"]
    assert (e["sqlstate"], e["error"], e["tag"]) == ("22012", "division by zero", None)


# -- authentication -----------------------------------------------------------------------------------------


def test_wrong_local_secret_refused(session: Session) -> None:
    bad = session.passfile.parent / "badpass"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, f"127.0.0.1:{session.port}:*:*:not-the-secret\n".encode())
    os.close(fd)
    env = session.env() | {"PGPASSFILE": str(bad)}
    proc = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(session.port), "-d", "prod", "-c",
                           "select 1"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "password authentication failed" in proc.stderr
    assert any("local authentication failed" in e for e in session.tunnel.errors)
    # no password at all
    env["PGPASSFILE"] = "/nonexistent"
    proc = subprocess.run(["psql", "-X", "-w", "-h", "127.0.0.1", "-p", str(session.port), "-d", "prod", "-c",
                           "select 1"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    # the tunnel still works
    assert session.psql("-c", "select 42").stdout.strip() == "42"


def test_check_upstream_failures(cluster: tuple[PgCluster, str], loop: LoopThread) -> None:
    c, password = cluster
    down = free_port()
    t = PgTunnel(creds(c, password, port=down), "s", None)
    with pytest.raises(DatabaseUnavailable, match="connection refused"):
        loop.run(t.check_upstream())
    wrong = "wrong-" + secrets.token_hex(8)
    t = PgTunnel(creds(c, wrong), "s", None)
    with pytest.raises(DatabaseUnavailable) as ei:
        loop.run(t.check_upstream())
    assert "password authentication failed" in str(ei.value)
    assert wrong not in str(ei.value)
    t = PgTunnel(creds(c, password, sslmode="require"), "s", None)
    with pytest.raises(DatabaseUnavailable, match="does not accept TLS"):
        loop.run(t.check_upstream())
    # a server that accepts TCP but never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t = PgTunnel(creds(c, password, port=silent.getsockname()[1]), "s", None)
        with pytest.raises(DatabaseUnavailable, match="did not answer"):
            loop.run(t.check_upstream(timeout=0.5))
    # all three upstream auth methods work (SCRAM is the cluster's; md5 via a role with an md5 hash)
    loop.run(PgTunnel(creds(c, password, sslmode="disable"), "s", None).check_upstream())


def test_upstream_failure_reaches_client(cluster: tuple[PgCluster, str], loop: LoopThread,
                                         tmp_path: Path) -> None:
    c, password = cluster
    s = Session(loop, tmp_path, creds(c, password))
    s.tunnel.upstream = creds(c, "wrong-password")  # e.g. the lease was revoked meanwhile
    proc = s.psql("-c", "select 1", check=False)
    assert proc.returncode != 0
    assert "password authentication failed" in proc.stderr
    assert "wrong-password" not in proc.stderr
    assert any("refused the login" in e for e in s.tunnel.errors)
    s.tunnel.upstream = creds(c, password, port=free_port())  # the database went away
    proc = s.psql("-c", "select 1", check=False)
    assert proc.returncode != 0
    assert "connection refused" in proc.stderr
    loop.run(s.tunnel.close())
    assert s.recorder is not None
    s.recorder.close()


def test_listen_rules(cluster: tuple[PgCluster, str], loop: LoopThread) -> None:
    c, password = cluster
    with pytest.raises(UsageError):
        loop.run(PgTunnel(creds(c, password), "s", None, listen_host="0.0.0.0").start())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t = PgTunnel(creds(c, password), "s", None, listen_port=busy.getsockname()[1])
        with pytest.raises(PortInUse):
            loop.run(t.start())


# -- cancel, malformed bytes, concurrency -------------------------------------------------------------------


def test_cancel_request_via_psql_sigint(session: Session) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(["timeout", "-s", "INT", "1.5", "psql", "-X", "-h", "127.0.0.1", "-p",
                           str(session.port), "-d", "prod", "-c", "select pg_sleep(30)"],
                          env=session.env(), capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 10
    assert "canceling statement due to user request" in proc.stderr
    events, _ = session.finish()
    (st,) = [e for e in stmts(events) if e["sql"] == "select pg_sleep(30)"]
    assert st["sqlstate"] == "57014"
    assert any(e.get("e") == "cancel" for e in events)


def _raw_login(port: int, secret: str) -> socket.socket:
    """Connect and authenticate with the tunnel by hand; returns the socket after ReadyForQuery."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(pg.startup_message({"user": "whoever", "database": "prod"}))
    client = ScramClient("", secret)
    buf = b""
    while True:
        buf += s.recv(65536)
        while len(buf) >= 5:
            t, n = struct.unpack("!BI", buf[:5])
            if len(buf) < n + 1:
                break
            body, buf = buf[5 : n + 1], buf[n + 1 :]
            if t == ord("R"):
                a = pg.parse_auth(body)
                if a.code == pg.AUTH_SASL:
                    s.sendall(pg.sasl_initial_response("SCRAM-SHA-256", client.first()))
                elif a.code == pg.AUTH_SASL_CONTINUE:
                    s.sendall(pg.sasl_response(client.final(a.data)))
                elif a.code == pg.AUTH_SASL_FINAL:
                    client.verify(a.data)
            elif t == ord("E"):
                raise AssertionError(pg.parse_error_fields(body))
            elif t == ord("Z"):
                return s


def _read_until(s: socket.socket, t: bytes) -> list[tuple[int, bytes]]:
    buf = b""
    out: list[tuple[int, bytes]] = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        buf += chunk
        while len(buf) >= 5:
            mt, n = struct.unpack("!BI", buf[:5])
            if len(buf) < n + 1:
                break
            out.append((mt, buf[5 : n + 1]))
            buf = buf[n + 1 :]
            if mt == t[0]:
                return out


def test_malformed_bytes_close_only_that_connection(session: Session) -> None:
    good = _raw_login(session.port, session.secret)
    bad = _raw_login(session.port, session.secret)
    bad.sendall(b"\xff\x00\x00\x00\x08garbage!")
    msgs = _read_until(bad, b"E")
    assert msgs
    assert msgs[-1][0] == ord("E")
    assert pg.parse_error_fields(msgs[-1][1])["C"] == "08P01"
    assert bad.recv(100) == b""  # closed
    # a message length over the cap
    bad2 = _raw_login(session.port, session.secret)
    bad2.sendall(b"Q" + struct.pack("!I", (1 << 30) + 1))
    assert pg.parse_error_fields(_read_until(bad2, b"E")[-1][1])["C"] == "08P01"
    # a garbage startup packet
    bad3 = socket.create_connection(("127.0.0.1", session.port))
    bad3.sendall(b"\x7f\xff\xff\xff" + b"x" * 20)
    assert _read_until(bad3, b"E")[-1][0] == ord("E")
    good.sendall(pg.query("SELECT 7"))
    msgs = _read_until(good, b"Z")
    assert (ord("C"), b"SELECT 1\x00") in msgs
    assert session.psql("-c", "select 8").stdout.strip() == "8"
    good.sendall(pg.terminate())
    good.close()
    bad.close()
    bad2.close()
    bad3.close()
    events, _ = session.finish()
    reasons = [e["reason"] for e in events if e.get("e") == "disconn"]
    assert sum(r.startswith("protocol_error") for r in reasons) == 2
    assert len([e for e in session.tunnel.errors if "protocol_error" in e]) == 3


def test_concurrent_clients(session: Session) -> None:
    t0 = time.monotonic()
    procs = [subprocess.Popen(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(session.port), "-d", "prod",
                               "-c", f"select pg_sleep(1), {i}"], env=session.env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=30) for p in procs]
    elapsed = time.monotonic() - t0
    assert [o[0].strip() for o in outs] == ["|0", "|1", "|2", "|3"]
    assert elapsed < 3.5, elapsed  # in parallel, not one after another
    events, _ = session.finish()
    assert len({e["c"] for e in stmts(events)}) == 4


def test_close_ends_open_connections(session: Session) -> None:
    good = _raw_login(session.port, session.secret)
    events, _ = session.finish()
    assert good.recv(100) == b""
    assert [e["reason"] for e in events if e.get("e") == "disconn"] == ["shutdown"]
    assert events[-1]["e"] == "end"


def test_large_result_memory_bounded(session: Session) -> None:
    import psutil

    rss0 = psutil.Process().memory_info().rss
    proc = subprocess.Popen(["psql", "-X", "-h", "127.0.0.1", "-p", str(session.port), "-d", "prod", "-c",
                             "COPY (SELECT g, md5(g::text) FROM generate_series(1,300000) g) TO STDOUT"],
                            env=session.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    time.sleep(1.0)  # psql is not reading: the tunnel must stop reading from the server too
    peak = psutil.Process().memory_info().rss - rss0
    data = proc.stdout.read()
    proc.wait(60)
    assert data.count(b"\n") == 300000
    assert peak < 30 * 1024 * 1024, peak
    events, _ = session.finish()
    (cp,) = [e for e in events if e.get("e") == "copy"]
    assert (cp["direction"], cp["rows"], cp["bytes"]) == ("out", 300000, len(data))
