"""Just-in-time access at the broker API: requests, reviews, grants, webhooks, audit, concurrency.

Real ``pcigate-broker serve`` processes, real OpenBao minting real PostgreSQL roles, a real (tiny) OIDC
issuer; a real HTTP receiver for the webhooks. Users: alice (dba: may request admin), bob (dba-leads:
approves), carol (security: approves the two-person level), dave (dev: reads only, approves nothing), erin
(dba and dba-leads: may ask and approve, never her own).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from tests.integration.test_broker_api import Broker, broker_stack, start_broker, stop_checked
from tests.integration.test_broker_support import MiniIssuer
from tests.stack.openbao import OpenBao
from tests.stack.postgres import PgCluster

from pcigate_broker.notify import verify_signature
from pcigate_broker.store.repo import audit_events

HOOK_SECRET = "whsec-test-0123456789"

REQUESTS_TOML = """
[targets.prod-db.levels.admin.request]
approver_groups = ["dba-leads"]
reason_pattern = "^INC-[0-9]+$"
max_duration = "20m"

[targets.prod-db.levels.pair]
vault_role = "prod-db-admin"
ttl_cap = "30m"

[targets.prod-db.levels.pair.request]
approver_groups = ["dba-leads", "security"]
one_per_group = true

[targets.prod-db.levels.two]
vault_role = "prod-db-admin"
ttl_cap = "30m"

[targets.prod-db.levels.two.request]
approver_groups = ["dba-leads", "security"]
approvals = 2

[targets.prod-db.levels.quick]
vault_role = "prod-db-admin"
ttl_cap = "30m"

[targets.prod-db.levels.quick.request]
approver_groups = ["dba-leads"]
reason_required = false
pending_ttl = "2s"
max_duration = "4s"

[targets.prod-db.levels.strong]
vault_role = "prod-db-admin"
ttl_cap = "30m"

[targets.prod-db.levels.strong.request]
approver_groups = ["dba-leads"]
reason_required = false
require_mfa = true

[[access]]
group = "dba"
target = "prod-db"
levels = ["pair", "two", "quick", "strong"]

[[access]]
group = "dba-leads"
target = "prod-db"
levels = ["read", "admin"]
"""


@dataclass
class Hooks:
    """A webhook receiver: answers 500 to the first ``fail_first`` deliveries, then 200."""

    fail_first: int = 1
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    attempts: int = 0
    url: str = ""
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hooks.attempts += 1
                if hooks.attempts <= hooks.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                hooks.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(b) for h, b in self.received if h.get("x-pcigate-event")]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Stack:
    pg: PgCluster
    bao: OpenBao
    issuer: MiniIssuer
    broker: Broker
    hooks: Hooks
    workdir: Path


def hooks_toml(hooks: Hooks, secret_file: Path) -> str:
    return f"""
[[notifications.webhooks]]
url = "{hooks.url}"
format = "generic"
secret_file = "{secret_file}"
max_attempts = 4

[[notifications.webhooks]]
url = "{hooks.url}"
format = "slack"
events = ["request.created"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("broker-requests")
    hooks = Hooks()
    hooks.start()
    secret = base / "hook-secret"
    secret.write_text(HOOK_SECRET)
    try:
        with broker_stack(base, reaper=1, extra=REQUESTS_TOML + hooks_toml(hooks, secret)) as s:
            yield Stack(pg=s.pg, bao=s.bao, issuer=s.issuer, broker=s.broker, hooks=hooks, workdir=base)
    finally:
        hooks.stop()


USERS = {"alice": ["dba"], "bob": ["dba-leads"], "carol": ["security"], "dave": ["dev"],
         "erin": ["dba", "dba-leads"]}


def as_user(stack: Stack, sub: str, url: str | None = None, **claims: Any) -> httpx.Client:
    tok = stack.issuer.token(sub, USERS[sub], **claims)
    return httpx.Client(base_url=url or stack.broker.url, headers={"Authorization": f"Bearer {tok}"},
                        timeout=30)


def ask(c: httpx.Client, level: str = "admin", reason: str = "INC-4711", **kw: Any) -> httpx.Response:
    return c.post("/v1/requests", json={"target": "prod-db", "level": level, "reason": reason, **kw})


def created(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def err(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    return str(body["message"])


def cancel_all(c: httpx.Client) -> None:
    for item in c.get("/v1/requests", params={"mine": True}).json()["items"]:
        if item["status"] == "pending":
            c.post(f"/v1/requests/{item['request_id']}/cancel")
        elif item["status"] == "approved":
            c.post(f"/v1/requests/{item['request_id']}/revoke", json={"comment": "test cleanup"})


# ------------------------------------------------------------------------------------------------- tests


def test_request_approve_connect_and_the_session_shows_its_grant(stack: Stack) -> None:
    alice, bob = as_user(stack, "alice"), as_user(stack, "bob")
    cancel_all(alice)
    # the targets listing tells which levels need a request
    levels = {lv["name"]: lv for lv in alice.get("/v1/targets").json()[0]["levels"]}
    assert levels["admin"]["request_only"] is True
    assert levels["admin"]["approvals"] == "1 approval from dba-leads"
    assert levels["read"]["request_only"] is False
    # no grant: the exact command to ask for one
    msg = err(alice.post("/v1/sessions", json={"target": "prod-db", "level": "admin"}), 403, "grant_required")
    assert "pcigate request prod-db --level admin" in msg
    req = created(ask(alice, duration_seconds=600))
    assert req["status"] == "pending"
    assert req["duration_seconds"] == 600
    assert not req["can_review"]
    # the approver sees it as reviewable; approves
    pending = bob.get("/v1/requests", params={"pending": True}).json()["items"]
    mine = [p for p in pending if p["request_id"] == req["request_id"]]
    assert mine
    assert mine[0]["can_review"]
    r = bob.post(f"/v1/requests/{req['request_id']}/approve", json={"comment": "go"})
    assert r.status_code == 200, r.text
    approved = r.json()
    assert approved["status"] == "approved"
    assert approved["decided_by"] == "bob"
    starts = datetime.fromisoformat(approved["grant_starts_at"])
    ends = datetime.fromisoformat(approved["grant_ends_at"])
    assert 599 <= (ends - starts).total_seconds() <= 601
    # a session at admin now opens, and its credentials do not outlive the grant
    r = alice.post("/v1/sessions", json={"target": "prod-db", "level": "admin", "ttl_seconds": 1800})
    assert r.status_code == 201, r.text
    opened = r.json()
    assert datetime.fromisoformat(opened["expires_at"]) <= ends
    show = alice.get(f"/v1/sessions/{opened['session_id']}").json()
    assert show["grant"]["request_id"] == req["request_id"]
    assert show["grant"]["approved_by"] == ["bob"]
    assert show["grant"]["reason"] == "INC-4711"
    assert alice.post(f"/v1/sessions/{opened['session_id']}/end").status_code == 200
    # approving again changes nothing
    err(bob.post(f"/v1/requests/{req['request_id']}/approve", json={}), 409, "conflict")
    cancel_all(alice)


def test_rules_each_refused_with_a_clear_message(stack: Stack) -> None:
    alice, bob, dave, erin = (as_user(stack, u) for u in ("alice", "bob", "dave", "erin"))
    for c in (alice, erin):
        cancel_all(c)
    assert "required" in err(ask(alice, reason=""), 422, "validation_error")
    assert "^INC-[0-9]+$" in err(ask(alice, reason="because"), 422, "validation_error")
    assert "at most 1200s" in err(ask(alice, duration_seconds=3600), 422, "validation_error")
    err(ask(alice, level="nope"), 403, "level_not_allowed")
    err(alice.post("/v1/requests", json={"target": "nope", "level": "admin", "reason": "INC-1"}), 404,
        "unknown_target")
    assert "needs no request" in err(ask(alice, level="read"), 409, "conflict")
    err(ask(dave), 403, "level_not_allowed")  # dev may read, not ask for admin
    req = created(ask(alice))
    assert "already have a pending request" in err(ask(alice), 409, "conflict")
    # an outsider cannot see it; a non-approver who can see nothing gets 404
    err(dave.get(f"/v1/requests/{req['request_id']}"), 404, "not_found")
    err(dave.post(f"/v1/requests/{req['request_id']}/approve", json={}), 404, "not_found")
    # nobody approves their own request, even an approver
    own = created(ask(erin))
    assert "own request" in err(erin.post(f"/v1/requests/{own['request_id']}/approve", json={}), 403,
                                "forbidden")
    # a denial needs a reason, and ends the request
    assert "reason" in err(bob.post(f"/v1/requests/{req['request_id']}/deny", json={}), 422,
                           "validation_error")
    r = bob.post(f"/v1/requests/{req['request_id']}/deny", json={"comment": "use read"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "denied"
    err(bob.post(f"/v1/requests/{req['request_id']}/approve", json={}), 409, "conflict")
    err(alice.post("/v1/sessions", json={"target": "prod-db", "level": "admin"}), 403, "grant_required")
    # only the requester cancels
    err(bob.post(f"/v1/requests/{own['request_id']}/cancel"), 403, "forbidden")
    assert erin.post(f"/v1/requests/{own['request_id']}/cancel").json()["status"] == "cancelled"
    # workloads do not ask for elevated access
    bot = httpx.Client(base_url=stack.broker.url, timeout=30, headers={
        "Authorization": "Bearer " + stack.issuer.token("ci-bot", ["dba"], pcigate_workload=True)})
    assert "workload" in err(ask(bot), 403, "forbidden")


def test_n_of_m_and_one_from_each_group(stack: Stack) -> None:
    alice, bob, carol, dave = (as_user(stack, u) for u in ("alice", "bob", "carol", "dave"))
    cancel_all(alice)
    two = created(ask(alice, level="two"))
    assert two["approvals_needed"] == "2 approvals from dba-leads or security"
    err(dave.post(f"/v1/requests/{two['request_id']}/approve", json={}), 404, "not_found")
    r = bob.post(f"/v1/requests/{two['request_id']}/approve", json={})
    assert r.json()["status"] == "pending"  # one of two
    assert "already reviewed" in err(bob.post(f"/v1/requests/{two['request_id']}/approve", json={}), 409,
                                     "conflict")
    assert carol.post(f"/v1/requests/{two['request_id']}/approve", json={}).json()["status"] == "approved"
    pair = created(ask(alice, level="pair"))
    assert pair["approvals_needed"] == "one approval from each of dba-leads, security"
    assert carol.post(f"/v1/requests/{pair['request_id']}/approve", json={}).json()["status"] == "pending"
    assert bob.post(f"/v1/requests/{pair['request_id']}/approve", json={}).json()["status"] == "approved"
    cancel_all(alice)


def test_expiry_of_requests_and_of_grants(stack: Stack) -> None:
    alice, bob = as_user(stack, "alice"), as_user(stack, "bob")
    cancel_all(alice)
    late = created(ask(alice, level="quick", reason=""))
    time.sleep(2.5)
    assert "expired" in err(bob.post(f"/v1/requests/{late['request_id']}/approve", json={}), 409, "conflict")
    assert alice.get(f"/v1/requests/{late['request_id']}").json()["status"] == "expired"
    # a grant of 4 s: a session under it is cut to the grant, ended by the reaper, its lease revoked
    req = created(ask(alice, level="quick", reason="", duration_seconds=4))
    granted = bob.post(f"/v1/requests/{req['request_id']}/approve", json={}).json()
    assert granted["status"] == "approved"
    r = alice.post("/v1/sessions", json={"target": "prod-db", "level": "quick", "ttl_seconds": 600})
    assert r.status_code == 201, r.text
    opened = r.json()
    assert (datetime.fromisoformat(opened["expires_at"]) - datetime.fromisoformat(opened["started_at"])
            ).total_seconds() <= 4.5
    creds = opened["credentials"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = alice.get(f"/v1/sessions/{opened['session_id']}").json()
        if s["status"] != "active" and s["lease_revoked"]:
            break
        time.sleep(0.3)
    assert s["status"] == "expired", s
    assert s["lease_revoked"]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host="127.0.0.1", port=stack.pg.port, dbname="prod", user=creds["username"],
                        password=creds["password"], connect_timeout=5).close()
    left = (datetime.fromisoformat(granted["grant_ends_at"]) - datetime.now(UTC)).total_seconds()
    time.sleep(max(0.0, left) + 0.2)
    err(alice.post("/v1/sessions", json={"target": "prod-db", "level": "quick"}), 403, "grant_required")


def test_revoking_a_grant_ends_its_live_sessions(stack: Stack) -> None:
    alice, bob, dave = as_user(stack, "alice"), as_user(stack, "bob"), as_user(stack, "dave")
    cancel_all(alice)
    req = created(ask(alice))
    bob.post(f"/v1/requests/{req['request_id']}/approve", json={})
    opened = alice.post("/v1/sessions", json={"target": "prod-db", "level": "admin"}).json()
    conn = psycopg.connect(host="127.0.0.1", port=stack.pg.port, dbname="prod",
                           user=opened["credentials"]["username"], password=opened["credentials"]["password"])
    err(dave.post(f"/v1/requests/{req['request_id']}/revoke", json={}), 404, "not_found")
    r = bob.post(f"/v1/requests/{req['request_id']}/revoke", json={"comment": "incident over"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    s = alice.get(f"/v1/sessions/{opened['session_id']}").json()
    assert s["status"] == "revoked"
    assert s["end_reason"] == "grant_revoked"
    assert s["lease_revoked"]
    with pytest.raises(psycopg.Error):  # the role's backend was terminated with the lease
        conn.execute("SELECT 1")
    conn.close()
    err(alice.post("/v1/sessions", json={"target": "prod-db", "level": "admin"}), 403, "grant_required")


def test_mfa_required_for_a_level(stack: Stack) -> None:
    alice, bob = as_user(stack, "alice"), as_user(stack, "bob")
    cancel_all(alice)
    assert "MFA" in err(ask(alice, level="strong", reason=""), 403, "mfa_required")
    alice_mfa = as_user(stack, "alice", amr=["pwd", "otp"])
    req = created(ask(alice_mfa, level="strong", reason=""))
    bob.post(f"/v1/requests/{req['request_id']}/approve", json={})
    err(alice.post("/v1/sessions", json={"target": "prod-db", "level": "strong"}), 403, "mfa_required")
    r = alice_mfa.post("/v1/sessions", json={"target": "prod-db", "level": "strong"})
    assert r.status_code == 201, r.text
    alice_mfa.post(f"/v1/sessions/{r.json()['session_id']}/end")
    cancel_all(alice)


def test_webhooks_signed_retried_and_audit_trail(stack: Stack) -> None:
    alice, bob = as_user(stack, "alice"), as_user(stack, "bob")
    cancel_all(alice)
    req = created(ask(alice))
    bob.post(f"/v1/requests/{req['request_id']}/approve", json={"comment": "ok"})
    rid = req["request_id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        mine = [e for e in stack.hooks.events() if e.get("request", {}).get("request_id") == rid]
        if {e["event"] for e in mine} >= {"request.created", "request.decided"}:
            break
        time.sleep(0.2)
    assert {e["event"] for e in mine} >= {"request.created", "request.decided"}
    assert stack.hooks.attempts > len(stack.hooks.received)  # the first delivery failed and was retried
    for headers, body in stack.hooks.received:
        if "x-pcigate-signature" in headers:
            sig = headers["x-pcigate-signature"]
            assert verify_signature(HOOK_SECRET.encode(), sig, body, now=time.time())
            assert not verify_signature(b"wrong", sig, body, now=time.time())
    slack = [json.loads(b) for h, b in stack.hooks.received if "x-pcigate-signature" not in h]
    assert any(rid in m["text"] and "INC-4711" in m["text"] for m in slack)
    # every state change is an audit event with who and what
    engine = create_engine(stack.broker.db_url)
    with Session(engine) as db:
        events = [(e.action, e.actor, e.outcome) for e in audit_events(db)
                  if (e.detail or {}).get("access_request") == rid]
    engine.dispose()
    assert ("request.create", "alice", "success") in events
    assert ("request.approve", "bob", "success") in events
    cancel_all(alice)


def test_two_replicas_on_postgresql_never_make_two_grants(stack: Stack) -> None:
    """Two brokers on one PostgreSQL database; approvers hit both at the same instant."""
    stack.pg.psql("CREATE DATABASE broker_store")
    pg = stack.pg
    url = f"postgresql+psycopg://{pg.superuser}:{pg.superuser_password}@127.0.0.1:{pg.port}/broker_store"
    token = stack.bao.create_broker_token()
    replicas = [start_broker(stack.workdir / f"replica{i}", stack.issuer, stack.bao, stack.pg, token,
                             db_url=url, extra=REQUESTS_TOML) for i in range(2)]
    try:
        alice = as_user(stack, "alice", url=replicas[0].url)
        for _round in range(5):
            for level, approvers, want in (("admin", ("bob", "erin"), 1), ("two", ("bob", "carol"), 2)):
                cancel_all(alice)
                req = created(ask(alice, level=level, reason="INC-1"))
                clients = [as_user(stack, who, url=rep.url)
                           for who, rep in zip(approvers, replicas, strict=True)]
                barrier = threading.Barrier(2)
                results: list[httpx.Response] = []

                def approve(c: httpx.Client, rid: str = req["request_id"]) -> None:
                    barrier.wait()
                    results.append(c.post(f"/v1/requests/{rid}/approve", json={}))

                threads = [threading.Thread(target=approve, args=(c,)) for c in clients]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                final = alice.get(f"/v1/requests/{req['request_id']}").json()
                assert final["status"] == "approved", (level, final, [r.text for r in results])
                ok = [r for r in results if r.status_code == 200]
                if want == 1:  # one approval decides it; the other approver finds it decided
                    assert len(ok) == 1, [r.text for r in results]
                    assert ok[0].json()["status"] == "approved"
                    codes = [r.json()["error"]["code"] for r in results if r.status_code != 200]
                    assert codes == ["conflict"]
                else:  # both approvals count, neither is lost
                    assert len(ok) == 2
                    assert len(final["reviews"]) == 2
                with psycopg.connect(host="127.0.0.1", port=stack.pg.port, dbname="broker_store",
                                     user=stack.pg.superuser, password=stack.pg.superuser_password) as conn:
                    n = conn.execute("SELECT count(*) FROM access_requests WHERE requester = 'alice' "
                                     "AND status = 'approved'").fetchone()
                assert n is not None
                assert n[0] == 1  # one live grant, never two
    finally:
        for rep in replicas:
            stop_checked(rep)
