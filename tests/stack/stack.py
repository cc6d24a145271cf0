"""The whole real stack in one context manager: PostgreSQL (SCRAM) → OpenBao (+ SSH CA) → sshd → IdP → broker.

    with Stack() as stack:
        env = stack.cli_env(tmp_path / "home")
        subprocess.run([".venv/bin/pcigate", "targets"], env=env)

The sshd (``stack.sshd``, target ``web-1``) trusts OpenBao's SSH CA for the local users webops and deploy; it
needs ``/usr/sbin/sshd`` (``bash .ci/bootstrap``).

Teardown order: broker, sshd, revoke all leases, OpenBao, IdP, PostgreSQL. Nothing is left running and no
``v-…`` role is left in PostgreSQL (``Stack.leftover_roles()`` checks).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.stack.broker import BrokerProc, start_broker, write_broker_config
from tests.stack.idp import Idp, start_idp
from tests.stack.openbao import OpenBao, start_openbao
from tests.stack.ports import free_port
from tests.stack.postgres import PgCluster, seed_prod, start_cluster
from tests.stack.sshd import SSH_USERS, SshCa, Sshd, ensure_user, setup_ssh_ca, sshd_binary, start_sshd

KEYRING_BACKEND_DIR = Path(__file__).resolve().parent / "keyring_backend"
KEYRING_BACKEND = "pcigate_test_keyring.EnvCryptFileKeyring"
# Set by tests that run the CLI with its warm start on: the directory for the helper's socket (see cli_env).
WARM_DIR_ENV = "PCIGATE_TEST_WARM_DIR"


class Stack:
    """Bring the stack up on ``__enter__`` (or :meth:`start`), down on ``__exit__`` (or :meth:`stop`).

    ``workdir``: where everything lives (PostgreSQL data, logs, broker DB, recordings); a temporary directory
    removed at the end when not given. ``start_broker=False`` brings up everything but the broker (for IdP /
    OpenBao tests while the broker is not there). ``ssh=False``: no SSH CA, no sshd, no ``web-1`` target."""

    pg: PgCluster
    bao: OpenBao
    idp: Idp
    sshd: Sshd
    ssh_ca: SshCa
    broker: BrokerProc | None
    _pg: PgCluster | None = None
    _bao: OpenBao | None = None
    _idp: Idp | None = None
    _sshd: Sshd | None = None

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        id_token_ttl: int = 300,
        start_broker: bool = True,
        broker_options: dict[str, Any] | None = None,
        keep_workdir: bool = False,
        ssh: bool = True,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pcigate-stack-")) if workdir is None else workdir
        self.keep_workdir = keep_workdir
        self.id_token_ttl = id_token_ttl
        self.with_broker = start_broker
        self.with_ssh = ssh
        self.broker_options = dict(broker_options or {})
        self.broker = None
        self.pg_dir: Path | None = None
        self.timings: dict[str, float] = {}
        # dynamic roles still in PostgreSQL after broker + OpenBao were stopped (should stay empty)
        self.roles_left_at_teardown: list[str] = []
        self._started = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 3)

    def start(self) -> Stack:
        if self._started:
            return self
        if self.with_ssh:
            sshd_binary()  # fail before starting anything: "run `bash .ci/bootstrap`"
        self._started = True
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        t_all = time.monotonic()
        try:
            t0 = time.monotonic()
            # The postgres OS user must reach the cluster directory: pytest's tmp dirs (0700 root) won't do.
            self.pg_dir = Path(tempfile.mkdtemp(prefix="pcigate-pg-"))  # removed again by stop()
            self.pg = self._pg = start_cluster(self.pg_dir)
            self.vault_db_password = seed_prod(self.pg)
            self._timed("postgres", t0)

            t0 = time.monotonic()
            self.bao = self._bao = start_openbao(w / "openbao.log")
            self.bao.setup_database("127.0.0.1", self.pg.port, "bao_admin", self.vault_db_password)
            self.vault_token_file = w / "bao-token"
            self.vault_token_file.touch(mode=0o600)
            self.vault_token_file.write_text(self.bao.create_broker_token() + "\n")
            self._timed("openbao", t0)

            if self.with_ssh:
                t0 = time.monotonic()
                self._start_ssh()
                self._timed("sshd", t0)

            t0 = time.monotonic()
            self.idp = self._idp = start_idp(w / "idp", id_token_ttl=self.id_token_ttl)
            self._timed("idp", t0)

            self.broker_port = free_port()
            self.broker_config_path = w / "broker" / "broker.toml"
            (w / "broker").mkdir(exist_ok=True)
            self.recordings_dir = w / "broker" / "recordings"
            self.broker_db = w / "broker" / "broker.db"
            write_broker_config(
                self.broker_config_path,
                issuer=self.idp.issuer,
                vault_addr=self.bao.address,
                vault_token_file=self.vault_token_file,
                pg_port=self.pg.port,
                db_url=f"sqlite:///{self.broker_db}",
                recordings_dir=self.recordings_dir,
                port=self.broker_port,
                **{**self._ssh_broker_options(), **self.broker_options},
            )
            if self.with_broker:
                t0 = time.monotonic()
                self.broker = start_broker(self.broker_config_path, port=self.broker_port)
                self._timed("broker", t0)
        except BaseException:
            self.stop()
            raise
        self._timed("total", t_all)
        return self

    def _start_ssh(self) -> None:
        """Users webops/deploy, OpenBao's SSH CA (mount ``ssh``), an sshd trusting it for them."""
        for user in SSH_USERS:
            ensure_user(user)
        self.ssh_ca = SshCa(self.bao, setup_ssh_ca(self.bao))
        self.sshd = self._sshd = start_sshd(self.workdir / "sshd", self.ssh_ca.public_key, SSH_USERS)

    def _ssh_broker_options(self) -> dict[str, Any]:
        if self._sshd is None:
            return {}
        return {"ssh_port": self._sshd.port, "ssh_host_key": self._sshd.host_public_key}

    def start_broker(self) -> BrokerProc:
        """Start the broker later (when ``start_broker=False`` was given)."""
        if self.broker is None:
            self.broker = start_broker(self.broker_config_path, port=self.broker_port)
        return self.broker

    def stop(self) -> None:
        """Tear down in reverse order: broker, sshd, (revoke leases) OpenBao, IdP, PostgreSQL."""
        errors: list[BaseException] = []
        steps: list[Any] = []
        if self.broker is not None:
            steps.append(self.broker.stop)
        if self._sshd is not None:
            steps.append(self._sshd.stop)
        if self._bao is not None:
            steps += [self._bao.revoke_all, self._bao.stop]
        if self._idp is not None:
            steps.append(self._idp.stop)
        if self._pg is not None:
            steps.append(self._record_leftovers)
            steps.append(self._pg.stop)
        if self.pg_dir is not None:
            pg_dir = self.pg_dir
            steps.append(lambda: shutil.rmtree(pg_dir, ignore_errors=True))
        for step in steps:
            try:
                step()
            except Exception as exc:  # keep tearing down the rest
                errors.append(exc)
        self.broker = self._bao = self._idp = self._pg = None
        self._sshd = None
        self.pg_dir = None
        self._started = False
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise errors[0]

    def _record_leftovers(self) -> None:
        self.roles_left_at_teardown = self.leftover_roles()

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def broker_url(self) -> str:
        return f"http://127.0.0.1:{self.broker_port}"

    def leftover_roles(self) -> list[str]:
        """Dynamic (``v-…``) roles still in PostgreSQL."""
        out = self.pg.psql("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%' ORDER BY 1")
        return [r for r in out.splitlines() if r]

    def cli_env(self, home: Path, *, token: str | None = None, inherit: bool = True) -> dict[str, str]:
        """Environment for running the real ``pcigate`` CLI as a fresh user whose home is ``home``.

        Tokens go to a real, encrypted keyring that works headless (keyrings.cryptfile unlocked from
        ``KEYRING_CRYPTFILE_PASSWORD``, selected by ``$XDG_CONFIG_HOME/python_keyring/keyringrc.cfg``).
        ``token``: set ``PCIGATE_TOKEN`` (workload mode)."""
        home.mkdir(parents=True, exist_ok=True)
        xdg = {
            "XDG_CONFIG_HOME": home / ".config",
            "XDG_DATA_HOME": home / ".local" / "share",
            "XDG_STATE_HOME": home / ".local" / "state",
            "XDG_CACHE_HOME": home / ".cache",
            "XDG_RUNTIME_DIR": home / ".run",
        }
        for d in xdg.values():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        kr_dir = xdg["XDG_CONFIG_HOME"] / "python_keyring"
        kr_dir.mkdir(exist_ok=True)
        (kr_dir / "keyringrc.cfg").write_text(
            f"[backend]\ndefault-keyring = {KEYRING_BACKEND}\nkeyring-path = {KEYRING_BACKEND_DIR}\n"
        )
        pw_file = home / ".keyring-password"
        if not pw_file.exists():
            pw_file.touch(mode=0o600)
            pw_file.write_text(secrets.token_urlsafe(16))
        base = dict(os.environ) if inherit else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for k in ("PCIGATE_TOKEN", "PCIGATE_BROKER", "PCIGATE_STATE_DIR", "PYTHON_KEYRING_BACKEND",
                  "PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE", "PGUSER", "PGHOST", "PGPORT", "PGDATABASE",
                  "DBUS_SESSION_BUS_ADDRESS", "DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
            base.pop(k, None)
        base.update({k: str(v) for k, v in xdg.items()})
        base.update(
            HOME=str(home),
            PCIGATE_BROKER=self.broker_url,
            PCIGATE_STATE_DIR=str(xdg["XDG_STATE_HOME"] / "pcigate"),
            KEYRING_CRYPTFILE_PASSWORD=pw_file.read_text(),
            BROWSER="true",  # never open a real browser: `true` swallows the URL
            PYTHONUNBUFFERED="1",
            NO_COLOR="1",
            COLUMNS="200",
            TERM="dumb",
        )
        # The warm start (pcigate.resident) is off unless a test asks for it: with PCIGATE_TEST_WARM_DIR set
        # (tests/integration/test_warm_start.py), on, its helper's socket in that (short) directory.
        warm = os.environ.get(WARM_DIR_ENV)
        base["PCIGATE_RESIDENT"] = "1" if warm else "0"
        if warm:
            base["XDG_RUNTIME_DIR"] = warm
            base["PCIGATE_RESIDENT_IDLE"] = "300"
        psql_dir = self.pg.bindir
        if (psql_dir / "psql").exists():
            base["PATH"] = f"{base.get('PATH', '')}:{psql_dir}"
        if token is not None:
            base["PCIGATE_TOKEN"] = token
        return base

    def env_lines(self) -> list[str]:
        """Shell lines a human pastes to use the CLI against this stack."""
        return [f"export PCIGATE_BROKER={self.broker_url}"]

    def describe(self) -> str:
        lines = [
            f"workdir      {self.workdir}",
            f"postgres     127.0.0.1:{self.pg.port} "
            f"(superuser postgres, password {self.pg.superuser_password})",
            f"openbao      {self.bao.address} (root token {self.bao.root_token})",
            f"idp          {self.idp.issuer}",
            f"broker       {self.broker_url} (config {self.broker_config_path})",
            *([f"sshd         127.0.0.1:{self._sshd.port} (users {', '.join(self._sshd.users)}, "
               f"known_hosts: {self._sshd.known_hosts_line})"] if self._sshd is not None else []),
            "users        " + ", ".join(
                f"{u}/{p} {self.idp.user_specs[u].groups}" for u, p in self.idp.users.items()),
            "workloads    " + ", ".join(
                f"{c} secret {s} {self.idp.workload_groups[c]}"
                for c, s in self.idp.workload_clients.items()),
        ]
        return "\n".join(lines)
