"""PgTunnel against a real SCRAM-only PostgreSQL cluster, driven by the real psql and pgbench."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.stack.loopthread import LoopThread
from tests.stack.pgraw import raw_exchange, raw_login, read_until
from tests.stack.ports import free_port
from tests.stack.postgres import PgCluster, seed_prod, start_cluster

from pcigate.errors import DatabaseUnavailable, PortInUse, UsageError
from pcigate.models import DatabaseCredentials
from pcigate.recording import RecordingHeader, RecordingWriter, verify_recording
from pcigate.tunnel.pg import RELAY_ENV, PgTunnel, _Conn
from pcigate.wire import pg

pytestmark = pytest.mark.integration

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


@pytest.fixture(params=["c-relay", "asyncio-relay"])
def session(request: pytest.FixtureRequest, cluster: tuple[PgCluster, str], loop: LoopThread,
            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Session]:
    """A tunnel whose plain connections take the C relay thread, or (PCIGATE_TUNNEL_RELAY=python) the
    asyncio relay: the data-path tests below hold for both."""
    if request.param == "asyncio-relay":
        monkeypatch.setenv(RELAY_ENV, "python")
    else:
        monkeypatch.delenv(RELAY_ENV, raising=False)
    c, pw = cluster
    s = Session(loop, tmp_path, creds(c, pw))
    assert s.tunnel.c_relay == (request.param == "c-relay")
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
    assert {e["reason"] for e in disconns} == {"client"}, (disconns, session.tunnel.errors)
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


def test_malformed_bytes_close_only_that_connection(session: Session) -> None:
    good = raw_login(session.port, session.secret)
    bad = raw_login(session.port, session.secret)
    bad.sendall(b"\xff\x00\x00\x00\x08garbage!")
    msgs = read_until(bad, b"E")
    assert msgs
    assert msgs[-1][0] == ord("E")
    assert pg.parse_error_fields(msgs[-1][1])["C"] == "08P01"
    assert bad.recv(100) == b""  # closed
    # a message length over the cap
    bad2 = raw_login(session.port, session.secret)
    bad2.sendall(b"Q" + struct.pack("!I", (1 << 30) + 1))
    assert pg.parse_error_fields(read_until(bad2, b"E")[-1][1])["C"] == "08P01"
    # a garbage startup packet
    bad3 = socket.create_connection(("127.0.0.1", session.port))
    bad3.sendall(b"\x7f\xff\xff\xff" + b"x" * 20)
    assert read_until(bad3, b"E")[-1][0] == ord("E")
    good.sendall(pg.query("SELECT 7"))
    msgs = read_until(good, b"Z")
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


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait_for(cond: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_relay_serves_plain_connections_to_the_end(session: Session, cluster: tuple[PgCluster, str]) -> None:
    """Which relay serves a plain connection; either way its statement is recorded with rows and duration,
    a session ended by the server reaches the client (FATAL 57P01, then the end) and is recorded as the
    server's, and no socket stays open in the tunnel's process."""
    c, _ = cluster
    first = raw_login(session.port, session.secret)  # starts the relay thread (its own three descriptors)
    first.sendall(pg.terminate())
    assert first.recv(100) == b""
    first.close()
    _wait_for(lambda: not session.tunnel._conns)
    fds = _open_fds()
    s = raw_login(session.port, session.secret, params={"application_name": "relay-check"})
    # (the tunnel's loop thread may still be handing it over when the greeting reaches the client)
    _wait_for(lambda: len(session.tunnel._relay_conns) == (1 if session.tunnel.c_relay else 0))
    s.sendall(pg.query("SELECT g FROM generate_series(1, 1000) g"))
    assert (ord("C"), b"SELECT 1000\x00") in read_until(s, b"Z")
    c.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'relay-check'")
    fatal = read_until(s, b"E")[-1]
    assert pg.parse_error_fields(fatal[1])["C"] == "57P01"
    assert s.recv(100) == b""
    s.close()
    _wait_for(lambda: not session.tunnel._conns and not session.tunnel._relay_conns)
    _wait_for(lambda: _open_fds() == fds)
    events, _ = session.finish()
    (st,) = [e for e in stmts(events) if "generate_series" in e["sql"]]
    assert (st["rows"], st["tag"], st["sqlstate"]) == (1000, "SELECT 1000", None)
    assert st["ms"] > 0
    assert [e["reason"] for e in events if e.get("e") == "disconn"] == ["client", "server"]
    assert session.tunnel.stats.bytes_down > 1000 * 9
    assert session.tunnel.stats.bytes_up > 0


def test_a_bug_in_reading_relayed_messages_costs_only_that_connection(
        cluster: tuple[PgCluster, str], loop: LoopThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fault no real component produces (an exception in the tunnel's own recording code), so injected:
    the C relay's batch reader closes that connection and goes on with the others' events."""
    monkeypatch.delenv(RELAY_ENV, raising=False)
    session = Session(loop, tmp_path, creds(*cluster))
    assert session.tunnel.c_relay
    doomed = raw_login(session.port, session.secret, params={"application_name": "doomed"})
    fine = raw_login(session.port, session.secret)
    original = _Conn._client_msgs

    def buggy(self: _Conn, msgs: list[pg.Message], now: float = 0.0) -> None:
        if self.params.get("application_name") == "doomed":
            raise RuntimeError("injected")
        original(self, msgs, now)

    monkeypatch.setattr(_Conn, "_client_msgs", buggy)
    doomed.sendall(pg.query("SELECT 1"))
    fine.sendall(pg.query("SELECT 2"))
    assert (ord("C"), b"SELECT 1\x00") in read_until(fine, b"Z")
    _wait_for(lambda: any("internal error: RuntimeError: injected" in e for e in session.tunnel.errors))
    doomed.settimeout(10)
    while doomed.recv(65536):  # its answer may have been relayed before the batch was read; then the end
        pass
    fine.sendall(pg.query("SELECT 3"))
    assert (ord("C"), b"SELECT 1\x00") in read_until(fine, b"Z")
    fine.sendall(pg.terminate())
    fine.close()
    doomed.close()
    events, _ = session.finish()
    assert sorted(e["reason"] for e in events if e.get("e") == "disconn") == ["client", "internal_error"]
    assert [e["sql"] for e in stmts(events)] == ["SELECT 2", "SELECT 3"]


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
    good = raw_login(session.port, session.secret)
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


# -- security review regressions ----------------------------------------------------------------------------


def _self_signed(tmp: Path) -> ssl.SSLContext:
    key, cert = tmp / "fake.key", tmp / "fake.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True, timeout=30)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


class FakeTlsServer:
    """A hand-written 'database': answers the SSLRequest with ``S`` + ``early`` in the same write, does a real
    TLS handshake, then sends ``after_startup`` after the StartupMessage and records what it receives."""

    def __init__(self, ctx: ssl.SSLContext, early: bytes = b"", after_startup: bytes = b"") -> None:
        self.ctx, self.early, self.after_startup = ctx, early, after_startup
        self.received = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        try:
            assert conn.recv(8) == pg.ssl_request()
            conn.sendall(b"S" + self.early)
            tls = self.ctx.wrap_socket(conn, server_side=True)
            n = struct.unpack("!I", tls.recv(4))[0]
            tls.recv(n - 4)
            tls.sendall(self.after_startup)
            while chunk := tls.recv(65536):
                self.received += chunk
        except (OSError, AssertionError, struct.error):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_tls_upgrade_refuses_bytes_sent_before_the_handshake(cluster: tuple[PgCluster, str],
                                                             loop: LoopThread, tmp_path: Path) -> None:
    """Bytes buffered with the 'S' answer were sent in plaintext and must not be trusted after the upgrade
    (CVE-2021-23222 class). A real PostgreSQL cannot be made to inject bytes, so a fake server written here
    answers 'S' + a forged AuthenticationOk/ParameterStatus/ReadyForQuery in the same write, then does a
    real TLS handshake: without the check the tunnel would take the forged login as authenticated."""
    c, password = cluster
    forged = pg.auth_ok() + pg.message(b"S", b"server_version\x0099\x00") + pg.message(b"Z", b"I")
    fake = FakeTlsServer(_self_signed(tmp_path), early=forged)
    try:
        t = PgTunnel(creds(c, password, port=fake.port, sslmode="require"), "s", None)
        with pytest.raises(DatabaseUnavailable, match="sent data before the TLS handshake"):
            loop.run(t.check_upstream(timeout=5))
    finally:
        fake.close()


def test_cleartext_password_needs_verify_full() -> None:
    """With sslmode prefer/require the certificate is not checked, so a request for a cleartext password may
    come from an active attacker: refused (28000) unless verify-full (or a loopback host). Exercised on
    ``_authenticate`` directly because every test server here is on loopback."""
    from pcigate.tunnel.pg import _authenticate, _Upstream, _UpstreamError

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

        def is_closing(self) -> bool:
            return False

    ask = pg.auth_request(pg.AUTH_CLEARTEXT)

    async def attempt(sslmode: str, host: str = "db.example.com") -> tuple[bytes, BaseException | None]:
        proto = _Upstream()
        sink = Sink()
        proto.transport = sink  # type: ignore[assignment]
        proto.tls = True
        proto._buf += ask + pg.auth_ok() + pg.message(b"Z", b"I")
        c = DatabaseCredentials(host=host, port=5432, database="prod", username="u", password="pw-secret",
                                sslmode=sslmode)  # type: ignore[arg-type]
        try:
            await _authenticate(proto, c, {}, f"{host}:5432")
        except _UpstreamError as e:
            return sink.data, e
        return sink.data, None

    for mode in ("prefer", "require"):
        sent, err = asyncio.run(attempt(mode))
        assert isinstance(err, _UpstreamError)
        assert err.sqlstate == "28000"
        assert "verify-full" in err.message
        assert b"pw-secret" not in sent
    sent, err = asyncio.run(attempt("verify-full"))
    assert err is None
    assert b"pw-secret" in sent
    sent, err = asyncio.run(attempt("require", host="127.0.0.1"))
    assert err is None


def test_client_cannot_choose_another_database(session: Session) -> None:
    proc = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(session.port), "-d", "postgres",
                           "-c", "select current_database()"], env=session.env(), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode != 0
    assert "this session is for database prod" in proc.stderr
    assert session.psql("-c", "select current_database()").stdout.strip() == "prod"
    s = raw_login(session.port, session.secret, params={"database": "template1"}, expect_error=True)
    s.close()
    events, _ = session.finish()
    assert [e["reason"] for e in events if e.get("e") == "disconn"].count("wrong_database") == 2


def _backends(cluster: PgCluster, app: str) -> int:
    return int(cluster.psql(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'"))


def test_no_upstream_login_before_local_auth(session: Session, cluster: tuple[PgCluster, str]) -> None:
    c, _ = cluster
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", session.port), timeout=10)
        s.sendall(pg.startup_message({"user": "x", "database": "prod", "application_name": "unauth-probe"}))
        t, n = struct.unpack("!BI", s.recv(5))
        assert t == ord("R")
        s.recv(n - 4)
        socks.append(s)
    time.sleep(0.5)  # long enough for 20 upstream logins, had they been started
    assert _backends(c, "unauth-probe") == 0
    for s in socks:
        s.close()
    events, _ = session.finish()
    assert not [e for e in events if e.get("e") in ("conn", "disconn")]
    assert session.tunnel.stats.connections == 0


def test_stalled_handshake_is_closed(session: Session) -> None:
    session.tunnel._handshake_timeout = 0.3
    silent = socket.create_connection(("127.0.0.1", session.port), timeout=5)
    started = socket.create_connection(("127.0.0.1", session.port), timeout=5)
    started.sendall(pg.startup_message({"user": "x", "database": "prod"}))
    for s in (silent, started):
        msgs = read_until(s, b"E")
        f = pg.parse_error_fields(msgs[-1][1])
        assert (f["C"], f["M"]) == ("08006", "authentication timeout")
        assert s.recv(100) == b""
        s.close()
    # an authenticated connection outlives the deadline
    good = raw_login(session.port, session.secret)
    time.sleep(0.5)
    good.sendall(pg.query("SELECT 1"))
    assert (ord("C"), b"SELECT 1\x00") in read_until(good, b"Z")
    good.close()
    assert sum("authentication timeout" in e for e in session.tunnel.errors) == 2


@pytest.mark.parametrize("bad", [pg.message(b"E", b"no-nul"), pg.message(b"C", b"")],
                         ids=["execute-without-nul", "empty-close"])
@pytest.mark.parametrize("when", ["with-last-auth-message", "later"])
def test_malformed_message_body_fails_cleanly(session: Session, loop: LoopThread, bad: bytes,
                                              when: str) -> None:
    raised: list[dict[str, Any]] = []
    loop.loop.set_exception_handler(lambda _loop, ctx: raised.append(ctx))
    if when == "later":
        s = raw_login(session.port, session.secret)
        s.sendall(bad)
        msgs = read_until(s, b"E")
    else:
        s, msgs = raw_exchange(session.port, session.secret, after_final=bad, expect_error=True)
    assert msgs
    assert msgs[-1][0] == ord("E")
    assert pg.parse_error_fields(msgs[-1][1])["C"] == "08P01"
    assert s.recv(100) == b""
    s.close()
    assert raised == []
    assert any("protocol_error" in e for e in session.tunnel.errors)
    assert session.psql("-c", "select 9").stdout.strip() == "9"


def test_client_gone_during_upstream_login_leaves_no_backend(session: Session,
                                                             cluster: tuple[PgCluster, str]) -> None:
    """A client that disconnects (or a tunnel that closes) while the upstream login runs or has just finished
    must not leave an authenticated upstream backend behind."""
    c, _ = cluster
    for i in range(30):
        s = raw_login(session.port, session.secret, params={"application_name": "gone-early"},
                       stop_after_final=True)
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.close()
    session.loop.run(session.tunnel.close())
    deadline = time.monotonic() + 5
    while _backends(c, "gone-early") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _backends(c, "gone-early") == 0
