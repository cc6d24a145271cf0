"""Upstream TLS against a real PostgreSQL server with ``ssl = on`` (a self-signed certificate from openssl).

The tunnel speaks TLS to the server whenever ``sslmode`` asks for or allows it, and the server itself says
so (``pg_stat_ssl``); ``verify-full`` refuses a certificate no trusted CA signed; ``disable`` stays in clear.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.stack.loopthread import LoopThread
from tests.stack.postgres import PgCluster, start_cluster

from pcigate.errors import DatabaseUnavailable
from pcigate.models import DatabaseCredentials
from pcigate.tunnel.pg import PgTunnel

USER = "tls_user"


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[PgCluster, str]]:
    c = start_cluster()
    try:
        key, cert = c.datadir / "server.key", c.datadir / "server.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=30)
        if os.geteuid() == 0:
            for f in (key, cert):
                shutil.chown(f, "postgres", "postgres")
        key.chmod(0o600)
        c.psql("ALTER SYSTEM SET ssl = on")
        c.psql("SELECT pg_reload_conf()")
        password = secrets.token_urlsafe(18)
        c.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{password}'")
        yield c, password
    finally:
        c.destroy()


def _ssl_in_use(c: PgCluster, password: str, sslmode: str, loop: LoopThread, tmp: Path) -> str:
    """Through a tunnel with ``sslmode``: what the server says about the backend's own connection."""
    creds = DatabaseCredentials(host="127.0.0.1", port=c.port, database="postgres", username=USER,
                                password=password, sslmode=sslmode)  # type: ignore[arg-type]
    secret = secrets.token_urlsafe(16)
    t = PgTunnel(creds, secret, None)
    loop.run(t.check_upstream())
    port = loop.run(t.start())
    try:
        passfile = tmp / f"pgpass-{sslmode}"
        passfile.write_text(f"127.0.0.1:{port}:*:*:{secret}\n")
        passfile.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGPASSFILE": str(passfile)}
        sql = "SELECT ssl::text || coalesce(' ' || version, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        proc = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-d", "postgres",
                               "-c", sql], env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()
    finally:
        loop.run(t.close())


@pytest.mark.parametrize("sslmode", ["prefer", "require"])
def test_tls_upstream_when_the_server_offers_it(tls_cluster: tuple[PgCluster, str], loop: LoopThread,
                                                tmp_path: Path, sslmode: str) -> None:
    c, password = tls_cluster
    state = _ssl_in_use(c, password, sslmode, loop, tmp_path)
    assert state.startswith("true TLSv1."), state


def test_disable_stays_in_clear(tls_cluster: tuple[PgCluster, str], loop: LoopThread, tmp_path: Path) -> None:
    c, password = tls_cluster
    assert _ssl_in_use(c, password, "disable", loop, tmp_path) == "false"


def test_verify_full_refuses_an_untrusted_certificate(tls_cluster: tuple[PgCluster, str],
                                                      loop: LoopThread) -> None:
    c, password = tls_cluster
    creds = DatabaseCredentials(host="127.0.0.1", port=c.port, database="postgres", username=USER,
                                password=password, sslmode="verify-full")
    with pytest.raises(DatabaseUnavailable) as ei:
        loop.run(PgTunnel(creds, "s", None).check_upstream())
    assert "certificate" in str(ei.value).lower()
    assert password not in str(ei.value)
