"""Helpers for the broker's own tests (no tests in here): a tiny real OIDC issuer and a broker.toml writer.

``MiniIssuer`` serves a real discovery document and JWKS over HTTP (http.server in a thread, free loopback
port) and signs tokens with joserfc, so the broker's validation is exercised against real HTTP and real keys.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

AUDIENCE = "pcigate"
WORKLOAD_AUD = "pcigate-workload"


class MiniIssuer:
    def __init__(self) -> None:
        self.keys: list[RSAKey | ECKey] = [RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})]
        self.jwks_hits = 0
        self.discovery_hits = 0
        self.requests = 0  # every GET, answered or not (the IdP being down included)
        self.down = False
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer.requests += 1
                if issuer.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                body: dict[str, Any]
                if self.path == "/.well-known/openid-configuration":
                    issuer.discovery_hits += 1
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks",
                            "authorization_endpoint": issuer.url + "/auth",
                            "token_endpoint": issuer.url + "/token"}
                elif self.path == "/jwks":
                    issuer.jwks_hits += 1
                    body = {"keys": [k.as_dict(private=False) for k in issuer.keys]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def claims(self, sub: str = "alice", groups: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        c: dict[str, Any] = {"iss": self.url, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600,
                             "name": sub.title(), "email": f"{sub}@example.com",
                             "groups": ["dba"] if groups is None else groups}
        c.update(extra)
        return {k: v for k, v in c.items() if v is not None}

    def token(self, sub: str = "alice", groups: list[str] | None = None, *, key: RSAKey | ECKey | None = None,
              alg: str | None = None, kid: str | None = "default", **extra: Any) -> str:
        key = key or self.keys[0]
        alg = alg or ("ES256" if isinstance(key, ECKey) else "RS256")
        header: dict[str, Any] = {"alg": alg}
        kid = key.kid if kid == "default" else kid
        if kid is not None:
            header["kid"] = kid
        return jwt.encode(header, self.claims(sub, groups, **extra), key, algorithms=[alg])


def broker_toml(*, issuer: str, vault_addr: str = "http://127.0.0.1:1", pg_port: int = 5432,
                db_url: str, recordings_dir: Path, port: int = 8600, read_cap: str = "1h",
                admin_cap: str = "30m", heartbeat: int = 30, grace: int = 120, reaper: int = 10,
                token_file: Path | None = None, max_recording_bytes: int = 1 << 20,
                jwks_min_refetch: int = 10, masking_key_file: Path | None = None, extra: str = "") -> str:
    """``extra``: TOML appended at the end (e.g. data-path policy tables of the targets)."""
    token_line = f'token_file = "{token_file}"' if token_file else ""
    return f"""
[server]
listen = "127.0.0.1:{port}"
max_recording_bytes = {max_recording_bytes}

[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"
extra_audiences = ["{WORKLOAD_AUD}"]
algorithms = ["RS256", "ES256"]
leeway_seconds = 5
jwks_cache_seconds = 300
jwks_min_refetch_seconds = {jwks_min_refetch}

[vault]
address = "{vault_addr}"
auth = "token"
{token_line}
timeout_seconds = 3

[storage]
database_url = "{db_url}"
recordings_dir = "{recordings_dir}"

[sessions]
heartbeat_seconds = {heartbeat}
heartbeat_grace_seconds = {grace}
reaper_interval_seconds = {reaper}

[auditors]
groups = ["auditors"]
{f'[masking]{chr(10)}key_file = "{masking_key_file}"' if masking_key_file else ""}

[targets.prod-db]
kind = "postgres"
host = "127.0.0.1"
port = {pg_port}
database = "prod"
sslmode = "disable"
description = "Production payments database"
default_level = "read"
vault_mount = "database"

[targets.prod-db.levels.read]
vault_role = "prod-db-read"
ttl_cap = "{read_cap}"

[targets.prod-db.levels.admin]
vault_role = "prod-db-admin"
ttl_cap = "{admin_cap}"

[targets.staging-db]
host = "127.0.0.1"
port = {pg_port}
database = "prod"
vault_mount = "database"

[targets.staging-db.levels.read]
vault_role = "prod-db-read"
ttl_cap = "10m"

[[access]]
group = "dba"
target = "prod-db"
levels = ["read", "admin"]

[[access]]
group = "dev"
target = "prod-db"
levels = ["read"]

[[access]]
group = "dev"
target = "staging-db"
levels = ["*"]
""" + extra
