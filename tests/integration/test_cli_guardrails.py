"""The broker's data-path policy reaches the tunnel through ``pcigate connect`` and is applied there, on a
stack of its own: a guardrail blocks a DROP typed in real psql (the table survives, the uploaded recording
marks the statement blocked); a level whose policy masks card data shows only first 6 / last 4 in psql and
in the uploaded recording."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.stack.broker import TARGET, edit_broker_config
from tests.stack.cli import run_cli
from tests.stack.stack import Stack

READ: dict[str, Any] = {
    "guardrails": [
        {"name": "no-drop", "deny": ["drop_table", "drop_database", "truncate"],
         "message": "dropping objects on prod-db goes through change management"},
    ],
}
ADMIN: dict[str, Any] = {"masking": {"pan": "truncate"}}
SESSION_ENDED = re.compile(r"session (\S+) ended; recording uploaded")


@pytest.fixture(scope="module")
def gstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("guardrails"), start_broker=False)
    stack.start()
    try:
        def add_policy(cfg: dict[str, Any]) -> None:
            levels = cfg["targets"][TARGET]["levels"]
            levels["read"].update(READ)
            levels["admin"].update(ADMIN)

        edit_broker_config(stack.broker_config_path, add_policy)
        stack.start_broker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def token(gstack: Stack) -> str:
    return gstack.idp.workload_token()


@pytest.fixture
def env(gstack: Stack, tmp_path: Path, token: str) -> dict[str, str]:
    return gstack.cli_env(tmp_path / "home", token=token)


def test_drop_is_blocked_in_psql_and_recorded(gstack: Stack, env: dict[str, str], token: str) -> None:
    r = run_cli(["connect", "prod-db", "--", "-X", "-c", "/* harmless? */ DrOp TABLE \"customers\"",
                 "-c", "select count(*) from customers"], env=env)
    out = r.stdout + r.stderr
    assert "dropping objects on prod-db goes through change management" in out
    assert "ERROR:" in r.stderr  # psql shows the refusal like any server error
    assert r.stdout.split()[2] == "3"  # and the same connection goes on: the next statement ran
    assert gstack.pg.psql("select count(*) from customers", "prod") == "3"  # the table is intact
    sid = SESSION_ENDED.search(out)
    assert sid, out
    with httpx.Client(base_url=gstack.broker_url, headers={"Authorization": f"Bearer {token}"}) as c:
        rec = c.get(f"/v1/sessions/{sid.group(1)}/recording")
    assert rec.status_code == 200
    stmts = [e for e in map(json.loads, rec.text.splitlines()[1:]) if e.get("e") == "stmt"]
    blocked = [e for e in stmts if e.get("blocked")]
    assert [(e["blocked"], e["sqlstate"]) for e in blocked] == [("no-drop", "42501")]
    assert gstack.bao.leases() == []


def test_allowed_statements_still_run(env: dict[str, str]) -> None:
    r = run_cli(["connect", "prod-db", "--", "-X", "-A", "-t", "-c", "select count(*) from customers"],
                env=env)
    assert r.code == 0, r.stderr
    assert r.stdout.split()[0] == "3"


def test_masking_policy_masks_card_numbers_on_screen_and_in_the_recording(
    gstack: Stack, env: dict[str, str], token: str
) -> None:
    r = run_cli(["connect", "prod-db", "--level", "admin", "--", "-X", "-A", "-t", "-c",
                 "select card_number from customers order by id",
                 "-c", "select 'typed: 4111111111111111'"], env=env)
    assert r.code == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["411111******1111", "5500 00** **** 0004", "3400-00****-*0009"]
    assert "typed: 411111******1111" in r.stdout
    for clear in ("4111111111111111", "5500 0000 0000 0004", "3400-000000-00009"):
        assert clear not in r.stdout + r.stderr
    sid = SESSION_ENDED.search(r.stdout + r.stderr)
    assert sid, r.stderr
    with httpx.Client(base_url=gstack.broker_url, headers={"Authorization": f"Bearer {token}"}) as c:
        rec = c.get(f"/v1/sessions/{sid.group(1)}/recording")
    assert rec.status_code == 200
    assert "4111111111111111" not in rec.text  # the SQL text typed in psql is masked in the recording too
    assert "411111******1111" in rec.text
    assert gstack.bao.leases() == []
