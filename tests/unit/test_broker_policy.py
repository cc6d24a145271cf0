"""policy.py: pure decisions over [[access]] rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from pcigate.models import Identity
from pcigate_broker.errors import ApiError
from pcigate_broker.policy import allowed_levels, decide, is_auditor, visible_targets
from pcigate_broker.settings import Settings, settings_from_dict

BASE: dict[str, Any] = {
    "oidc": {"issuer": "http://127.0.0.1:8700", "audience": "pcigate"},
    "auditors": {"groups": ["auditors"]},
    "targets": {
        "prod-db": {"host": "db", "database": "prod", "default_level": "read", "levels": {
            "read": {"vault_role": "r", "ttl_cap": "1h"}, "admin": {"vault_role": "a", "ttl_cap": "30m"}}},
        "ops-db": {"host": "db", "database": "ops", "levels": {
            "admin": {"vault_role": "oa", "ttl_cap": "2h"}, "read": {"vault_role": "or", "ttl_cap": "8h"}}},
    },
    "access": [
        {"group": "dba", "target": "*", "levels": ["*"]},
        {"group": "dev", "target": "prod-db", "levels": ["read"]},
        {"group": "oncall", "target": "ops-db", "levels": ["admin"]},
        {"subject": "ci-bot", "target": "prod-db", "levels": ["read"]},
    ],
}


def settings() -> Settings:
    return settings_from_dict(BASE, environ={"PCIGATE_BROKER_VAULT_TOKEN": "t"})


def who(sub: str = "u", *groups: str) -> Identity:
    return Identity(subject=sub, groups=list(groups), issuer="i", expires_at=datetime.now(UTC))


def test_levels_by_group_subject_and_wildcards() -> None:
    s = settings()
    assert allowed_levels(s, who("a", "dba"), "ops-db") == ["admin", "read"]
    assert allowed_levels(s, who("a", "dev"), "prod-db") == ["read"]
    assert allowed_levels(s, who("a", "dev"), "ops-db") == []
    assert allowed_levels(s, who("ci-bot"), "prod-db") == ["read"]
    assert allowed_levels(s, who("x", "dev", "oncall"), "nope") == []


def test_visible_targets_and_default_levels() -> None:
    s = settings()
    ts = {t.name: t for t in visible_targets(s, who("a", "oncall", "dev"))}
    assert set(ts) == {"prod-db", "ops-db"}
    assert ts["ops-db"].default_level == "admin"  # ops-db default (first level) held
    assert [lvl.max_ttl_seconds for lvl in ts["ops-db"].levels] == [7200]
    assert visible_targets(s, who("nobody")) == []


def test_decide_ttl_and_errors() -> None:
    s = settings()
    g = decide(s, who("a", "dba"), "prod-db", None, None)
    assert (g.level, g.ttl_seconds, g.vault_role, g.vault_mount) == ("read", 3600, "r", "database")
    assert decide(s, who("a", "dba"), "prod-db", "admin", 99999).ttl_seconds == 1800
    assert decide(s, who("a", "dba"), "prod-db", "admin", 60).ttl_seconds == 60
    # a caller who only holds "admin" on ops-db gets it as their default
    assert decide(s, who("a", "oncall"), "ops-db", None, None).level == "admin"
    with pytest.raises(ApiError) as ei:
        decide(s, who("a", "dev"), "prod-db", "admin", None)
    assert (ei.value.status, ei.value.code) == (403, "level_not_allowed")
    assert "allowed: read" in ei.value.message
    with pytest.raises(ApiError) as ei:
        decide(s, who("a", "dev"), "prod-db", "superuser", None)
    assert ei.value.code == "level_not_allowed"
    for target, ident in (("nope", who("a", "dba")), ("ops-db", who("a", "dev"))):
        with pytest.raises(ApiError) as ei:
            decide(s, ident, target, None, None)
        assert (ei.value.status, ei.value.code) == (404, "unknown_target")


def test_auditor() -> None:
    s = settings()
    assert is_auditor(s, who("a", "auditors"))
    assert not is_auditor(s, who("a", "dba"))
