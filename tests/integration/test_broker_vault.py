"""vault.py against a real OpenBao: token and AppRole auth (re-login when the token expires), token renewal,
issue, revoke."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr
from tests.stack.openbao import OpenBao, start_openbao
from tests.stack.postgres import PgCluster, seed_prod, start_cluster

from pcigate_broker.errors import VaultUnavailable
from pcigate_broker.settings import VaultSettings
from pcigate_broker.vault import Vault

POLICY = """
path "database/creds/*" { capabilities = ["read"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "auth/token/renew-self" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
"""


@dataclass
class Env:
    pg: PgCluster
    bao: OpenBao


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    pg = start_cluster()
    bao = start_openbao()
    try:
        bao.setup_database("127.0.0.1", pg.port, "bao_admin", seed_prod(pg))
        bao.api("PUT", "sys/policies/acl/broker", {"policy": POLICY})
        bao.api("POST", "sys/auth/approle", {"type": "approle"})
        bao.api("POST", "auth/approle/role/broker", {"token_policies": ["broker"], "token_ttl": "2s",
                                                      "token_max_ttl": "2s"})
        bao.api("POST", "auth/approle/role/periodic", {"token_policies": ["broker"], "token_period": "3s"})
        yield Env(pg=pg, bao=bao)
    finally:
        bao.stop()
        pg.stop()


def test_token_auth_issue_and_revoke(env: Env) -> None:
    v = Vault(VaultSettings(address=env.bao.address, token=SecretStr(env.bao.root_token)))
    creds = v.issue_db_creds("database", "prod-db-read")
    assert "***" in repr(creds)
    assert creds.password not in repr(creds)
    assert creds.lease_duration == 3600
    assert creds.lease_id in env.bao.leases()
    assert env.pg.can_login(creds.username, creds.password, "prod")
    v.revoke_lease(creds.lease_id)
    assert creds.lease_id not in env.bao.leases()
    assert not env.pg.can_login(creds.username, creds.password, "prod")
    v.revoke_lease(creds.lease_id)  # idempotent


def test_bad_token_and_unknown_role(env: Env) -> None:
    v = Vault(VaultSettings(address=env.bao.address, token=SecretStr("nope")))
    with pytest.raises(VaultUnavailable, match="403"):
        v.issue_db_creds("database", "prod-db-read")
    root = Vault(VaultSettings(address=env.bao.address, token=SecretStr(env.bao.root_token)))
    with pytest.raises(VaultUnavailable):
        root.issue_db_creds("database", "no-such-role")


def test_approle_relogin_after_token_expiry(env: Env) -> None:
    role_id = env.bao.api("GET", "auth/approle/role/broker/role-id")["data"]["role_id"]  # type: ignore[index]
    secret_id = env.bao.api("POST", "auth/approle/role/broker/secret-id")["data"]["secret_id"]  # type: ignore[index]
    v = Vault(VaultSettings(address=env.bao.address, auth="approle", role_id=str(role_id),
                            secret_id=SecretStr(str(secret_id))))
    first = v.issue_db_creds("database", "prod-db-read")
    time.sleep(3)  # the AppRole token (ttl 2 s) is gone: 403, re-login, retry
    second = v.issue_db_creds("database", "prod-db-admin")
    assert second.lease_id in env.bao.leases()
    v.revoke_lease(second.lease_id)
    # The first lease dies with its token; OpenBao's expiration manager does that asynchronously, so wait
    # for it (bounded) instead of assuming it already happened.
    deadline = time.monotonic() + 20
    while set(env.bao.leases()) & {first.lease_id, second.lease_id} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(env.bao.leases()) & {first.lease_id, second.lease_id}
    bad = Vault(VaultSettings(address=env.bao.address, auth="approle", role_id=str(role_id),
                              secret_id=SecretStr("wrong")))
    with pytest.raises(VaultUnavailable, match="AppRole login failed"):
        bad.issue_db_creds("database", "prod-db-read")


def test_periodic_token_is_renewed_so_leases_survive(env: Env) -> None:
    role_id = env.bao.api("GET", "auth/approle/role/periodic/role-id")["data"]["role_id"]  # type: ignore[index]
    secret = env.bao.api("POST", "auth/approle/role/periodic/secret-id")["data"]["secret_id"]  # type: ignore[index]
    v = Vault(VaultSettings(address=env.bao.address, auth="approle", role_id=str(role_id),
                            secret_id=SecretStr(str(secret))))
    creds = v.issue_db_creds("database", "prod-db-read")
    deadline = time.monotonic() + 7  # > 2 token periods
    while time.monotonic() < deadline:
        v.maintain_token(3600)
        time.sleep(0.5)
    assert creds.lease_id in env.bao.leases()
    assert env.pg.can_login(creds.username, creds.password, "prod")
    v.revoke_lease(creds.lease_id)
