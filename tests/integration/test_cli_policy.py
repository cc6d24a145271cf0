"""``pcigate targets --show-policy`` through the real stack (real broker, IdP, OpenBao, PostgreSQL), on a
stack of its own whose broker config carries a data-path policy for prod-db."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.stack.broker import TARGET, edit_broker_config
from tests.stack.cli import login_device, run_cli
from tests.stack.stack import Stack

from pcigate.models import TargetInfo

POLICY: dict[str, Any] = {
    "guardrails": [
        {"name": "no-drop", "deny": ["drop_table", "drop_database"], "message": "no drops on prod-db"},
    ],
    "masking": {"pan": "truncate", "sensitive_columns": ["cvv", "pin"]},
}
READ_POLICY: dict[str, Any] = {
    "masking": {
        "pan": "redact",
        "track_data": True,
        "columns": [{"table": "payments.cards", "column": "holder", "action": "hash"}, {"column": "notes"}],
    },
    "guardrails": [
        {"name": "read-only", "deny": ["write", "truncate", "ddl"], "relations": ["payments.cards"],
         "message": "the read level is read-only"},
    ],
}


@pytest.fixture(scope="module")
def pstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("policy"), start_broker=False)
    stack.start()
    try:
        def add_policy(cfg: dict[str, Any]) -> None:
            target = cfg["targets"][TARGET]
            target.update(POLICY)
            target["levels"]["read"].update(READ_POLICY)

        edit_broker_config(stack.broker_config_path, add_policy)
        stack.start_broker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def env(pstack: Stack, tmp_path: Path) -> dict[str, str]:
    return pstack.cli_env(tmp_path / "home", token=pstack.idp.workload_token())


def test_show_policy_json(env: dict[str, str]) -> None:
    r = run_cli(["targets", "--show-policy", "--json"], env)
    assert r.code == 0, r.stderr
    items = [TargetInfo.model_validate(t) for t in json.loads(r.stdout)]
    (prod,) = [t for t in items if t.name == TARGET]
    pols = {lv.name: lv.policy for lv in prod.levels}
    read, admin = pols["read"], pols["admin"]
    assert read is not None
    assert admin is not None
    assert read.masking is not None
    assert read.masking.pan == "redact"
    assert [(c.table, c.column, c.action) for c in read.masking.columns] == [
        ("payments.cards", "holder", "hash"), (None, "notes", "redact")]
    assert [g.name for g in read.guardrails] == ["no-drop", "read-only"]
    assert admin.masking is not None
    assert admin.masking.pan == "truncate"
    assert admin.masking.sensitive_columns == ["cvv", "pin"]
    assert [g.name for g in admin.guardrails] == ["no-drop"]
    assert read.digest != admin.digest
    assert len(read.digest) == 64
    # without --show-policy: the plain list, no policies
    plain = run_cli(["targets", "--json"], env)
    assert plain.code == 0, plain.stderr
    assert all(lv.get("policy") is None for t in json.loads(plain.stdout) for lv in t["levels"])


def test_show_policy_human(env: dict[str, str]) -> None:
    r = run_cli(["targets", "--show-policy"], env)
    assert r.code == 0, r.stderr
    out = r.stdout
    assert "Traceback" not in out + r.stderr
    for words in [
        TARGET,
        "level read (default), max 1h",
        "level admin, max 30m",
        "PAN fully redacted",
        "PAN truncated (first 6 / last 4 kept)",
        "payments.cards.holder: hash",
        "notes (any table): redact",
        "sensitive columns (any table, redacted): cvv, pin",
        "no-drop: deny drop_table, drop_database (on any relation)",
        "message: no drops on prod-db",
        "read-only: deny write, truncate, ddl (on payments.cards)",
        "message: the read level is read-only",
        "recording: on",
    ]:
        assert words in out, (words, out)
    # the read level's section has both rules, the admin level's only the target-wide one (the stack's ssh
    # target web-1, listed after prod-db, has a level admin of its own)
    read_part, admin_part = out.split("web-1")[0].split("level admin")
    assert "read-only" in read_part
    assert "read-only" not in admin_part
    assert "no-drop" in admin_part


def test_show_policy_human_user_login(pstack: Stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    env = pstack.cli_env(home)
    assert login_device(env, pstack.idp, "alice").code == 0
    r = run_cli(["targets", "--show-policy"], env)
    assert r.code == 0, r.stderr
    assert "PAN fully redacted" in r.stdout
