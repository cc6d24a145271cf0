"""The tamper-evident audit log on the real stack: ``pcigate-broker serve`` with real OpenBao, PostgreSQL and
a (tiny) real OIDC issuer; the CLI reads and verifies it as an auditor would.

Tampering is done the way an attacker with database access would: straight SQL on the broker's database
(and bytes of a stored recording), then ``POST /v1/audit/verify`` / ``pcigate audit verify`` must name the
first bad event. Every tamper is undone before the next test."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tests.integration.test_broker_api import (
    Broker,
    broker_stack,
    put_recording,
    recording,
    start_broker,
    stop_checked,
)
from tests.integration.test_broker_support import MiniIssuer
from tests.stack.cli import pcigate_bin
from tests.stack.openbao import OpenBao
from tests.stack.postgres import PgCluster

from pcigate_broker import audit as audit_core


@dataclass
class Stack:
    pg: PgCluster
    bao: OpenBao
    issuer: MiniIssuer
    broker: Broker
    workdir: Path
    key_file: Path


def audit_toml(key_file: Path, checkpoint: str = "0s") -> str:
    return f'\n[audit]\nsigning_key_file = "{key_file}"\ncheckpoint_seconds = "{checkpoint}"\n'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("audit")
    key_file = base / "audit-ed25519.pem"
    key_file.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    with broker_stack(base, reaper=1, extra=audit_toml(key_file)) as s:
        yield Stack(pg=s.pg, bao=s.bao, issuer=s.issuer, broker=s.broker, workdir=base, key_file=key_file)


def client(stack: Stack, sub: str, groups: list[str], url: str | None = None) -> httpx.Client:
    tok = stack.issuer.token(sub, groups)
    return httpx.Client(base_url=url or stack.broker.url, headers={"Authorization": f"Bearer {tok}"},
                        timeout=60)


def activity(stack: Stack, tmp: Path, url: str | None = None) -> str:
    """A session opened, recorded, ended and uploaded: events of every kind. Returns the session id."""
    with client(stack, "alice", ["dba"], url) as alice:
        r = alice.post("/v1/sessions", json={"target": "prod-db"})
        assert r.status_code == 201, r.text
        opened = r.json()
        assert alice.post(f"/v1/sessions/{opened['session_id']}/end").status_code == 200
        data = recording(tmp, opened)
        assert put_recording(alice, opened["session_id"], data).status_code == 201
        assert alice.post("/v1/sessions", json={"target": "nope"}).status_code == 404  # a denied event
    return str(opened["session_id"])


def verify(stack: Stack) -> dict[str, Any]:
    with client(stack, "audrey", ["auditors"]) as a:
        r = a.post("/v1/audit/verify")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def db(stack: Stack) -> sqlite3.Connection:
    path = stack.broker.db_url.removeprefix("sqlite:///")
    return sqlite3.connect(path, timeout=30, isolation_level=None)


def test_the_chain_verifies_and_is_signed(stack: Stack, tmp_path: Path) -> None:
    activity(stack, tmp_path)
    result = verify(stack)
    assert result["ok"], result
    assert result["events"] >= 5
    assert result["recordings"] >= 1
    assert result["checkpoints"] >= 1
    assert result["signed_through"] > 0
    with client(stack, "alice", ["dba"]) as alice:
        assert alice.post("/v1/audit/verify").status_code == 403  # auditors only
        assert alice.get("/v1/audit").status_code == 403
    with client(stack, "audrey", ["auditors"]) as a:
        page = a.get("/v1/audit", params={"action": "session.open", "limit": 1000}).json()["items"]
    assert page
    assert {e["action"] for e in page} == {"session.open"}
    assert {e["outcome"] for e in page} >= {"success", "denied"}
    seqs = [e["seq"] for e in page]
    assert seqs == sorted(seqs)


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "rewrite", "truncate"])
def test_tampering_with_events_is_found_and_located(stack: Stack, tmp_path: Path, tamper: str) -> None:
    activity(stack, tmp_path)
    assert verify(stack)["ok"]
    conn = db(stack)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(audit_events)")]
        rows = conn.execute("SELECT * FROM audit_events WHERE seq IS NOT NULL ORDER BY seq").fetchall()
        last_cp = conn.execute("SELECT max(seq) FROM audit_checkpoints").fetchone()[0]
        assert last_cp is not None
        assert last_cp >= 4
        checkpoints = [r[0] for r in conn.execute("SELECT seq FROM audit_checkpoints ORDER BY seq")]
        victim = dict(zip(cols, rows[2], strict=True))  # event seq 3, under a signed checkpoint
        k = victim["seq"]
        max_id = max(r[cols.index("id")] for r in rows)
        undo: list[tuple[str, tuple[Any, ...]]] = []  # run after the test's own later events are dropped
        if tamper == "edit":
            flipped = "success" if victim["outcome"] != "success" else "denied"
            conn.execute("UPDATE audit_events SET outcome = ? WHERE seq = ?", (flipped, k))
            undo.append(("UPDATE audit_events SET outcome = ? WHERE seq = ?", (victim["outcome"], k)))
            want, words = k, "altered"
        elif tamper == "delete":
            conn.execute("DELETE FROM audit_events WHERE seq = ?", (k,))
            marks = ", ".join("?" for _ in cols)
            undo.append((f"INSERT INTO audit_events ({', '.join(cols)}) VALUES ({marks})",
                         tuple(victim[c] for c in cols)))
            want, words = k, "missing"
        elif tamper == "reorder":
            other = dict(zip(cols, rows[3], strict=True))
            conn.execute("UPDATE audit_events SET seq = -1 WHERE seq = ?", (k,))
            conn.execute("UPDATE audit_events SET seq = ? WHERE seq = ?", (k, k + 1))
            conn.execute("UPDATE audit_events SET seq = ? WHERE seq = -1", (k + 1,))
            undo += [("UPDATE audit_events SET seq = -1 WHERE id = ?", (victim["id"],)),
                     ("UPDATE audit_events SET seq = ? WHERE id = ?", (k + 1, other["id"])),
                     ("UPDATE audit_events SET seq = ? WHERE id = ?", (k, victim["id"]))]
            want, words = k, "does not follow"
        elif tamper == "rewrite":
            # an attacker who understands the chain: edit event k and recompute every hash after it. Only
            # the signed checkpoint gives it away.
            from sqlalchemy import create_engine, select
            from sqlalchemy.orm import Session

            from pcigate_broker.store.tables import AuditEvent

            old = {r[cols.index("seq")]: (r[cols.index("detail")], r[cols.index("prev_hash")],
                                          r[cols.index("hash")]) for r in rows}
            engine = create_engine(stack.broker.db_url)
            with Session(engine) as s:
                evs = list(s.scalars(select(AuditEvent).where(AuditEvent.seq >= k).order_by(AuditEvent.seq)))
                prev = evs[0].prev_hash or ""
                evs[0].detail = {**(evs[0].detail or {}), "forged": True}
                for ev in evs:
                    ev.prev_hash = prev
                    prev = ev.hash = audit_core.link(prev, ev)
                s.commit()
            engine.dispose()
            for seq, (detail, prev_hash, h) in old.items():
                undo.append(("UPDATE audit_events SET detail = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                             (detail, prev_hash, h, seq)))
            want, words = min(c for c in checkpoints if c >= k), "checkpoint"
        else:  # truncate: drop the newest events, including the last signed one
            gone = [dict(zip(cols, r, strict=True)) for r in rows if r[cols.index("seq")] >= last_cp]
            conn.execute("DELETE FROM audit_events WHERE seq >= ?", (last_cp,))
            marks = ", ".join("?" for _ in cols)
            for g in gone:
                undo.append((f"INSERT INTO audit_events ({', '.join(cols)}) VALUES ({marks})",
                             tuple(g[c] for c in cols)))
            # the chain goes on from the signed checkpoint, so the events up to it are found missing
            want, words = last_cp, "missing"
        result = verify(stack)
        assert not result["ok"], result
        assert result["first_bad_seq"] == want, result
        assert words in result["error"], result
    finally:
        # events the broker wrote meanwhile (the verify calls' own) chained onto the tampered log: drop them.
        # SQLite gives a new row max(id) + 1, so after the newest rows were deleted (truncate) the broker's
        # rows can take their ids: those go too before the originals are put back (CI saw the clash once)
        conn.execute("DELETE FROM audit_events WHERE id > ?", (max_id,))
        for sql, args in undo:
            if sql.startswith("INSERT"):
                conn.execute("DELETE FROM audit_events WHERE id = ?", (args[cols.index("id")],))
        conn.execute("DELETE FROM audit_checkpoints WHERE seq > ?", (rows[-1][cols.index("seq")],))
        for sql, args in undo:
            conn.execute(sql, args)
        conn.close()
    assert verify(stack)["ok"]


def test_an_altered_recording_is_found(stack: Stack, tmp_path: Path) -> None:
    sid = activity(stack, tmp_path)
    with client(stack, "audrey", ["auditors"]) as a:
        items = a.get("/v1/audit", params={"action": "recording.upload", "limit": 1000}).json()["items"]
    ev = next(e for e in items if e["session_id"] == sid and e["outcome"] == "success")
    sha = ev["detail"]["sha256"]
    path = stack.broker.recordings / sha[:2] / sha
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-2] + b"X\n")
        result = verify(stack)
        assert not result["ok"]
        assert result["first_bad_seq"] == ev["seq"]
        assert sid in result["error"]
    finally:
        path.write_bytes(original)
    assert verify(stack)["ok"]


def test_cli_audit_list_cef_and_verify(stack: Stack, tmp_path: Path) -> None:
    activity(stack, tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PCIGATE_BROKER": stack.broker.url,
           "PCIGATE_TOKEN": stack.issuer.token("audrey", ["auditors"]), "NO_COLOR": "1", "COLUMNS": "200",
           "PCIGATE_STATE_DIR": str(tmp_path / "state")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(pcigate_bin()), *args], env=env, capture_output=True, text=True,
                              timeout=120)

    ok = run("audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert "audit log ok" in ok.stderr
    from datetime import UTC, datetime, timedelta

    later = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    recent = run("audit", "verify", "--since", later, "--json")
    assert recent.returncode == 0, recent.stderr
    assert json.loads(recent.stdout)["recordings"] == 0  # the chain is checked whole, no recording re-hashed
    cef = run("audit", "--action", "session.open", "--format", "cef")
    assert cef.returncode == 0, cef.stderr
    lines = cef.stdout.splitlines()
    assert lines
    assert all(line.startswith("CEF:0|pcigate|pcigate-broker|") for line in lines)
    assert any("suser=alice" in line and "|session.open|session.open|" in line for line in lines)
    js = run("audit", "--actor", "alice", "--json")
    assert js.returncode == 0, js.stderr
    assert {e["actor"] for e in json.loads(js.stdout)} == {"alice"}
    conn = db(stack)
    try:
        (actor,) = conn.execute("SELECT actor FROM audit_events WHERE seq = 2").fetchone()
        conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")
        bad = run("audit", "verify")
        assert bad.returncode == 16, bad.stderr
        assert "failed at event 2" in bad.stderr
    finally:
        conn.execute("UPDATE audit_events SET actor = ? WHERE seq = 2", (actor,))
        conn.close()
    assert run("audit", "verify").returncode == 0


def test_two_replicas_on_postgresql_keep_one_chain(stack: Stack, tmp_path: Path) -> None:
    stack.pg.psql("CREATE DATABASE audit_store")
    pg = stack.pg
    url = f"postgresql+psycopg://{pg.superuser}:{pg.superuser_password}@127.0.0.1:{pg.port}/audit_store"
    token = stack.bao.create_broker_token()
    replicas = [start_broker(stack.workdir / f"replica{i}", stack.issuer, stack.bao, stack.pg, token,
                             db_url=url, reaper=1, recordings_dir=stack.workdir / "shared-recordings",
                             extra=audit_toml(stack.key_file)) for i in range(2)]
    try:
        errors: list[str] = []

        def work(i: int) -> None:
            try:
                for j in range(6):
                    activity(stack, tmp_path / f"w{i}-{j}", url=replicas[(i + j) % 2].url)
            except Exception as e:  # reported below
                errors.append(repr(e))

        (tmp_path / "x").mkdir()
        for i in range(4):
            for j in range(6):
                (tmp_path / f"w{i}-{j}").mkdir()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        for rep in replicas:  # both replicas verify the same single chain
            with httpx.Client(base_url=rep.url, timeout=120, headers={
                    "Authorization": "Bearer " + stack.issuer.token("audrey", ["auditors"])}) as a:
                result = a.post("/v1/audit/verify").json()
            assert result["ok"], (result["first_bad_seq"], result["error"])
            assert result["events"] >= 4 * 6 * 5
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=pg.port, dbname="audit_store", user=pg.superuser,
                             password=pg.superuser_password) as conn:
            row = conn.execute("SELECT count(*), min(seq), max(seq), count(DISTINCT seq) FROM audit_events "
                               "WHERE seq IS NOT NULL").fetchone()
        assert row is not None
        n, lo, hi, distinct = row
        assert (lo, hi, distinct) == (1, n, n)  # no gaps, no forks
    finally:
        for rep in replicas:
            stop_checked(rep)


def test_retention_cuts_old_history_and_the_chain_still_verifies(stack: Stack, tmp_path: Path) -> None:
    """A broker of its own with a 3 s retention (allowed only with allow_short_retention): what is older goes,
    a signed checkpoint stays at the cut, the deletion is itself an audit event, and verification goes on
    from the cut."""
    extra = audit_toml(stack.key_file) + ('retention = "3s"\nallow_short_retention = true\n'
                                          'retention_check_seconds = "1s"\n')
    own = start_broker(stack.workdir / "retention", stack.issuer, stack.bao, stack.pg,
                       stack.bao.create_broker_token(), reaper=1, extra=extra)
    try:
        old_sid = activity(stack, tmp_path, url=own.url)
        with client(stack, "alice", ["dba"], own.url) as alice:
            sha = alice.get(f"/v1/sessions/{old_sid}").json()["recording_sha256"]
        assert (own.recordings / sha[:2] / sha).exists()
        deadline = time.monotonic() + 30
        with client(stack, "audrey", ["auditors"], own.url) as a:
            runs: list[dict[str, Any]] = []
            # (earlier runs may cut only the first events, e.g. broker.start, before the session is old)
            while time.monotonic() < deadline and not any(r["detail"]["recordings_deleted"] for r in runs):
                time.sleep(0.5)
                runs = a.get("/v1/audit", params={"action": "retention.run"}).json()["items"]
            assert runs, "no retention run"
            run = next(r for r in runs if r["detail"]["recordings_deleted"])
            assert run["detail"]["events_deleted"] >= 1
            assert run["detail"]["sessions_deleted"] >= 1
            cut = max(r["detail"]["cut_seq"] for r in runs)
            assert not (own.recordings / sha[:2] / sha).exists()
            with client(stack, "alice", ["dba"], own.url) as alice:
                assert alice.get(f"/v1/sessions/{old_sid}").status_code == 404
            activity(stack, tmp_path / "after", url=own.url)
            result = a.post("/v1/audit/verify").json()
            assert result["ok"], (result["first_bad_seq"], result["error"])
            assert result["signed_through"] >= cut
            events = a.get("/v1/audit", params={"limit": 1000}).json()["items"]
            assert min(e["seq"] for e in events) > cut  # nothing up to the cut survives (later runs cut more)
    finally:
        stop_checked(own)


class HttpSiem:
    """An NDJSON collector that answers 503 until ``up`` is set."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.up = threading.Event()
        self.batches: list[tuple[dict[str, str], bytes]] = []
        self.refused = 0
        siem = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not siem.up.is_set():
                    siem.refused += 1
                    self.send_response(503)
                    self.end_headers()
                    return
                siem.batches.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seqs(self) -> list[int]:
        return [json.loads(line)["seq"] for _, b in self.batches for line in b.splitlines() if line]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SyslogSiem:
    """An RFC 5424 / RFC 6587 (octet-counted) TCP collector, started on a port reserved in advance."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[str] = []
        self.server: Any = None

    def start(self) -> None:
        import socketserver

        siem = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                data = self.rfile.read()
                while data:
                    n, _, rest = data.partition(b" ")
                    size = int(n)
                    siem.messages.append(rest[:size].decode())
                    data = rest[size:]

        socketserver.TCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seqs(self) -> list[int]:
        import re

        return [int(m.group(1)) for msg in self.messages if (m := re.search(r' seq="(\d+)"', msg))]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def test_siem_outage_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    """Both SIEMs are down while events happen; once they are up they receive every sealed event, in order,
    once per seq (a batch may be repeated after a crash: receivers deduplicate by seq)."""
    from tests.stack.ports import free_port

    from pcigate_broker.notify import verify_signature

    http_siem = HttpSiem()
    syslog_port = free_port()
    syslog_siem = SyslogSiem(syslog_port)
    secret = stack.workdir / "siem-secret"
    secret.write_text("siem-secret-0123456789")
    extra = audit_toml(stack.key_file) + f'''forward_interval_seconds = "1s"

[[audit.forward]]
name = "http-collector"
kind = "https"
url = "{http_siem.url}"
secret_file = "{secret}"
batch = 7

[[audit.forward]]
name = "syslog-collector"
kind = "syslog"
host = "127.0.0.1"
port = {syslog_port}
tls = false
'''
    own = start_broker(stack.workdir / "siem", stack.issuer, stack.bao, stack.pg,
                       stack.bao.create_broker_token(), reaper=1, extra=extra)
    try:
        for i in range(3):
            activity(stack, tmp_path / f"a{i}", url=own.url)
        time.sleep(3)  # several forwarding attempts fail meanwhile
        assert http_siem.refused >= 1
        assert not http_siem.batches
        http_siem.up.set()
        syslog_siem.start()
        with client(stack, "audrey", ["auditors"], own.url) as a:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                head = max(e["seq"] for e in a.get("/v1/audit", params={"limit": 1000}).json()["items"])
                if set(range(1, head + 1)) <= set(http_siem.seqs()) and \
                        set(range(1, head + 1)) <= set(syslog_siem.seqs()):
                    break
                time.sleep(0.5)
        for got in (http_siem.seqs(), syslog_siem.seqs()):
            assert set(range(1, head + 1)) <= set(got)
            assert got == sorted(got)  # in chain order
            assert len(set(got)) == len(got)  # and here, with no crash, exactly once
        for headers, body in http_siem.batches:
            assert headers["content-type"] == "application/x-ndjson"
            assert verify_signature(b"siem-secret-0123456789", headers["x-pcigate-signature"], body,
                                    now=time.time())
        first = syslog_siem.messages[0]
        assert first.startswith("<")
        assert "1 " in first[:8]
        assert " pcigate-broker - " in first
        assert "[pcigate@32473 seq=" in first
    finally:
        stop_checked(own)
        http_siem.stop()
        syslog_siem.stop()


def test_evidence_pack_for_an_assessor(stack: Stack, tmp_path: Path) -> None:
    import hashlib
    import zipfile

    sid = activity(stack, tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PCIGATE_BROKER": stack.broker.url,
           "PCIGATE_TOKEN": stack.issuer.token("audrey", ["auditors"]), "NO_COLOR": "1",
           "PCIGATE_STATE_DIR": str(tmp_path / "state")}
    out = tmp_path / "evidence.zip"
    r = subprocess.run([str(pcigate_bin()), "audit", "evidence", str(out), "--since", "1h", "--json"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["verification_ok"]
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert {"verification.json", "events.ndjson", "sessions.json", "pci-dss.md", "manifest.json",
                f"recordings/{sid}.rec"} <= names
        manifest = json.loads(zf.read("manifest.json"))
        assert manifest["verification_ok"]
        for name, meta in manifest["files"].items():  # every file is what the manifest says
            assert hashlib.sha256(zf.read(name)).hexdigest() == meta["sha256"], name
        sessions = {s["session_id"]: s for s in json.loads(zf.read("sessions.json"))}
        rec = zf.read(f"recordings/{sid}.rec")
        assert hashlib.sha256(rec).hexdigest() == sessions[sid]["recording_sha256"]
        events = [json.loads(x) for x in zf.read("events.ndjson").splitlines()]
        assert any(e["action"] == "recording.upload" and e["session_id"] == sid for e in events)
        assert json.loads(zf.read("verification.json"))["ok"]
        assert b"10.5.1" in zf.read("pci-dss.md")
    bad = subprocess.run([str(pcigate_bin()), "audit", "evidence", str(tmp_path / "x.tar")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2


def test_events_name_the_callers_groups_kind_and_address(stack: Stack, tmp_path: Path) -> None:
    activity(stack, tmp_path)
    with client(stack, "alice", ["dba"]) as alice:
        assert alice.get("/v1/targets").status_code == 200
    with client(stack, "audrey", ["auditors"]) as a:
        listed = a.get("/v1/audit", params={"action": "targets.list", "actor": "alice"}).json()["items"]
    assert listed
    assert listed[-1]["detail"]["targets"] == ["prod-db"]  # what alice (dba) reaches
    with client(stack, "audrey", ["auditors"]) as a:
        logins = a.get("/v1/audit", params={"action": "auth.login", "actor": "alice"}).json()["items"]
    assert logins  # the first call with each new token
    assert logins[0]["actor_groups"] == ["dba"]
    with client(stack, "audrey", ["auditors"]) as a:
        items = a.get("/v1/audit", params={"actor": "alice", "action": "session.open", "limit": 1000}).json()
    ev = items["items"][-1]
    assert ev["actor_groups"] == ["dba"]
    assert ev["client_kind"] == "human"
    assert ev["source"].startswith("127.0.0.1:")
    # and the chain covers them: changing the recorded address is found
    conn = db(stack)
    try:
        conn.execute("UPDATE audit_events SET source = '10.0.0.66:4444' WHERE seq = ?", (ev["seq"],))
        result = verify(stack)
        assert not result["ok"]
        assert result["first_bad_seq"] == ev["seq"]
    finally:
        conn.execute("UPDATE audit_events SET source = ? WHERE seq = ?", (ev["source"], ev["seq"]))
        conn.close()
    assert verify(stack)["ok"]


def test_blocked_statements_and_broker_start_are_events(stack: Stack, tmp_path: Path) -> None:
    from datetime import datetime

    from pcigate.recording import RecordingHeader, RecordingWriter

    with client(stack, "alice", ["dba"]) as alice:
        opened = alice.post("/v1/sessions", json={"target": "prod-db"}).json()
        sid = opened["session_id"]
        assert alice.post(f"/v1/sessions/{sid}/end").status_code == 200
        hdr = RecordingHeader(session_id=sid, user="alice", target="prod-db", level=opened["level"],
                              lease_id=opened["lease_id"], policy_digest=opened["policy"]["digest"],
                              started_at=datetime.fromisoformat(opened["started_at"]))
        w = RecordingWriter(tmp_path / "b.rec", hdr)
        w.event("stmt", c=1, sql="DROP TABLE customers", proto="simple", params=0, ms=0.0, rows=None,
                tag=None, sqlstate="42501", error="blocked", blocked="no-drop")
        w.stmt(1, "select 1", False, "simple", 0, 0.1, 1, "SELECT 1", None, None)
        w.close()
        assert put_recording(alice, sid, (tmp_path / "b.rec").read_bytes()).status_code == 201
    with client(stack, "audrey", ["auditors"]) as a:
        blocked = a.get("/v1/audit", params={"action": "statement.blocked"}).json()["items"]
        starts = a.get("/v1/audit", params={"action": "broker.start"}).json()["items"]
    mine = [e for e in blocked if e["session_id"] == sid]
    assert len(mine) == 1
    assert mine[0]["detail"]["rule"] == "no-drop"
    assert mine[0]["detail"]["sql"] == "DROP TABLE customers"
    assert mine[0]["outcome"] == "denied"
    assert starts
    assert len(starts[0]["detail"]["config_sha256"]) == 64
    assert starts[0]["detail"]["audit_key"]



def test_syslog_over_tls_with_the_collectors_ca(stack: Stack, tmp_path: Path) -> None:
    """RFC 5425: the forwarder checks the collector's certificate (here against its own CA file) and sends
    the octet-counted messages inside TLS."""
    import socketserver
    import ssl

    from tests.stack.ports import free_port

    key, cert = tmp_path / "collector.key", tmp_path / "collector.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=collector",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    received: list[bytes] = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn = ctx.wrap_socket(self.request, server_side=True)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            received.append(data)
            conn.unwrap()

    port = free_port()
    socketserver.TCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    extra = audit_toml(stack.key_file) + f'''forward_interval_seconds = "1s"

[[audit.forward]]
name = "tls-syslog"
kind = "syslog"
host = "127.0.0.1"
port = {port}
tls = true
ca_file = "{cert}"
'''
    own = start_broker(stack.workdir / "siem-tls", stack.issuer, stack.bao, stack.pg,
                       stack.bao.create_broker_token(), reaper=1, extra=extra)
    try:
        activity(stack, tmp_path, url=own.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b"session.open" not in b"".join(received):
            time.sleep(0.3)
        data = b"".join(received)
        assert b"session.open" in data
        n, _, rest = data.partition(b" ")
        assert rest[: int(n)].startswith(b"<")  # octet-counted RFC 5424 inside the TLS stream
    finally:
        stop_checked(own)
        server.shutdown()
        server.server_close()
