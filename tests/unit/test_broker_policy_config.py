"""Data-path policy in broker.toml: validation, inheritance (target → level) and the policy digest."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from pcigate.models import DataPathPolicy, Identity
from pcigate_broker.policy import data_path_policy, policy_digest, visible_targets
from pcigate_broker.settings import ConfigError, Settings, settings_from_dict

ENV = {"PCIGATE_BROKER_VAULT_TOKEN": "tok", "PCIGATE_BROKER_MASKING_KEY": "m" * 32}


def base(**target_extra: Any) -> dict[str, Any]:
    return {
        "oidc": {"issuer": "http://127.0.0.1:8700", "audience": "pcigate"},
        "targets": {
            "prod-db": {
                "host": "127.0.0.1",
                "database": "prod",
                "default_level": "read",
                "levels": {
                    "read": {"vault_role": "r", "ttl_cap": "1h"},
                    "admin": {"vault_role": "a", "ttl_cap": "30m"},
                },
                **target_extra,
            }
        },
        "access": [{"group": "dba", "target": "prod-db", "levels": ["*"]}],
    }


def load(data: dict[str, Any], environ: dict[str, str] | None = None) -> Settings:
    return settings_from_dict(data, base_dir=Path("/tmp"), environ=ENV if environ is None else environ)


def problems(data: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load(data, environ)
    return ei.value.problems


NO_DROP = {"name": "no-drop", "deny": ["drop_table", "drop_database"], "message": "not here"}


def test_no_policy_configured_is_record_only() -> None:
    s = load(base())
    pol = data_path_policy(s, "prod-db", "read")
    assert pol.record is True
    assert pol.masking is None
    assert pol.guardrails == []
    assert len(pol.digest) == 64
    assert pol.digest == policy_digest(DataPathPolicy())


def test_good_config_full() -> None:
    data = base(
        masking={"pan": "redact", "track_data": True,
                 "columns": [{"table": "payments.cards", "column": "holder", "action": "hash"},
                             {"column": "notes"}]},
        guardrails=[NO_DROP],
    )
    data["targets"]["prod-db"]["levels"]["read"]["guardrails"] = [
        {"name": "read-only", "deny": ["write", "ddl"], "relations": ["payments.cards"]}]
    s = load(data)
    read = data_path_policy(s, "prod-db", "read")
    assert read.masking is not None
    assert read.masking.pan == "redact"
    assert [(c.table, c.column, c.action) for c in read.masking.columns] == [
        ("payments.cards", "holder", "hash"), (None, "notes", "redact")]
    assert "cvv" in read.masking.sensitive_columns  # default kept
    assert [g.name for g in read.guardrails] == ["no-drop", "read-only"]
    assert read.guardrails[0].message == "not here"
    assert read.guardrails[1].relations == ["payments.cards"]


def test_hash_rules_need_a_masking_key_of_32_bytes() -> None:
    data = base(masking={"columns": [{"column": "holder", "action": "hash"}]})
    out = problems(data, environ={"PCIGATE_BROKER_VAULT_TOKEN": "tok"})
    assert out == [
        "targets.prod-db.levels.read: a hash column rule needs a masking key: set masking.key_file or "
        "PCIGATE_BROKER_MASKING_KEY",
        "targets.prod-db.levels.admin: a hash column rule needs a masking key: set masking.key_file or "
        "PCIGATE_BROKER_MASKING_KEY",
    ]
    short = problems(data, environ={"PCIGATE_BROKER_VAULT_TOKEN": "tok",
                                    "PCIGATE_BROKER_MASKING_KEY": "short"})
    assert short == ["masking.key_file: the masking key must be at least 32 bytes"]
    assert load(data).masking.key is not None


def test_audit_retention_under_a_year_needs_the_override() -> None:
    data = base()
    data["audit"] = {"retention": "30d"}
    assert problems(data) == [
        "audit: retention under 365 days needs allow_short_retention = true (PCI DSS 10.5.1)"]
    data["audit"]["allow_short_retention"] = True
    assert load(data).audit.retention == 30 * 86400
    assert load(base()).audit.retention == 365 * 86400


def test_unknown_statement_class_names_the_key() -> None:
    data = base(guardrails=[{"name": "x", "deny": ["drop_table", "drop_everything"]}])
    out = problems(data)
    assert len(out) == 1
    assert out[0].startswith("targets.prod-db.guardrails.0.deny.1: ")
    data = base()
    data["targets"]["prod-db"]["levels"]["read"]["guardrails"] = [{"name": "x", "deny": ["dropp"]}]
    assert problems(data)[0].startswith("targets.prod-db.levels.read.guardrails.0.deny.0: ")


@pytest.mark.parametrize(("masking", "key"), [
    ({"columns": [{"column": "holder", "action": "encrypt"}]}, "targets.prod-db.masking.columns.0.action"),
    ({"pan": "hide"}, "targets.prod-db.masking.pan"),
    ({"pan": "truncate", "mask_everything": True}, "targets.prod-db.masking.mask_everything"),
    ({"columns": [{"column": ""}]}, "targets.prod-db.masking.columns.0.column"),
])
def test_bad_masking_names_the_key(masking: dict[str, Any], key: str) -> None:
    out = problems(base(masking=masking))
    assert len(out) == 1, out
    assert out[0].startswith(key + ": "), out


def test_bad_guardrail_rules() -> None:
    assert problems(base(guardrails=[{"name": "x", "deny": []}]))[0].startswith(
        "targets.prod-db.guardrails.0.deny: ")
    assert problems(base(guardrails=[{"deny": ["truncate"]}]))[0].startswith(
        "targets.prod-db.guardrails.0.name: ")
    assert problems(base(guardrails=[{"name": "x", "deny": ["truncate"], "action": "warn"}]))[0].startswith(
        "targets.prod-db.guardrails.0.action: ")
    # a rule name twice, on the target or between the target and one level
    assert "duplicate guardrail rule name 'no-drop'" in problems(base(guardrails=[NO_DROP, NO_DROP]))[0]
    data = base(guardrails=[NO_DROP])
    data["targets"]["prod-db"]["levels"]["admin"]["guardrails"] = [dict(NO_DROP, deny=["truncate"])]
    out = problems(data)
    assert out[0].startswith("targets.prod-db: ")
    assert "'no-drop'" in out[0]
    assert "'admin'" in out[0]


def test_inheritance_masking_replaces_guardrails_append() -> None:
    data = base(masking={"pan": "truncate", "sensitive_columns": ["cvv"]}, guardrails=[NO_DROP])
    levels = data["targets"]["prod-db"]["levels"]
    levels["read"]["masking"] = {"pan": "redact"}
    levels["read"]["guardrails"] = [{"name": "read-only", "deny": ["write"]}]
    s = load(data)
    read = data_path_policy(s, "prod-db", "read")
    admin = data_path_policy(s, "prod-db", "admin")
    # level masking replaces the target's table as a whole: keys it leaves out take their defaults
    assert read.masking is not None
    assert read.masking.pan == "redact"
    assert "security_code" in read.masking.sensitive_columns
    # no level table: the target's
    assert admin.masking is not None
    assert admin.masking.pan == "truncate"
    assert admin.masking.sensitive_columns == ["cvv"]
    # guardrails: target's first, then the level's; a level cannot drop a target rule
    assert [g.name for g in read.guardrails] == ["no-drop", "read-only"]
    assert [g.name for g in admin.guardrails] == ["no-drop"]
    # masking only on a level: the other level has none
    data2 = base()
    data2["targets"]["prod-db"]["levels"]["read"]["masking"] = {}
    s2 = load(data2)
    m = data_path_policy(s2, "prod-db", "read").masking
    assert m is not None
    assert m.pan == "truncate"
    assert data_path_policy(s2, "prod-db", "admin").masking is None


def test_digest_stable_and_sensitive() -> None:
    cfg = base(masking={"pan": "truncate"}, guardrails=[NO_DROP])
    d1 = data_path_policy(load(cfg), "prod-db", "read").digest
    assert d1 == data_path_policy(load(copy.deepcopy(cfg)), "prod-db", "read").digest
    # the same effective policy spelled differently (explicit defaults, other key order) → same digest
    spelled = base(guardrails=[{"message": "not here", "deny": ["drop_table", "drop_database"],
                                "name": "no-drop", "relations": []}],
                   masking={"track_data": True, "pan": "truncate"})
    assert data_path_policy(load(spelled), "prod-db", "read").digest == d1
    # the digest is the sha256 of the canonical policy without the digest
    pol = data_path_policy(load(cfg), "prod-db", "read")
    assert pol.digest == policy_digest(pol.model_copy(update={"digest": "x"}))
    changes: list[dict[str, Any]] = [
        base(masking={"pan": "redact"}, guardrails=[NO_DROP]),
        base(masking={"pan": "truncate", "track_data": False}, guardrails=[NO_DROP]),
        base(masking={"pan": "truncate", "sensitive_columns": ["cvv"]}, guardrails=[NO_DROP]),
        base(masking={"pan": "truncate", "columns": [{"column": "holder"}]}, guardrails=[NO_DROP]),
        base(guardrails=[NO_DROP]),
        base(masking={"pan": "truncate"}),
        base(masking={"pan": "truncate"}, guardrails=[dict(NO_DROP, message="other")]),
        base(masking={"pan": "truncate"}, guardrails=[dict(NO_DROP, deny=["drop_table"])]),
        base(masking={"pan": "truncate"}, guardrails=[dict(NO_DROP, deny=["drop_database", "drop_table"])]),
        base(masking={"pan": "truncate"}, guardrails=[dict(NO_DROP, relations=["cards"])]),
        base(masking={"pan": "truncate"}, guardrails=[dict(NO_DROP, name="no-drop-2")]),
    ]
    digests = {data_path_policy(load(c), "prod-db", "read").digest for c in changes}
    assert d1 not in digests
    assert len(digests) == len(changes)


def test_visible_targets_include_policy() -> None:
    data = base(guardrails=[NO_DROP])
    data["targets"]["prod-db"]["levels"]["read"]["masking"] = {"pan": "redact"}
    s = load(data)
    alice = Identity(subject="alice", groups=["dba"], issuer="i", expires_at="2030-01-01T00:00:00Z")
    plain = visible_targets(s, alice)
    assert all(lv.policy is None for lv in plain[0].levels)
    full = visible_targets(s, alice, include_policy=True)
    by_level = {lv.name: lv.policy for lv in full[0].levels}
    assert by_level["read"] == data_path_policy(s, "prod-db", "read")
    assert by_level["admin"] == data_path_policy(s, "prod-db", "admin")
    assert by_level["admin"] is not None
    assert by_level["admin"].masking is None
