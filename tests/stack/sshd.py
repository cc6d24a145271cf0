"""A second, private sshd for the SSH target, trusting OpenBao's SSH CA.

    ensure_user("webops")
    ca = setup_ssh_ca(bao)                      # the ``ssh`` engine, CA key, roles web-ops/web-admin/web-any
    sshd = start_sshd(workdir, ca, ["webops"])  # 127.0.0.1:<free port>, own host key and config
    cert = sign_key(bao, "web-ops", public_key, ["webops"], "5m", key_id="alice")

The daemon runs as root (it must, to switch to the login user) with its own config file, never the system's:
certificate logins only (``AuthorizedKeysFile none``, no passwords, no PAM), only the given users. It needs
``/usr/sbin/sshd`` (``bash .ci/bootstrap`` installs Debian's openssh-server without starting a system sshd).

OpenBao facts this relies on (measured against 2.7.2):
* ``config/ca`` with ``generate_signing_key=true`` *replaces* the CA key each time it is posted: only post it
  when ``GET config/ca`` answers 400 ("no default issuer currently configured").
* certificates are backdated by the role's ``not_before_duration`` (30 s); a ``ttl`` above ``max_ttl`` is
  refused (400), not capped; passing ``extensions`` replaces ``default_extensions`` (permit-pty is then lost
  unless asked for); without ``key_id`` the key id is ``vault-token-<sha256 of the token>``.
"""

from __future__ import annotations

import copy
import os
import pwd
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.stack.openbao import OpenBao
from tests.stack.ports import free_port, stop_process, stop_processes

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
SSH_MOUNT = "ssh"
SSH_USERS = ["webops", "deploy"]
# role -> allowed_users (web-any signs for both: a certificate for the wrong principal)
SSH_ROLES = {"web-ops": "webops", "web-admin": "deploy", "web-any": "webops,deploy"}
# the broker's SSH target (tests/stack/broker.py writes it): level -> OpenBao role, ttl cap, principals
SSH_TARGET = "web-1"
SSH_LEVELS: dict[str, dict[str, object]] = {
    "ops": {"vault_role": "web-ops", "ttl_cap": "1h", "principals": ["webops"], "port_forwarding": True},
    "admin": {"vault_role": "web-admin", "ttl_cap": "30m", "principals": ["deploy"]},
}


class SshdMissing(RuntimeError):
    pass


def sshd_binary() -> Path:
    if not os.access(SSHD, os.X_OK):
        raise SshdMissing(f"{SSHD} not found: run `bash .ci/bootstrap` as root (installs Debian's "
                          "openssh-server without starting a system sshd)")
    return SSHD


# ------------------------------------------------------------------------------------------------- accounts
def _shadow_password(name: str) -> str | None:
    for line in Path("/etc/shadow").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name and len(fields) > 1:
            return fields[1]
    return None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_user(name: str) -> None:
    """A local account ``name`` (home, bash) whose password field is ``*``: no password login, but not locked
    (``useradd``'s ``!`` makes sshd refuse even a valid certificate). Idempotent."""
    if not _user_exists(name):
        r = subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=30)
        if r.returncode != 0 and not _user_exists(name):  # another process may have created it meanwhile
            raise RuntimeError(f"useradd {name}: {r.stderr.strip()}")
    if _shadow_password(name) != "*":
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=30)


# ------------------------------------------------------------------------------------------------- the CA
def _ca_role(allowed_users: str) -> dict[str, object]:
    return {
        "key_type": "ca",
        "allow_user_certificates": True,
        "allowed_users": allowed_users,
        "default_user": allowed_users.split(",")[0],
        "allow_user_key_ids": True,
        "ttl": "5m",
        "max_ttl": "1h",
        "default_extensions": {"permit-pty": ""},
        "allowed_extensions": "permit-pty,permit-port-forwarding",
    }


def _call(c: httpx.Client, method: str, path: str, body: object | None = None) -> dict[str, Any]:
    r = c.request(method, f"/v1/{path}", json=body)
    if r.status_code >= 400:
        raise RuntimeError(f"OpenBao {method} {path}: {r.status_code} {r.text}")
    return r.json() if r.content else {}


def _ca_key(c: httpx.Client, mount: str) -> str | None:
    r = c.get(f"/v1/{mount}/config/ca")  # 400 "no default issuer currently configured" before config/ca
    return str(r.json()["data"]["public_key"]).strip() if r.status_code == 200 else None


def ca_public_key(bao: OpenBao, mount: str = SSH_MOUNT) -> str | None:
    """The mount's CA public key (``ssh-ed25519 AAAA…``), None when no CA is configured yet."""
    with bao.client() as c:
        return _ca_key(c, mount)


def setup_ssh_ca(bao: OpenBao, mount: str = SSH_MOUNT) -> str:
    """Enable the ``ssh`` engine at ``mount`` with an ed25519 CA and the roles of :data:`SSH_ROLES`
    (idempotent: an existing CA key is kept). Returns the CA public key for ``TrustedUserCAKeys``."""
    with bao.client() as c:  # one client: creating one costs ~15-30 ms (its TLS context)
        mounts = _call(c, "GET", "sys/mounts")
        if f"{mount}/" not in mounts.get("data", mounts):
            _call(c, "POST", f"sys/mounts/{mount}", {"type": "ssh"})
        key = _ca_key(c, mount)
        if key is None:
            body = {"generate_signing_key": True, "key_type": "ssh-ed25519"}
            key = str(_call(c, "POST", f"{mount}/config/ca", body)["data"]["public_key"]).strip()
        for role, users in SSH_ROLES.items():
            _call(c, "POST", f"{mount}/roles/{role}", _ca_role(users))
    return key


def sign_key(bao: OpenBao, role: str, public_key_openssh: str, principals: list[str] | str,
             ttl: str | int = "5m", *, key_id: str | None = None, mount: str = SSH_MOUNT,
             extensions: dict[str, str] | None = None) -> str:
    """A user certificate (``ssh-ed25519-cert-v01@openssh.com AAAA…``) for ``public_key_openssh`` signed by
    ``mount``/sign/``role`` with the root token."""
    body: dict[str, object] = {
        "public_key": public_key_openssh,
        "valid_principals": principals if isinstance(principals, str) else ",".join(principals),
        "ttl": ttl,
        "cert_type": "user",
    }
    if key_id is not None:
        body["key_id"] = key_id
    if extensions is not None:
        body["extensions"] = extensions
    data = bao.api("POST", f"{mount}/sign/{role}", body)["data"]
    assert isinstance(data, dict)
    return str(data["signed_key"]).strip() + "\n"


@dataclass
class SshCa:
    """An OpenBao SSH CA mount, ready to sign (see :func:`setup_ssh_ca`)."""

    bao: OpenBao
    public_key: str
    mount: str = SSH_MOUNT

    def sign(self, role: str, public_key_openssh: str, principals: list[str] | str, ttl: str | int = "5m",
             *, key_id: str | None = None, extensions: dict[str, str] | None = None) -> str:
        return sign_key(self.bao, role, public_key_openssh, principals, ttl, key_id=key_id, mount=self.mount,
                        extensions=extensions)


def ssh_target_config(port: int, host_key: str, group: str = "dba",
                      host: str = "127.0.0.1") -> tuple[dict[str, object], dict[str, object]]:
    """broker.toml's ``[targets.web-1]`` (as ``{"web-1": {...}}``) and the ``[[access]]`` entry giving
    ``group`` both levels."""
    target = {
        "kind": "ssh",
        "host": host,
        "port": port,
        "host_key": host_key,
        "vault_mount": SSH_MOUNT,
        "description": "web server (OpenSSH)",
        "default_level": "ops",
        "levels": copy.deepcopy(SSH_LEVELS),
    }
    return {SSH_TARGET: target}, {"group": group, "target": SSH_TARGET, "levels": list(SSH_LEVELS)}


# ---------------------------------------------------------------------------------------------- client side
@dataclass(frozen=True)
class ClientKey:
    """An ed25519 key pair on disk (private key 0600, OpenSSH format)."""

    path: Path
    public_key: str  # "ssh-ed25519 AAAA…"

    def write_cert(self, cert: str, name: str | None = None) -> Path:
        """Write ``cert`` next to the key. Not ``KEY-cert.pub`` unless asked: ssh loads that one by itself."""
        out = self.path.with_name(name or f"{self.path.name}-signed.pub")
        out.write_text(cert)
        return out


def new_client_key(directory: Path, name: str = "id_ed25519") -> ClientKey:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    path = directory / name
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    path.with_name(name + ".pub").write_text(public + "\n")
    return ClientKey(path=path, public_key=public)


def ssh_command(port: int, user: str, key: Path, known_hosts: Path, *command: str,
                cert: Path | None = None, host: str = "127.0.0.1") -> list[str]:
    """A non-interactive, strict ``ssh`` invocation that reads no user or system configuration."""
    args = ["ssh", "-F", "/dev/null", "-T", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-i", str(key)]
    if cert is not None:
        args += ["-o", f"CertificateFile={cert}"]
    return [*args, "-p", str(port), f"{user}@{host}", *command]


def run_ssh(args: list[str], home: Path, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C"}
    return subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------- the daemon
@dataclass
class Sshd:
    workdir: Path
    port: int
    host_public_key: str  # "ssh-ed25519 AAAA…" (no comment)
    users: list[str]
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_public_key}"

    def write_known_hosts(self, path: Path) -> Path:
        path.write_text(self.known_hosts_line + "\n")
        return path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the listener and every connection it forked (each runs in its own session)."""
        if not self.alive():
            return
        assert self.proc is not None
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        stop_process(self.proc, 5)
        stop_processes(children, 5)


def _host_key(workdir: Path) -> tuple[Path, str]:
    key = workdir / "ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
    kind, blob = key.with_name(key.name + ".pub").read_text().split()[:2]
    return key, f"{kind} {blob}"


def sshd_config(*, port: int, host_key: Path, ca_file: Path, pid_file: Path, users: list[str]) -> str:
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"TrustedUserCAKeys {ca_file}",
        "AuthorizedKeysFile none",
        "AuthorizedPrincipalsFile none",  # the certificate's principals must name the login user
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "UsePAM no",
        "PermitRootLogin no",
        f"AllowUsers {' '.join(users)}",
        "AllowTcpForwarding yes",
        "PermitTTY yes",
        "X11Forwarding no",
        "PrintMotd no",
        "UseDNS no",
        "LogLevel VERBOSE",
        "Subsystem sftp internal-sftp",
    ]
    return "\n".join(lines) + "\n"


def _wait_listening(sshd: Sshd, timeout: float) -> None:
    """sshd -e logs "Server listening on 127.0.0.1 port N." once bound (no probe connection in its log)."""
    deadline = time.monotonic() + timeout
    want = f"Server listening on 127.0.0.1 port {sshd.port}"
    while want not in sshd.log():
        if not sshd.alive():
            raise RuntimeError(f"sshd exited with {sshd.proc.returncode if sshd.proc else None}:\n"
                               f"{sshd.log()[-3000:]}")
        if time.monotonic() > deadline:
            sshd.stop()
            raise RuntimeError(f"sshd not listening after {timeout}s:\n{sshd.log()[-3000:]}")
        time.sleep(0.005)


def _spawn(workdir: Path, ca_file: Path, users: list[str], port: int) -> Sshd:
    host_key, host_public = _host_key(workdir)
    config = workdir / "sshd_config"
    config.write_text(sshd_config(port=port, host_key=host_key, ca_file=ca_file,
                                  pid_file=workdir / "sshd.pid", users=users))
    sshd = Sshd(workdir=workdir, port=port, host_public_key=host_public, users=list(users),
                config_path=config, log_path=workdir / "sshd.log")
    with open(sshd.log_path, "ab") as log:
        sshd.proc = subprocess.Popen([str(sshd_binary()), "-D", "-e", "-f", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
    return sshd


def start_sshd(workdir: Path, ca_public_key: str, users: list[str], port: int | None = None,
               timeout: float = 10.0) -> Sshd:
    """Run ``sshd -D -e -f workdir/sshd_config`` on 127.0.0.1:``port`` (a free one when None) trusting
    ``ca_public_key`` for ``users``; returns once it listens. Log: ``workdir/sshd.log``."""
    sshd_binary()
    if not users:
        raise ValueError("start_sshd needs at least one user")
    workdir.mkdir(parents=True, exist_ok=True)
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    ca_file = workdir / "trusted_user_ca_keys"
    ca_file.write_text(ca_public_key.strip() + "\n")
    attempts = 1 if port is not None else 3  # a free port can be taken between free_port() and bind()
    for attempt in range(attempts):
        sshd = _spawn(workdir, ca_file, users, port or free_port())
        try:
            _wait_listening(sshd, timeout)
            return sshd
        except RuntimeError:
            sshd.stop()
            if attempt == attempts - 1 or "Address already in use" not in sshd.log():
                raise
    raise AssertionError("unreachable")


__all__ = [
    "SSH_LEVELS", "SSH_MOUNT", "SSH_ROLES", "SSH_TARGET", "SSH_USERS", "ClientKey", "SshCa", "Sshd",
    "SshdMissing", "ca_public_key", "ensure_user", "new_client_key", "run_ssh", "setup_ssh_ca", "sign_key",
    "ssh_command", "ssh_target_config", "sshd_binary", "sshd_config", "start_sshd",
]
