"""The SSH target's real infrastructure, without the broker: OpenBao's SSH CA signs short-lived user
certificates, the stack's own sshd accepts exactly those (right principal, unexpired, trusted CA) and the
client checks the sshd's host key strictly."""

from __future__ import annotations

import re
import subprocess
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from tests.stack.broker import broker_config, to_toml
from tests.stack.ports import free_port
from tests.stack.sshd import (
    SSH_ROLES,
    SSH_TARGET,
    SSH_USERS,
    ClientKey,
    SshCa,
    Sshd,
    SshdMissing,
    ensure_user,
    new_client_key,
    run_ssh,
    setup_ssh_ca,
    ssh_command,
    start_sshd,
)
from tests.stack.stack import Stack


def key_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


def ssh(sshd: Sshd, user: str, key: ClientKey, home: Path, *, cert: Path | None = None,
        known_hosts: Path | None = None) -> subprocess.CompletedProcess[str]:
    kh = known_hosts or sshd.write_known_hosts(home / "known_hosts")
    return run_ssh(ssh_command(sshd.port, user, key.path, kh, "echo", "ok", cert=cert), home)


def log_lines_with(sshd: Sshd, kid: str, timeout: float = 5.0) -> list[str]:
    """sshd's log lines naming certificate ``kid`` (sshd may write them just after the client exits)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in sshd.log().splitlines() if f"ID {kid} " in ln or f'ID "{kid}"' in ln]
        if any(ln.startswith(("Accepted publickey", "Failed publickey")) for ln in lines) \
                or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def reason_before(sshd: Sshd, kid: str) -> str:
    """The "Certificate invalid: …" line sshd logs just before refusing certificate ``kid``."""
    lines = sshd.log().splitlines()
    idx = next(i for i, ln in enumerate(lines) if ln.startswith("Failed publickey") and f"ID {kid} " in ln)
    before = reversed(lines[max(0, idx - 3):idx])
    return next((ln for ln in before if ln.startswith("Certificate invalid")), "")


# ------------------------------------------------------------------------------------------------- accepted
def test_certificate_login(ssh_ca: SshCa, sshd: Sshd, ssh_key: ClientKey, tmp_path: Path) -> None:
    kid = key_id()
    cert = ssh_key.write_cert(ssh_ca.sign("web-ops", ssh_key.public_key, ["webops"], "5m", key_id=kid))
    r = ssh(sshd, "webops", ssh_key, tmp_path, cert=cert)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"
    accepted = [ln for ln in log_lines_with(sshd, kid) if ln.startswith("Accepted publickey for webops")]
    assert len(accepted) == 1, sshd.log()[-2000:]
    assert "ED25519-CERT SHA256:" in accepted[0]


def test_admin_role_logs_in_as_deploy(ssh_ca: SshCa, sshd: Sshd, ssh_key: ClientKey, tmp_path: Path) -> None:
    cert = ssh_key.write_cert(ssh_ca.sign("web-admin", ssh_key.public_key, ["deploy"], "1m", key_id=key_id()))
    r = run_ssh(ssh_command(sshd.port, "deploy", ssh_key.path, sshd.write_known_hosts(tmp_path / "kh"),
                            "id", "-un", cert=cert), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "deploy\n"


# ------------------------------------------------------------------------------------------------- refused
def test_plain_key_is_refused(sshd: Sshd, ssh_key: ClientKey, tmp_path: Path) -> None:
    r = ssh(sshd, "webops", ssh_key, tmp_path)
    assert r.returncode == 255
    assert "Permission denied (publickey)" in r.stderr
    assert r.stdout == ""


def test_certificate_for_another_principal_is_refused(ssh_ca: SshCa, sshd: Sshd, ssh_key: ClientKey,
                                                      tmp_path: Path) -> None:
    kid = key_id()
    cert = ssh_key.write_cert(ssh_ca.sign("web-any", ssh_key.public_key, ["deploy"], "5m", key_id=kid))
    r = ssh(sshd, "webops", ssh_key, tmp_path, cert=cert)
    assert r.returncode == 255
    assert "Permission denied (publickey)" in r.stderr
    assert log_lines_with(sshd, kid)
    assert reason_before(sshd, kid) == "Certificate invalid: name is not a listed principal"


def test_role_refuses_to_sign_other_principals(ssh_ca: SshCa, ssh_key: ClientKey) -> None:
    with pytest.raises(RuntimeError, match="deploy is not a valid value for valid_principals"):
        ssh_ca.sign("web-ops", ssh_key.public_key, ["deploy"])
    with pytest.raises(RuntimeError, match="not a valid value for valid_principals"):
        ssh_ca.sign("web-ops", ssh_key.public_key, ["root"])
    with pytest.raises(RuntimeError, match="ttl is larger than maximum allowed"):
        ssh_ca.sign("web-ops", ssh_key.public_key, ["webops"], "2h")


def test_expired_certificate_is_refused(ssh_ca: SshCa, sshd: Sshd, ssh_key: ClientKey,
                                        tmp_path: Path) -> None:
    kid = key_id()
    signed_at = time.time()
    cert = ssh_key.write_cert(ssh_ca.sign("web-ops", ssh_key.public_key, ["webops"], "2s", key_id=kid))
    time.sleep(max(0.0, signed_at + 3.2 - time.time()))
    r = ssh(sshd, "webops", ssh_key, tmp_path, cert=cert)
    assert r.returncode == 255
    assert "Permission denied (publickey)" in r.stderr
    assert log_lines_with(sshd, kid)
    assert reason_before(sshd, kid) == "Certificate invalid: expired"


def test_wrong_host_key_is_refused(ssh_ca: SshCa, sshd: Sshd, ssh_key: ClientKey, tmp_path: Path) -> None:
    other = new_client_key(tmp_path / "other-host").public_key
    kh = tmp_path / "wrong_known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    cert = ssh_key.write_cert(ssh_ca.sign("web-ops", ssh_key.public_key, ["webops"], "5m", key_id=key_id()))
    r = ssh(sshd, "webops", ssh_key, tmp_path, cert=cert, known_hosts=kh)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr
    assert r.stdout == ""
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    r = ssh(sshd, "webops", ssh_key, tmp_path, cert=cert, known_hosts=empty)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr
    assert empty.read_text() == ""  # StrictHostKeyChecking=yes never learns a key


def test_certificate_from_another_ca_is_refused(stack_base: Stack, sshd: Sshd, ssh_key: ClientKey,
                                                tmp_path: Path) -> None:
    other = SshCa(stack_base.bao, setup_ssh_ca(stack_base.bao, mount="ssh-other"), mount="ssh-other")
    assert other.public_key != stack_base.ssh_ca.public_key
    cert = ssh_key.write_cert(other.sign("web-ops", ssh_key.public_key, ["webops"], key_id=key_id()))
    r = ssh(sshd, "webops", ssh_key, tmp_path, cert=cert)
    assert r.returncode == 255
    assert "Permission denied (publickey)" in r.stderr


# ------------------------------------------------------------------------------------------- the pieces
def test_users_are_usable_but_have_no_password() -> None:
    shadow = {ln.split(":")[0]: ln.split(":")[1] for ln in Path("/etc/shadow").read_text().splitlines() if ln}
    for user in SSH_USERS:
        ensure_user(user)  # idempotent
        assert shadow[user] == "*"
        assert Path(f"/home/{user}").is_dir()


def test_ca_setup_is_idempotent(stack_base: Stack) -> None:
    bao = stack_base.bao
    assert setup_ssh_ca(bao) == stack_base.ssh_ca.public_key  # posting config/ca again would replace the key
    r = httpx.get(f"{bao.address}/v1/ssh/public_key", timeout=5)  # unauthenticated, as sshd admins fetch it
    assert r.status_code == 200
    assert r.text.strip() == stack_base.ssh_ca.public_key
    roles = bao.api("LIST", "ssh/roles")["data"]
    assert isinstance(roles, dict)
    assert set(roles["keys"]) == set(SSH_ROLES)
    ops = bao.api("GET", "ssh/roles/web-ops")["data"]
    assert isinstance(ops, dict)
    assert (ops["allowed_users"], ops["ttl"], ops["max_ttl"]) == ("webops", 300, 3600)
    assert ops["default_extensions"] == {"permit-pty": ""}


def test_broker_token_signs_but_cannot_configure(stack_base: Stack, ssh_key: ClientKey) -> None:
    token = stack_base.vault_token_file.read_text().strip()
    with httpx.Client(base_url=stack_base.bao.address, headers={"X-Vault-Token": token}, timeout=10) as c:
        body = {"public_key": ssh_key.public_key, "valid_principals": "webops", "ttl": "1m",
                "cert_type": "user", "key_id": "broker"}
        r = c.post("/v1/ssh/sign/web-ops", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["data"]["signed_key"].startswith("ssh-ed25519-cert-v01@openssh.com ")
        assert c.get("/v1/ssh/public_key").status_code == 200
        assert c.get("/v1/ssh/config/ca").status_code == 200
        assert c.post("/v1/ssh/config/ca", json={"generate_signing_key": True}).status_code == 403
        assert c.post("/v1/ssh/roles/web-ops", json={"allowed_users": "root"}).status_code == 403
        assert c.get("/v1/database/creds/prod-db-read").status_code == 200  # database rights kept


def test_stack_sshd(stack_base: Stack) -> None:
    sshd = stack_base.sshd
    assert sshd.alive()
    assert sshd.users == SSH_USERS
    assert re.fullmatch(r"ssh-ed25519 AAAA[0-9A-Za-z+/]+=*", sshd.host_public_key)
    assert sshd.known_hosts_line == f"[127.0.0.1]:{sshd.port} {sshd.host_public_key}"
    assert "sshd" in stack_base.timings
    cfg = tomllib.loads(stack_base.broker_config_path.read_text())
    target = cfg["targets"][SSH_TARGET]
    assert (target["kind"], target["port"], target["host_key"]) == ("ssh", sshd.port, sshd.host_public_key)
    assert {"group": "dba", "target": SSH_TARGET, "levels": ["ops", "admin"]} in cfg["access"]


def test_broker_config_ssh_target_is_optional(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "issuer": "http://127.0.0.1:1", "vault_addr": "http://127.0.0.1:2", "vault_token_file": tmp_path,
        "pg_port": 5432, "db_url": "sqlite:///x.db", "recordings_dir": tmp_path, "port": 3,
    }
    plain = broker_config(**common)
    assert list(plain["targets"]) == ["prod-db"]
    assert all(a["target"] == "prod-db" for a in plain["access"])
    cfg = tomllib.loads(to_toml(broker_config(**common, ssh_port=2222, ssh_host_key="ssh-ed25519 AAAAC3Nz")))
    target = cfg["targets"][SSH_TARGET]
    levels = target.pop("levels")
    assert target == {
        "kind": "ssh", "host": "127.0.0.1", "port": 2222, "host_key": "ssh-ed25519 AAAAC3Nz",
        "vault_mount": "ssh", "description": "web server (OpenSSH)", "default_level": "ops",
    }
    want = {  # per level at least these (more keys, e.g. port_forwarding, may come with the broker's schema)
        "ops": {"vault_role": "web-ops", "ttl_cap": "1h", "principals": ["webops"]},
        "admin": {"vault_role": "web-admin", "ttl_cap": "30m", "principals": ["deploy"]},
    }
    assert list(levels) == list(want)
    for level, spec in want.items():
        assert {k: levels[level][k] for k in spec} == spec
    assert {"group": "dba", "target": SSH_TARGET, "levels": ["ops", "admin"]} in cfg["access"]
    with pytest.raises(ValueError, match="both"):
        broker_config(**common, ssh_port=2222)


def test_sshd_lifecycle_ends_sessions(stack_base: Stack, ssh_key: ClientKey, tmp_path: Path) -> None:
    """A separate sshd: starts on the port asked for, stop() ends the listener and its live sessions."""
    port = free_port()
    t0 = time.monotonic()
    own = start_sshd(tmp_path / "sshd", stack_base.ssh_ca.public_key, ["webops"], port=port)
    started_in = time.monotonic() - t0
    try:
        assert own.port == port
        assert own.host_public_key != stack_base.sshd.host_public_key
        cert = ssh_key.write_cert(stack_base.ssh_ca.sign("web-ops", ssh_key.public_key, "webops"))
        kh = own.write_known_hosts(tmp_path / "kh")
        args = ssh_command(port, "webops", ssh_key.path, kh, "sleep", "60", cert=cert)
        env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
        client = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 15
        while "Starting session: command for webops" not in own.log():
            assert time.monotonic() < deadline, own.log()
            time.sleep(0.05)
        assert own.proc is not None
        sessions = psutil.Process(own.proc.pid).children(recursive=True)
        assert sessions
    finally:
        own.stop()
    try:
        assert client.wait(10) == 255  # connection closed by the server
    finally:
        if client.poll() is None:
            client.kill()
    assert not own.alive()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in sessions)
    r = run_ssh(ssh_command(port, "webops", ssh_key.path, kh, "true", cert=cert), tmp_path)
    assert r.returncode == 255
    assert started_in < 5


def test_stack_without_sshd_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tests.stack.sshd

    monkeypatch.setattr(tests.stack.sshd, "SSHD", tmp_path / "no-sshd")
    st = Stack(tmp_path / "stack")
    with pytest.raises(SshdMissing, match=r"bash \.ci/bootstrap"):
        st.start()
    assert st._pg is None  # failed before starting anything
    assert st._bao is None
    with pytest.raises(SshdMissing):
        start_sshd(tmp_path / "sshd", "ssh-ed25519 AAAA", ["webops"])
