"""The store on both back ends: SQLite (file, WAL) and PostgreSQL (a throwaway database on the machine's
server at 127.0.0.1:5432, dropped afterwards). Migrations, repository functions, paging, reaper claims."""

from __future__ import annotations

import secrets
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text

from pcigate_broker.store import repo
from pcigate_broker.store.db import downgrade, make_engine, make_sessionmaker, upgrade
from pcigate_broker.store.tables import SessionRow

PG_ADMIN = ["psql", "-X", "-h", "127.0.0.1", "-p", "5432", "-U", "postgres", "-d", "postgres", "-Atc"]


def _pg_available() -> bool:
    try:
        return subprocess.run([*PG_ADMIN, "select 1"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path}/sub/broker.db")
        yield eng
        eng.dispose()
        return
    if not _pg_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    name = "pcigate_broker_test_" + secrets.token_hex(4)
    subprocess.run([*PG_ADMIN, f"CREATE DATABASE {name}"], check=True, capture_output=True)
    eng = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    try:
        yield eng
    finally:
        eng.dispose()
        subprocess.run([*PG_ADMIN, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], check=True,
                       capture_output=True)


def _row(sid: str, *, user: str = "alice", started: datetime, ttl: int = 3600, target: str = "prod-db",
         hb: datetime | None = None) -> SessionRow:
    return SessionRow(id=sid, user=user, user_name=None, client_kind="human", groups=["dba"], target=target,
                      level="read", status="active", started_at=started,
                      expires_at=started + timedelta(seconds=ttl),
                      lease_id=f"database/creds/prod-db-read/{sid}",
                      lease_revoked=False, last_heartbeat_at=hb or started, client_hostname=None,
                      client_version=None)


def test_migrations_up_down_idempotent(engine: Engine) -> None:
    upgrade(engine)
    upgrade(engine)  # idempotent
    tables = set(inspect(engine).get_table_names())
    assert {"sessions", "audit_events", "alembic_version"} <= tables
    cols = {c["name"] for c in inspect(engine).get_columns("sessions")}
    assert {"lease_revoked", "recording_sha256", "recording_events", "last_heartbeat_at"} <= cols
    downgrade(engine, "base")
    assert "sessions" not in set(inspect(engine).get_table_names())
    upgrade(engine)
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:
            assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_sessions_roundtrip_paging_and_claims(engine: Engine) -> None:
    upgrade(engine)
    maker = make_sessionmaker(engine)
    t0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    with maker() as db:
        for i in range(7):
            repo.add_session(db, _row(f"s{i}", started=t0 + timedelta(minutes=i // 2),
                                      user="alice" if i % 3 else "bob"))
        repo.audit(db, at=t0, action="session.open", outcome="success", actor="alice", session_id="s1",
                   detail={"level": "read"})
        db.commit()
    with maker() as db:
        row = repo.get_session(db, "s1")
        assert row is not None
        assert row.started_at.tzinfo is not None
        assert row.started_at == t0
        assert row.groups == ["dba"]
        # paging: newest first, ties broken by id, no duplicates or gaps
        seen: list[str] = []
        cursor = None
        while True:
            rows, cursor = repo.list_sessions(db, limit=3, cursor=cursor)
            seen += [r.id for r in rows]
            if cursor is None:
                break
        assert seen == ["s6", "s5", "s4", "s3", "s2", "s1", "s0"]
        rows, _ = repo.list_sessions(db, user="bob")
        assert [r.id for r in rows] == ["s6", "s3", "s0"]
        rows, _ = repo.list_sessions(db, since=t0 + timedelta(minutes=1), until=t0 + timedelta(minutes=3))
        assert [r.id for r in rows] == ["s5", "s4", "s3", "s2"]
        with pytest.raises(repo.BadCursor):
            repo.list_sessions(db, cursor="!!")
        assert repo.audit_events(db, session_id="s1")[0].detail == {"level": "read"}

        # claims: only the first wins
        now = t0 + timedelta(hours=2)
        assert repo.claim_end(db, session_id="s0", status="ended", reason="client", now=now)
        assert not repo.claim_end(db, session_id="s0", status="expired", reason="expired", now=now)
        assert repo.claim_recording(db, session_id="s0", sha256="a" * 64, size=1, events=1)
        assert not repo.claim_recording(db, session_id="s0", sha256="b" * 64, size=1, events=1)
        db.commit()
        row = repo.get_session(db, "s0")
        db.refresh(row)
        assert row is not None
        assert row.status == "ended"
        assert row.recording_sha256 == "a" * 64
        assert ("s0", "database/creds/prod-db-read/s0") in repo.unrevoked_leases(db)
        repo.mark_lease_revoked(db, session_id="s0")
        db.commit()
        assert all(sid != "s0" for sid, _ in repo.unrevoked_leases(db))


def test_due_sessions_and_concurrent_reapers(engine: Engine) -> None:
    upgrade(engine)
    maker = make_sessionmaker(engine)
    now = datetime.now(UTC)
    with maker() as db:
        repo.add_session(db, _row("expired", started=now - timedelta(hours=2), ttl=60,
                                  hb=now - timedelta(seconds=5)))
        repo.add_session(db, _row("silent", started=now - timedelta(minutes=10), ttl=3600,
                                  hb=now - timedelta(minutes=5)))
        repo.add_session(db, _row("alive", started=now - timedelta(minutes=10), ttl=3600,
                                  hb=now - timedelta(seconds=10)))
        db.commit()
    with maker() as db:
        due = {d.session_id: (d.status, d.reason) for d in repo.sessions_due(db, now=now, grace_seconds=120)}
    assert due == {"expired": ("expired", "expired"), "silent": ("revoked", "heartbeat_lost")}

    wins: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def reaper() -> None:
        with maker() as db:
            barrier.wait()
            for sid, (status, reason) in due.items():
                if repo.claim_end(db, session_id=sid, status=status, reason=reason, now=now):
                    with lock:
                        wins.append(sid)
                db.commit()

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == ["expired", "silent"]  # each claimed exactly once


def test_a_waiting_seal_covers_what_a_sealing_replica_commits(engine: Engine) -> None:
    """The audit check (POST /v1/audit/verify) seals with ``wait``: while another replica holds the sealer's
    lock (mid-seal, uncommitted), it waits, then seals and reads the whole chain, instead of checking the
    part already committed (seen once in CI: 2 of 120 events checked, reported ok)."""
    from pcigate_broker import audit

    upgrade(engine)
    sm = make_sessionmaker(engine)
    t0 = datetime.now(UTC)
    with sm() as db:
        for i in range(3):
            repo.audit(db, at=t0, action="session.open", outcome="success", actor=f"u{i}")
        db.commit()
    if engine.dialect.name != "postgresql":
        with sm() as db:
            assert audit.seal(db, wait=True) == 3
        return
    holder = sm()  # another replica, mid-seal
    holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": audit._ADVISORY_KEY})
    with sm() as db:
        assert audit.seal(db) == 0  # the reaper's way: leave it to the replica that seals
    timer = threading.Timer(0.5, holder.rollback)
    timer.start()
    try:
        with sm() as db:
            assert audit.seal(db, wait=True) == 3
            assert audit.verify(db, key=None).events == 3
    finally:
        timer.join()
        holder.close()
