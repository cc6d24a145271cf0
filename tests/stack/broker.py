"""The real broker (``pcigate-broker serve --config broker.toml``) as a subprocess of the test stack.

``write_broker_config()`` produces a broker.toml per docs/configuration.md for the stack's target ``prod-db``;
``start_broker()`` runs the ``pcigate-broker`` console script of the project's venv, logs to a file and waits
for ``GET /healthz``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.stack.idp import CLIENT_ID, WORKLOAD_AUDIENCE
from tests.stack.ports import free_port, stop_process

TARGET = "prod-db"
LEVELS = {"read": "prod-db-read", "admin": "prod-db-admin"}


def venv_bin(name: str) -> Path:
    """A console script next to the running interpreter (the project's .venv), else on PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return cand
    found = shutil.which(name)
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"{name} not found next to {sys.executable} nor on PATH (pip install -e '.[broker]')"
    )


# ------------------------------------------------------------------------------------------------------- TOML
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict[str, Any]) -> str:
    """Just enough TOML for broker.toml: nested tables of scalars/lists and arrays of tables."""
    out: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_aot(v)}
        if scalars or not prefix:
            if prefix:
                out.append(f"[{prefix}]")
            out.extend(f"{_key(k)} = {_toml_value(v)}" for k, v in scalars.items())
            out.append("")
        for k, v in d.items():
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            if isinstance(v, dict):
                table(name, v)
            elif _is_aot(v):
                for item in v:
                    out.append(f"[[{name}]]")
                    out.extend(f"{_key(ik)} = {_toml_value(iv)}" for ik, iv in item.items())
                    out.append("")

    table("", data)
    return "\n".join(out).strip() + "\n"


def _is_aot(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if k.replace("-", "").replace("_", "").isalnum() else json.dumps(k)


def broker_config(
    *,
    issuer: str,
    vault_addr: str,
    vault_token_file: Path,
    pg_port: int,
    db_url: str,
    recordings_dir: Path,
    port: int,
    pg_host: str = "127.0.0.1",
    read_ttl_cap: str | int = "1h",
    admin_ttl_cap: str | int = "30m",
    heartbeat_seconds: int = 30,
    heartbeat_grace_seconds: int = 120,
    reaper_interval_seconds: int = 10,
    leeway_seconds: int = 30,
    extra_audiences: list[str] | None = None,
    sslmode: str = "disable",
    masking_key_file: Path | None = None,
    ssh_port: int | None = None,
    ssh_host_key: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The stack's broker configuration as a dict (see docs/configuration.md).

    ``ssh_port`` and ``ssh_host_key`` (the test sshd's, tests/stack/sshd.py): also the SSH target ``web-1``
    (levels ops/admin for group dba); without them only ``prod-db``."""
    from tests.stack.sshd import ssh_target_config
    cfg: dict[str, Any] = {
        "server": {"listen": f"127.0.0.1:{port}", "public_url": f"http://127.0.0.1:{port}"},
        "oidc": {
            "issuer": issuer,
            "audience": CLIENT_ID,
            "client_id": CLIENT_ID,
            "extra_audiences": [WORKLOAD_AUDIENCE] if extra_audiences is None else extra_audiences,
            "groups_claim": "groups",
            "algorithms": ["RS256"],
            "scopes": ["openid", "profile", "email", "groups", "offline_access"],
            "workload_claim": "pcigate_workload",
            "leeway_seconds": leeway_seconds,
            "jwks_cache_seconds": 300,
        },
        "vault": {"address": vault_addr, "auth": "token", "token_file": str(vault_token_file),
                  "timeout_seconds": 5},
        "storage": {"database_url": db_url, "recordings_dir": str(recordings_dir)},
        "sessions": {
            "heartbeat_seconds": heartbeat_seconds,
            "heartbeat_grace_seconds": heartbeat_grace_seconds,
            "reaper_interval_seconds": reaper_interval_seconds,
        },
        "auditors": {"groups": ["auditors"]},
        **({"masking": {"key_file": str(masking_key_file)}} if masking_key_file is not None else {}),
        "targets": {
            TARGET: {
                "kind": "postgres",
                "host": pg_host,
                "port": pg_port,
                "database": "prod",
                "sslmode": sslmode,
                "description": "Production payments database (test stack)",
                "default_level": "read",
                "vault_mount": "database",
                "levels": {
                    "read": {"vault_role": LEVELS["read"], "ttl_cap": read_ttl_cap},
                    "admin": {"vault_role": LEVELS["admin"], "ttl_cap": admin_ttl_cap},
                },
            },
        },
        "access": [{"group": "dba", "target": TARGET, "levels": ["read", "admin"]}],
    }
    if (ssh_port is None) != (ssh_host_key is None):
        raise ValueError("broker_config: give both ssh_port and ssh_host_key, or neither")
    if ssh_port is not None and ssh_host_key is not None:
        target, access = ssh_target_config(ssh_port, ssh_host_key)
        cfg["targets"].update(target)
        cfg["access"].append(access)
    for section, values in (extra or {}).items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    return cfg


def edit_broker_config(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Load broker.toml, let ``edit`` change the dict in place, write it back (before the broker starts)."""
    cfg = tomllib.loads(path.read_text())
    edit(cfg)
    path.write_text(to_toml(cfg))


def write_broker_config(path: Path, **kwargs: Any) -> Path:
    """Write broker.toml (keyword arguments as :func:`broker_config`), with a fresh 0600 masking key file
    next to it unless one is given. Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if "masking_key_file" not in kwargs:
        key = path.parent / "masking-key"
        if not key.exists():
            key.touch(mode=0o600)
            key.write_text(secrets.token_urlsafe(32))
        kwargs["masking_key_file"] = key
    path.write_text(to_toml(broker_config(**kwargs)))
    return path


# ------------------------------------------------------------------------------------------------ the process
@dataclass
class BrokerProc:
    config_path: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    started_in: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _spawn(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(venv_bin("pcigate-broker")), "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env}, cwd=self.config_path.parent,
            start_new_session=True,
        )
        log.close()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"broker exited with {code}:\n{self.log()[-3000:]}")
            try:
                r = httpx.get(f"{self.url}/healthz", timeout=1)
                if r.status_code == 200:
                    self.started_in = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker not healthy after {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful: the broker may end sessions/revoke), SIGKILL after ``timeout``."""
        stop_process(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of recovery."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self._spawn()
        self.wait_healthy(timeout)


def start_broker(config_path: Path, *, port: int | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None, timeout: float = 30.0) -> BrokerProc:
    """Run ``pcigate-broker serve --config config_path`` and wait for /healthz.

    ``port`` defaults to the one in the config's ``server.listen``."""
    if port is None:
        import tomllib

        listen = tomllib.loads(config_path.read_text())["server"]["listen"]
        port = int(str(listen).rsplit(":", 1)[1])
    broker = BrokerProc(config_path=config_path, port=port,
                        log_path=log_path or config_path.with_name("broker.log"), env=dict(env or {}))
    broker._spawn()
    broker.wait_healthy(timeout)
    return broker


__all__ = ["LEVELS", "TARGET", "BrokerProc", "broker_config", "free_port", "start_broker", "to_toml",
           "venv_bin", "write_broker_config"]
