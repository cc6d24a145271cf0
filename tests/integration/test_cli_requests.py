"""Just-in-time access through the real CLI, on a stack of its own where ``admin`` on prod-db is request-only.

Three people sign in at the real IdP (device flow): alice (dba) asks, carol (dba + approvers) reviews, bob
(developers) is outside both. Everything goes through ``pcigate`` as a user would type it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.stack.broker import TARGET, edit_broker_config
from tests.stack.cli import CliProcess, CliResult, login_device, run_cli
from tests.stack.stack import Stack

REQUEST_POLICY: dict[str, Any] = {
    "approver_groups": ["approvers"],
    "reason_pattern": "^INC-[0-9]+$",
    "max_duration": "20m",
}


@pytest.fixture(scope="module")
def jstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("jit"), start_broker=False)
    stack.start()
    try:
        def request_only(cfg: dict[str, Any]) -> None:
            cfg["targets"][TARGET]["levels"]["admin"]["request"] = REQUEST_POLICY
            cfg["access"].append({"group": "developers", "target": TARGET, "levels": ["read"]})

        edit_broker_config(stack.broker_config_path, request_only)
        stack.start_broker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def homes(jstack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """A signed-in CLI environment per person."""
    out: dict[str, dict[str, str]] = {}
    for user in ("alice", "carol", "bob"):
        env = jstack.cli_env(tmp_path_factory.mktemp(f"home-{user}"))
        r = login_device(env, jstack.idp, user)
        assert r.code == 0, r.output
        out[user] = env
    return out


def cli(env: dict[str, str], *args: str, timeout: float = 60.0) -> CliResult:
    return run_cli(list(args), env=env, timeout=timeout)


def as_json(r: CliResult) -> Any:
    assert r.code == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_the_whole_flow_through_the_cli(jstack: Stack, homes: dict[str, dict[str, str]]) -> None:
    alice, carol, bob = homes["alice"], homes["carol"], homes["bob"]
    # targets says which level needs a request
    levels = {lv["name"]: lv for lv in as_json(cli(alice, "targets", "--json"))[0]["levels"]}
    assert levels["admin"]["request_only"]
    table = cli(alice, "targets")
    assert "admin+" in table.stdout
    assert "on request only" in table.stderr
    # connect without a grant: exactly what to run
    r = cli(alice, "connect", "prod-db", "--level", "admin", "--no-exec")
    assert r.code == 4, r.stdout + r.stderr
    assert "pcigate request prod-db --level admin" in r.stderr
    assert "Traceback" not in r.stderr
    # ask, and wait for the decision in the background
    waiting = CliProcess(["request", "prod-db", "--level", "admin", "--reason", "INC-4711", "--for", "10m",
                          "--wait", "--json"], alice)
    try:
        pending = as_json(cli(carol, "requests", "--pending", "--json"))
        mine = [p for p in pending if p["requester"] == "alice" and p["status"] == "pending"]
        for _ in range(50):
            if mine:
                break
            pending = as_json(cli(carol, "requests", "--pending", "--json"))
            mine = [p for p in pending if p["requester"] == "alice" and p["status"] == "pending"]
        assert mine, pending
        rid = mine[0]["request_id"]
        assert mine[0]["can_review"]
        # alice cannot approve her own; bob (outside) cannot even see it
        own = cli(alice, "approve", rid)
        assert own.code == 4, own.stderr
        assert "own request" in own.stderr
        outsider = cli(bob, "approve", rid)
        assert outsider.code == 5, outsider.stderr
        assert "no such request" in outsider.stderr
        ok = as_json(cli(carol, "approve", rid, "--comment", "go ahead", "--json"))
        assert ok["status"] == "approved"
        done = waiting.wait(60)
        assert done.code == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["status"] == "approved"
    finally:
        waiting.kill()
    # now admin works, and the session shows its grant
    r = cli(alice, "connect", "prod-db", "--level", "admin", "--", "-X", "-A", "-t", "-c",
            "select current_user")
    assert r.code == 0, r.stdout + r.stderr
    m = re.search(r"session (\S+) ended", r.stderr)
    assert m, r.stderr
    shown = as_json(cli(alice, "sessions", "show", m.group(1), "--json"))
    assert shown["grant"]["request_id"] == rid
    assert shown["grant"]["approved_by"] == ["carol"]
    human = cli(alice, "sessions", "show", m.group(1))
    assert rid in human.stdout
    # approving twice is a conflict with its own exit code
    again = cli(carol, "approve", rid)
    assert again.code == 15, again.stderr
    assert "already approved" in again.stderr
    # carol revokes the grant: admin is closed again
    revoked = as_json(cli(carol, "revoke", rid, "--reason", "incident closed", "--json"))
    assert revoked["status"] == "revoked"
    r = cli(alice, "connect", "prod-db", "--level", "admin", "--no-exec")
    assert r.code == 4


def test_denied_request_and_rules_refused_with_one_line(jstack: Stack,
                                                       homes: dict[str, dict[str, str]]) -> None:
    alice, carol = homes["alice"], homes["carol"]
    bad = cli(alice, "request", "prod-db", "--level", "admin", "--reason", "because")
    assert bad.code == 2, bad.stderr
    assert "^INC-[0-9]+$" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) <= 2  # one line (and maybe a hint), no traceback
    long = cli(alice, "request", "prod-db", "--level", "admin", "--reason", "INC-1", "--for", "3h")
    assert long.code == 2
    assert "at most" in long.stderr
    standing = cli(alice, "request", "prod-db", "--level", "read", "--reason", "INC-1")
    assert standing.code == 15
    assert "needs no request" in standing.stderr
    waiting = CliProcess(["request", "prod-db", "--level", "admin", "--reason", "INC-9", "--wait"], alice)
    try:
        rid = ""
        for _ in range(50):
            items = as_json(cli(alice, "requests", "--mine", "--pending", "--json"))
            if items:
                rid = items[0]["request_id"]
                break
        assert rid
        nodeny = cli(carol, "deny", rid, "--reason", "")
        assert nodeny.code == 2
        denied = as_json(cli(carol, "deny", rid, "--reason", "use read for this", "--json"))
        assert denied["status"] == "denied"
        done = waiting.wait(60)
        assert done.code == 4, done.stderr
        assert "denied: use read for this" in done.stderr
    finally:
        waiting.kill()
    listing = cli(alice, "requests", "--mine")
    assert rid in listing.stdout
    assert "denied" in listing.stdout


def test_request_wait_connect(jstack: Stack, homes: dict[str, dict[str, str]], tmp_path: Path) -> None:
    """``request --wait --connect`` connects as soon as the request is approved."""
    alice, carol = homes["alice"], homes["carol"]
    proc = CliProcess(["request", "prod-db", "--level", "admin", "--reason", "INC-77", "--for", "5m",
                       "--wait", "--connect"], alice, stdin_data="select 'connected as ' || current_user;\n")
    try:
        rid = ""
        for _ in range(50):
            items = as_json(cli(carol, "requests", "--pending", "--json"))
            if items:
                rid = items[0]["request_id"]
                break
        assert rid
        as_json(cli(carol, "approve", rid, "--json"))
        done = proc.wait(90)
        assert done.code == 0, done.stdout + done.stderr
        assert "connected as v-" in done.stdout
    finally:
        proc.kill()
    cli(carol, "revoke", rid)
