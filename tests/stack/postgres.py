"""A throwaway PostgreSQL cluster that really checks passwords (SCRAM-SHA-256).

The machine's shared PostgreSQL on 5432 trusts every local connection, so a test that checks credentials
would prove nothing against it. This module runs ``initdb -A scram-sha-256`` into a directory owned by the
``postgres`` OS user (we are root), starts it on a free loopback port and offers ``psql`` helpers.
Falls back to the ``pgserver`` wheel's binaries when the Debian ones are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.stack.ports import free_port

PG_BIN_CANDIDATES = ["/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin"]


def pg_bindir() -> Path:
    for cand in PG_BIN_CANDIDATES:
        if Path(cand, "initdb").exists():
            return Path(cand)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql-15")


def _as_postgres() -> list[str]:
    """Prefix that runs a command as the postgres OS user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"]
    return []


@dataclass
class PgCluster:
    datadir: Path
    port: int
    superuser: str = "postgres"
    superuser_password: str = field(default="", repr=False)
    host: str = "127.0.0.1"
    bindir: Path = field(default_factory=pg_bindir)

    @property
    def env(self) -> dict[str, str]:
        """Environment for client tools that log in as the superuser (password via PGPASSWORD in the test's
        own environment only: this is test infrastructure, not the product's path)."""
        env = dict(os.environ)
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.superuser,
            PGPASSWORD=self.superuser_password,
            PGDATABASE="postgres",
        )
        return env

    def psql(self, sql: str, database: str = "postgres", *, check: bool = True) -> str:
        """Run SQL as the superuser; returns unaligned, tuples-only output."""
        proc = subprocess.run(
            ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", database, "-c", sql],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def can_login(self, user: str, password: str, database: str = "postgres") -> bool:
        env = dict(os.environ)
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=user, PGPASSWORD=password)
        env.pop("PGPASSFILE", None)
        proc = subprocess.run(
            ["psql", "-X", "-At", "-d", database, "-c", "select 1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.returncode == 0 and proc.stdout.strip() == "1"

    @property
    def base(self) -> Path:
        """The cluster's directory (data, socket, log)."""
        return self.datadir.parent

    def destroy(self) -> None:
        """Stop the cluster and delete its directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def start(self) -> None:
        """Start (or start again after :meth:`stop`) the server on its port; waits until it accepts."""
        opts = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=128MB"
        )
        subprocess.run(
            [*_as_postgres(), str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-o", opts, "-l",
             str(self.base / "log"), "-w", "start"],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def stop(self) -> None:
        subprocess.run(
            [*_as_postgres(), str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
             "stop"],
            capture_output=True,
            timeout=60,
        )


def start_cluster(base: Path | None = None, port: int | None = None) -> PgCluster:
    """initdb + start a SCRAM-only cluster. ~1 s."""
    import secrets

    base = Path(tempfile.mkdtemp(prefix="pcigate-pg-")) if base is None else base
    base.mkdir(parents=True, exist_ok=True)
    datadir = base / "data"
    pwfile = base / "pwfile"
    password = secrets.token_urlsafe(18)
    pwfile.write_text(password + "\n")
    bindir = pg_bindir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    os.chmod(pwfile, 0o600)
    subprocess.run(
        [*_as_postgres(), str(bindir / "initdb"), "-D", str(datadir), "-A", "scram-sha-256",
         f"--pwfile={pwfile}", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pwfile.unlink()
    cluster = PgCluster(datadir=datadir, port=port or free_port(), superuser_password=password, bindir=bindir)
    cluster.start()
    return cluster


PROD_SEED_SQL = """
CREATE TABLE IF NOT EXISTS customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    card_number text,
    created_at timestamptz NOT NULL DEFAULT now()
);
TRUNCATE customers;
INSERT INTO customers (name, email, card_number) VALUES
    ('Ada Lovelace', 'ada@example.com', '4111111111111111'),
    ('Alan Turing', 'alan@example.com', '5500 0000 0000 0004'),
    ('Grace Hopper', 'grace@example.com', '3400-000000-00009');
"""


def seed_prod(cluster: PgCluster, vault_user: str = "bao_admin") -> str:
    """Create the ``prod`` database with a seeded table and the role OpenBao uses to mint dynamic roles.

    Returns the password of ``vault_user`` (LOGIN CREATEROLE + pg_signal_backend, STACK.md).
    """
    import secrets

    if cluster.psql("SELECT 1 FROM pg_database WHERE datname = 'prod'") != "1":
        cluster.psql("CREATE DATABASE prod")
    cluster.psql(PROD_SEED_SQL, database="prod")
    vault_password = secrets.token_urlsafe(18)
    exists = cluster.psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{vault_user}'")
    verb = "ALTER" if exists == "1" else "CREATE"
    cluster.psql(f"{verb} ROLE {vault_user} WITH LOGIN CREATEROLE PASSWORD '{vault_password}'")
    cluster.psql(f"GRANT pg_signal_backend TO {vault_user} WITH ADMIN OPTION")
    cluster.psql(f"GRANT pg_read_all_data TO {vault_user} WITH ADMIN OPTION")
    cluster.psql(f"GRANT pg_write_all_data TO {vault_user} WITH ADMIN OPTION")
    cluster.psql(f"GRANT ALL ON DATABASE prod TO {vault_user} WITH GRANT OPTION")
    return vault_password
