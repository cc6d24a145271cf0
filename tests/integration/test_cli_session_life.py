"""Sessions that outlive their ID token or their end time, on a stack of their own.

The stack's IdP issues ID tokens living ``TOKEN_TTL`` seconds, the broker has no clock leeway and wants a
heartbeat every second; the ``admin`` level is capped at ``ADMIN_CAP`` seconds and the reaper runs rarely,
so only the CLI itself can end a session on time.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.stack.cli import CliResult, login_browser, run_cli
from tests.stack.stack import Stack

TOKEN_TTL = 5
ADMIN_CAP = 6
SESSION_ENDED = re.compile(r"session (\S+) ended; recording uploaded")


@pytest.fixture(scope="module")
def lstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("session-life"),
        id_token_ttl=TOKEN_TTL,
        broker_options={
            "heartbeat_seconds": 1,
            "heartbeat_grace_seconds": 4,
            "reaper_interval_seconds": 60,
            "leeway_seconds": 0,
            "admin_ttl_cap": ADMIN_CAP,
        },
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def env(lstack: Stack, tmp_path: Path) -> dict[str, str]:
    env = lstack.cli_env(tmp_path / "home")
    r = login_browser(env, lstack.idp, "alice")
    assert r.code == 0, r.output
    return env


def _show(session_id: str, env: dict[str, str]) -> dict:
    r = run_cli(["sessions", "show", session_id, "--json"], env)
    assert r.code == 0, r.output
    return json.loads(r.stdout)


def test_a_session_outlives_the_id_token(lstack: Stack, env: dict[str, str]) -> None:
    sleep = TOKEN_TTL * 2 + 1
    r: CliResult = run_cli(
        ["connect", "prod-db", "--", "-X", "-A", "-t", "-c", f"select pg_sleep({sleep}), 'still here'"],
        env,
        timeout=90,
    )
    assert r.code == 0, r.output
    assert "still here" in r.stdout, r.output
    assert "heartbeat failed" not in r.stderr, r.output
    m = SESSION_ENDED.search(r.stderr)
    assert m, r.stderr
    summary = _show(m.group(1), env)  # also proves the user is still signed in
    assert summary["status"] == "ended", summary
    assert summary["end_reason"] not in ("heartbeat_lost", "revoked"), summary
    assert summary["recording_sha256"]
    assert summary["lease_id"] not in lstack.bao.leases()
    who = run_cli(["whoami", "--json"], env)
    assert who.code == 0, who.output
    assert json.loads(who.stdout)["subject"] == "alice"


def test_psql_is_ended_when_the_session_reaches_its_end_time(lstack: Stack, env: dict[str, str]) -> None:
    t0 = time.monotonic()
    r = run_cli(
        ["connect", "prod-db", "--level", "admin", "--", "-X", "-c", "select pg_sleep(60)"], env, timeout=90
    )
    took = time.monotonic() - t0
    assert took < ADMIN_CAP + 8, (took, r.output)
    assert "Traceback" not in r.output
    assert re.search(r"the session reached its end time|the broker ended the session", r.stderr), r.stderr
    m = SESSION_ENDED.search(r.stderr)
    assert m, r.stderr
    summary = _show(m.group(1), env)
    assert summary["status"] != "active"
    assert summary["lease_id"] not in lstack.bao.leases()
