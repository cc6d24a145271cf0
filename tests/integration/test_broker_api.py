"""The broker end to end: ``pcigate-broker serve`` (real uvicorn, migrations at start) + real OpenBao + a real
SCRAM PostgreSQL cluster + a real (tiny) OIDC issuer. Nothing is mocked."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.integration.test_broker_support import MiniIssuer, broker_toml
from tests.stack.openbao import OpenBao, start_openbao
from tests.stack.ports import free_port
from tests.stack.postgres import PgCluster, seed_prod, start_cluster

from pcigate.recording import RecordingHeader, RecordingWriter

BROKER_BIN = Path(sys.executable).parent / "pcigate-broker"


@dataclass
class Broker:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    db_url: str
    recordings: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_broker(workdir: Path, issuer: MiniIssuer, bao: OpenBao, pg: PgCluster, token: str,
                 **kw: Any) -> Broker:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    token_file = workdir / "bao-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    db_url = kw.pop("db_url", f"sqlite:///{workdir}/broker.db")
    recordings = kw.pop("recordings_dir", workdir / "recordings")  # replicas share one store
    masking_key = workdir / "masking-key"
    masking_key.write_text("k" * 40)
    kw.setdefault("masking_key_file", masking_key)
    cfg = workdir / "broker.toml"
    cfg.write_text(broker_toml(issuer=issuer.url, vault_addr=bao.address, pg_port=pg.port, db_url=db_url,
                               recordings_dir=recordings, port=port, token_file=token_file, **kw))
    log = workdir / "broker.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(BROKER_BIN), "serve", "--config", str(cfg), "--log-level", "debug"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("broker not healthy: " + log.read_text()[-3000:])
        time.sleep(0.05)
    return Broker(url=url, proc=proc, log=log, db_url=db_url, recordings=recordings)


# Data-path policy of prod-db: a target-wide guardrail, masking on the read level only.
POLICY_TOML = """
[[targets.prod-db.guardrails]]
name = "no-drop"
deny = ["drop_table", "drop_database"]
message = "no drops on prod-db"

[targets.prod-db.levels.read.masking]
pan = "redact"

[[targets.prod-db.levels.read.masking.columns]]
table = "payments.cards"
column = "holder"
action = "hash"

[[targets.prod-db.levels.read.guardrails]]
name = "read-only"
deny = ["write", "truncate"]
"""


@dataclass
class Stack:
    pg: PgCluster
    bao: OpenBao
    issuer: MiniIssuer
    broker: Broker
    token: str


def stop_checked(broker: Broker) -> None:
    """Stop a broker and fail the test if it logged a traceback."""
    broker.stop()
    log = broker.log.read_text()
    assert "Traceback" not in log, log[-4000:]


@contextlib.contextmanager
def broker_stack(base: Path, **broker_kw: Any) -> Iterator[Stack]:
    """A SCRAM PostgreSQL cluster with the prod database, OpenBao minting its roles, a MiniIssuer, and
    ``pcigate-broker serve`` (``broker_kw`` as :func:`start_broker`) in ``base/main``; all stopped after."""
    pg = start_cluster()
    bao: OpenBao | None = None
    issuer = MiniIssuer()
    broker: Broker | None = None
    try:
        pw = seed_prod(pg)
        bao = start_openbao(log_path=base / "bao.log")
        bao.setup_database("127.0.0.1", pg.port, "bao_admin", pw)
        token = bao.create_broker_token()
        broker = start_broker(base / "main", issuer, bao, pg, token, **broker_kw)
        yield Stack(pg=pg, bao=bao, issuer=issuer, broker=broker, token=token)
    finally:
        if broker is not None:
            stop_checked(broker)
        if bao is not None:
            bao.stop()
        issuer.stop()
        pg.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with broker_stack(tmp_path_factory.mktemp("broker-api"), max_recording_bytes=64 * 1024,
                      extra=POLICY_TOML) as s:
        yield s


def client(stack: Stack, sub: str = "alice", groups: list[str] | None = None, **claims: Any) -> httpx.Client:
    tok = stack.issuer.token(sub, ["dba"] if groups is None else groups, **claims)
    return httpx.Client(base_url=stack.broker.url, headers={"Authorization": f"Bearer {tok}"}, timeout=30)


def open_session(c: httpx.Client, **body: Any) -> dict[str, Any]:
    r = c.post("/v1/sessions", json={"target": "prod-db", **body})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def recording(tmp: Path, opened: dict[str, Any], *, session_id: str | None = None, n: int = 3,
              lease_id: str | None = None) -> bytes:
    hdr = RecordingHeader(session_id=session_id or opened["session_id"], user=opened["user"],
                          target=opened["target"], level=opened["level"],
                          lease_id=lease_id or opened["lease_id"],
                          policy_digest=opened["policy"]["digest"],
                          started_at=datetime.fromisoformat(opened["started_at"]))
    path = tmp / f"{hdr.session_id}-{n}.rec"
    w = RecordingWriter(path, hdr)
    w.event("conn", c=1, peer="127.0.0.1:5000", app="psql")
    for i in range(n):
        w.event("stmt", c=1, sql=f"select {i}", proto="simple", params=0, ms=0.1, rows=1, tag="SELECT 1",
                sqlstate=None, error=None, blocked=None)
    w.close()
    return path.read_bytes()


def put_recording(c: httpx.Client, sid: str, data: bytes, digest: str | None = None) -> httpx.Response:
    return c.put(f"/v1/sessions/{sid}/recording", content=data,
                 headers={"X-Content-SHA256": digest or hashlib.sha256(data).hexdigest(),
                          "Content-Type": "application/x-ndjson"})


# ------------------------------------------------------------------------------------------------ sessions
def test_open_login_end_revokes(stack: Stack) -> None:
    with client(stack, "alice", ["dba"]) as c:
        opened = open_session(c, client_hostname="laptop-1", client_version="0.1.0")
        creds = opened["credentials"]
        assert (creds["host"], creds["port"], creds["database"], creds["sslmode"]) == (
            "127.0.0.1", stack.pg.port, "prod", "disable")
        assert opened["level"] == "read"
        assert opened["user"] == "alice"
        assert opened["heartbeat_seconds"] == 30
        pol = opened["policy"]
        assert pol["record"] is True
        assert len(pol["digest"]) == 64
        started = datetime.fromisoformat(opened["started_at"])
        expires = datetime.fromisoformat(opened["expires_at"])
        assert expires - started == timedelta(hours=1)
        assert opened["lease_id"] in stack.bao.leases()
        assert stack.pg.can_login(creds["username"], creds["password"], "prod")
        assert creds["password"] not in stack.broker.log.read_text()

        r = c.post(f"/v1/sessions/{opened['session_id']}/heartbeat")
        assert r.status_code == 200
        assert r.json()["status"] == "active"

        r = c.post(f"/v1/sessions/{opened['session_id']}/end")
        assert r.status_code == 200, r.text
        s = r.json()
        assert s["status"] == "ended"
        assert s["end_reason"] == "client"
        assert s["lease_revoked"] is True
        assert s["client_hostname"] == "laptop-1"
        assert opened["lease_id"] not in stack.bao.leases()
        assert not stack.pg.can_login(creds["username"], creds["password"], "prod")
        # idempotent
        r2 = c.post(f"/v1/sessions/{opened['session_id']}/end")
        assert r2.status_code == 200
        assert r2.json()["ended_at"] == s["ended_at"]
        r = c.post(f"/v1/sessions/{opened['session_id']}/heartbeat")
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "session_closed"
        r = c.get(f"/v1/sessions/{opened['session_id']}")
        assert r.status_code == 200
        assert r.json()["status"] == "ended"


def test_ttl_is_min_of_asked_and_cap(stack: Stack) -> None:
    with client(stack, "alice", ["dba"]) as c:
        a = open_session(c, level="admin", ttl_seconds=7200)  # cap 30m
        assert (datetime.fromisoformat(a["expires_at"]) - datetime.fromisoformat(a["started_at"])
                ) == timedelta(minutes=30)
        b = open_session(c, ttl_seconds=120)
        assert (datetime.fromisoformat(b["expires_at"]) - datetime.fromisoformat(b["started_at"])
                ) == timedelta(seconds=120)
        # admin creds can write, read creds cannot
        for s in (a, b):
            assert c.post(f"/v1/sessions/{s['session_id']}/end").status_code == 200


def test_policy_levels_and_targets(stack: Stack) -> None:
    with client(stack, "dave", ["dev"]) as dev:
        r = dev.post("/v1/sessions", json={"target": "prod-db", "level": "admin"})
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "level_not_allowed"
        assert "allowed: read" in r.json()["error"]["message"]
        s = open_session(dev)
        assert s["level"] == "read"
        assert dev.post(f"/v1/sessions/{s['session_id']}/end").status_code == 200
    with client(stack, "eve", ["marketing"]) as nobody:
        r = nobody.post("/v1/sessions", json={"target": "prod-db"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_target"
        assert nobody.get("/v1/targets").json() == []
    with client(stack, "alice") as c:
        r = c.post("/v1/sessions", json={"target": "mars-db"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unknown_target"


def test_only_owner_ends_and_heartbeats(stack: Stack) -> None:
    with client(stack, "alice") as alice, client(stack, "mallory", ["dba"]) as mallory, \
            client(stack, "audrey", ["auditors"]) as auditor:
        s = open_session(alice)
        sid = s["session_id"]
        assert mallory.post(f"/v1/sessions/{sid}/end").status_code == 404
        assert mallory.post(f"/v1/sessions/{sid}/heartbeat").status_code == 404
        assert mallory.get(f"/v1/sessions/{sid}").status_code == 404
        r = auditor.post(f"/v1/sessions/{sid}/end")
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "forbidden"
        assert auditor.get(f"/v1/sessions/{sid}").status_code == 200
        assert s["lease_id"] in stack.bao.leases()
        assert alice.post(f"/v1/sessions/{sid}/end").status_code == 200


def test_token_problems_over_http(stack: Stack) -> None:
    with client(stack, "alice", exp=int(time.time()) - 3600) as c:
        r = c.get("/v1/whoami")
        assert r.status_code == 401
        assert r.json()["error"] == {"code": "token_invalid", "message": "token expired"}
    with client(stack, "bot", [], pcigate_workload=True) as c:
        r = c.get("/v1/whoami")
        assert r.status_code == 200
        assert r.json()["client_kind"] == "workload"


# --------------------------------------------------------------------------------------------- recordings
def test_recording_upload_download_idempotent_conflict(stack: Stack, tmp_path: Path) -> None:
    with client(stack, "alice") as alice, client(stack, "mallory") as mallory, \
            client(stack, "audrey", ["auditors"]) as auditor:
        s = open_session(alice)
        sid = s["session_id"]
        data = recording(tmp_path, s)
        sha = hashlib.sha256(data).hexdigest()

        r = put_recording(alice, sid, data)  # a recording is evidence of a finished session
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "conflict"
        assert alice.post(f"/v1/sessions/{sid}/end").status_code == 200

        forged = recording(tmp_path, s, n=2, lease_id="database/creds/prod-db-read/forged")
        r = put_recording(alice, sid, forged)
        assert r.status_code == 422
        assert "lease_id" in r.json()["error"]["message"]
        r = put_recording(mallory, sid, data)
        assert r.status_code == 404  # not theirs: not even visible
        r = put_recording(auditor, sid, data)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "forbidden"
        r = put_recording(alice, sid, data, digest="0" * 64)
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "digest_mismatch"
        r = put_recording(alice, sid, data[:-20] + b"X" * 20)  # tampered tail, honest digest
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "recording_invalid"
        other = recording(tmp_path, s, session_id="another-session")
        r = put_recording(alice, sid, other)
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "recording_invalid"
        r = put_recording(alice, sid, b"", digest=hashlib.sha256(b"").hexdigest())
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "recording_invalid"
        r = alice.put(f"/v1/sessions/{sid}/recording", content=data)  # no digest header
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "validation_error"

        r = put_recording(alice, sid, data)
        assert r.status_code == 201, r.text
        assert r.json() == {"session_id": sid, "sha256": sha, "size": len(data), "events": 5,
                            "already_stored": False}
        stored = stack.broker.recordings / sha[:2] / sha
        assert stored.read_bytes() == data
        assert not [p for p in stack.broker.recordings.iterdir() if p.name.startswith(".upload")]

        r = put_recording(alice, sid, data)
        assert r.status_code == 200
        assert r.json()["already_stored"] is True
        r = put_recording(alice, sid, recording(tmp_path, s, n=4))
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "conflict"

        r = alice.get(f"/v1/sessions/{sid}/recording")
        assert r.status_code == 200
        assert r.content == data
        assert r.headers["x-content-sha256"] == sha
        assert auditor.get(f"/v1/sessions/{sid}/recording").content == data
        assert mallory.get(f"/v1/sessions/{sid}/recording").status_code == 404
        summary = alice.get(f"/v1/sessions/{sid}").json()
        assert summary["recording_sha256"] == sha
        assert summary["recording_size"] == len(data)

        s2 = open_session(alice)
        r = alice.get(f"/v1/sessions/{s2['session_id']}/recording")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
        for x in (s, s2):
            alice.post(f"/v1/sessions/{x['session_id']}/end")


def test_recording_too_large(stack: Stack, tmp_path: Path) -> None:
    with client(stack, "alice") as alice:
        s = open_session(alice)
        assert alice.post(f"/v1/sessions/{s['session_id']}/end").status_code == 200
        data = recording(tmp_path, s, n=1500)  # > 64 KiB cap of this broker
        assert len(data) > 64 * 1024
        r = put_recording(alice, s["session_id"], data)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "too_large"

        # chunked (no Content-Length): the cap applies while streaming
        def gen() -> Iterator[bytes]:
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        r = alice.put(f"/v1/sessions/{s['session_id']}/recording", content=gen(),
                      headers={"X-Content-SHA256": hashlib.sha256(data).hexdigest()})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "too_large"
        assert not [p for p in stack.broker.recordings.iterdir() if p.name.startswith(".upload")]
        alice.post(f"/v1/sessions/{s['session_id']}/end")


# ------------------------------------------------------------------------------------------------ listing
def test_list_filters_paging_and_auditors(stack: Stack) -> None:
    with client(stack, "lister", ["dba"]) as me, client(stack, "lister2", ["dev"]) as other, \
            client(stack, "audrey", ["auditors"]) as auditor:
        t0 = datetime.now(UTC)
        mine = [open_session(me)["session_id"] for _ in range(5)]
        theirs = open_session(other)["session_id"]
        for sid in mine:
            me.post(f"/v1/sessions/{sid}/end")
        other.post(f"/v1/sessions/{theirs}/end")

        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            r = me.get("/v1/sessions", params=params)
            assert r.status_code == 200, r.text
            page = r.json()
            seen += [i["session_id"] for i in page["items"]]
            assert all(i["user"] == "lister" for i in page["items"])
            pages += 1
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert sorted(seen) == sorted(mine)
        assert len(seen) == len(set(seen))
        assert pages == 3
        assert me.get("/v1/sessions", params={"user": "lister2"}).status_code == 403
        assert me.get("/v1/sessions", params={"user": "lister"}).status_code == 200

        r = auditor.get("/v1/sessions", params={"since": t0.isoformat(), "limit": 200})
        ids = {i["session_id"] for i in r.json()["items"]}
        assert set(mine) | {theirs} <= ids
        r = auditor.get("/v1/sessions", params={"user": "lister2", "since": t0.isoformat()})
        assert [i["session_id"] for i in r.json()["items"]] == [theirs]
        r = auditor.get("/v1/sessions", params={"until": t0.isoformat(), "user": "lister"})
        assert r.json()["items"] == []
        r = auditor.get("/v1/sessions", params={"target": "staging-db", "user": "lister"})
        assert r.json()["items"] == []
        r = auditor.get("/v1/sessions", params={"since": "2020-01-01T00:00:00"})  # no timezone
        assert r.status_code == 422


# --------------------------------------------------------------------------------------- reaper, outages
def test_reaper_expires_and_heartbeat_lost(stack: Stack, tmp_path: Path) -> None:
    fast = start_broker(tmp_path / "fast", stack.issuer, stack.bao, stack.pg, stack.token,
                        heartbeat=1, grace=3, reaper=1)
    try:
        with client(stack, "alice") as c0:
            c = httpx.Client(base_url=fast.url, headers=dict(c0.headers), timeout=30)
            short = open_session(c, ttl_seconds=2)
            silent = open_session(c, ttl_seconds=600)
            beating = open_session(c, ttl_seconds=600)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                c.post(f"/v1/sessions/{beating['session_id']}/heartbeat")
                a = c.get(f"/v1/sessions/{short['session_id']}").json()
                b = c.get(f"/v1/sessions/{silent['session_id']}").json()
                if a["lease_revoked"] and b["lease_revoked"]:
                    break
                time.sleep(0.5)
            assert a["status"] == "expired"
            assert a["end_reason"] == "expired"
            assert a["lease_revoked"]
            assert b["status"] == "revoked"
            assert b["end_reason"] == "heartbeat_lost"
            assert b["lease_revoked"]
            leases = stack.bao.leases()
            assert short["lease_id"] not in leases
            assert silent["lease_id"] not in leases
            cr = short["credentials"]
            assert not stack.pg.can_login(cr["username"], cr["password"], "prod")
            assert c.get(f"/v1/sessions/{beating['session_id']}").json()["status"] == "active"
            assert c.post(f"/v1/sessions/{beating['session_id']}/end").status_code == 200
            c.close()
    finally:
        fast.stop()


def test_outages_vault_and_database(tmp_path: Path) -> None:
    """Own PostgreSQL + OpenBao (they get stopped): 503 database_unavailable, then 503 vault_unavailable."""
    pg = start_cluster()
    bao = start_openbao()
    issuer = MiniIssuer()
    broker = None
    try:
        pw = seed_prod(pg)
        bao.setup_database("127.0.0.1", pg.port, "bao_admin", pw)
        broker = start_broker(tmp_path / "b", issuer, bao, pg, bao.root_token)
        tok = issuer.token("alice", ["dba"])
        with httpx.Client(base_url=broker.url, headers={"Authorization": f"Bearer {tok}"}, timeout=30) as c:
            s = open_session(c)
            pg.stop()
            r = c.post("/v1/sessions", json={"target": "prod-db"})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable"
            bao.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            bao.proc.wait(10)  # type: ignore[union-attr]
            r = c.post("/v1/sessions", json={"target": "prod-db"})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "vault_unavailable"
            r = c.post(f"/v1/sessions/{s['session_id']}/end")
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "vault_unavailable"
            shown = c.get(f"/v1/sessions/{s['session_id']}").json()
            assert shown["status"] == "ended"
            assert shown["lease_revoked"] is False
    finally:
        if broker is not None:
            broker.stop()
        issuer.stop()
        bao.stop()
        pg.stop()


def test_targets_with_and_without_policy_and_session_policy(stack: Stack) -> None:
    with client(stack, "alice") as c:
        plain = c.get("/v1/targets")
        assert plain.status_code == 200
        for t in plain.json():
            assert all("policy" not in lv for lv in t["levels"])  # the wire format of older clients
        assert c.get("/v1/targets", params={"include_policy": "false"}).json() == plain.json()
        full = c.get("/v1/targets", params={"include_policy": "true"})
        assert full.status_code == 200
        levels = {lv["name"]: lv["policy"] for lv in full.json()[0]["levels"]}
        assert set(levels) == {"read", "admin"}
        read, admin = levels["read"], levels["admin"]
        assert read["record"] is True
        assert read["masking"]["pan"] == "redact"
        assert read["masking"]["columns"] == [
            {"table": "payments.cards", "column": "holder", "action": "hash"}]
        assert [g["name"] for g in read["guardrails"]] == ["no-drop", "read-only"]
        assert read["guardrails"][0]["message"] == "no drops on prod-db"
        assert read["guardrails"][0]["deny"] == ["drop_table", "drop_database"]
        assert admin["masking"] is None
        assert [g["name"] for g in admin["guardrails"]] == ["no-drop"]
        assert len({read["digest"], admin["digest"]}) == 2
        assert c.get("/v1/targets", params={"include_policy": "maybe"}).status_code == 422
        # the session gets exactly the policy shown for its level, and the target's masking key only when the
        # policy hashes columns (the same key every time, so hashed values join across sessions)
        keys: list[str | None] = []
        for level, shown in [*levels.items(), ("read", levels["read"])]:
            opened = open_session(c, level=level)
            assert opened["policy"] == shown
            keys.append(opened.get("masking_key"))
            assert c.post(f"/v1/sessions/{opened['session_id']}/end").status_code == 200
        assert keys[1] is None  # admin: no hash rule
        assert keys[0] is not None
        assert keys[0] == keys[2]
        assert len(base64.urlsafe_b64decode(keys[0])) == 32
        # the same config gives the same digests on a second call
        again = c.get("/v1/targets", params={"include_policy": "true"}).json()
        assert {lv["name"]: lv["policy"]["digest"] for lv in again[0]["levels"]} == {
            k: v["digest"] for k, v in levels.items()}
    with client(stack, "dave", ["dev"]) as dev:  # only what the caller reaches, policies included
        got = {t["name"]: [lv["name"] for lv in t["levels"]]
               for t in dev.get("/v1/targets", params={"include_policy": "true"}).json()}
        assert got == {"prod-db": ["read"], "staging-db": ["read"]}
