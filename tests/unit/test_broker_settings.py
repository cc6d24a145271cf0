"""broker.toml validation, durations, secrets and the ``pcigate-broker`` command line (check-config,
migrate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.integration.test_broker_support import broker_toml

from pcigate_broker.cli import main
from pcigate_broker.settings import ConfigError, load_settings, parse_duration

BIN = Path(sys.executable).parent / "pcigate-broker"


def _toml(tmp_path: Path, **kw: object) -> str:
    return broker_toml(issuer="http://127.0.0.1:8700", db_url=f"sqlite:///{tmp_path}/b.db",
                       recordings_dir=tmp_path / "rec", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "seconds"), [("90s", 90), ("30m", 1800), ("8h", 28800), ("1d", 86400),
                                                (45, 45), ("120", 120), (" 5m ", 300)])
def test_durations(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds


def test_good_config_and_secret(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("s.secret-token\n")
    cfg = tmp_path / "broker.toml"
    cfg.write_text(_toml(tmp_path, token_file=tok, read_cap="90m"))
    s = load_settings(cfg, environ={})
    assert s.vault.token is not None
    assert s.vault.token.get_secret_value() == "s.secret-token"
    assert "s.secret-token" not in repr(s)
    assert "s.secret-token" not in str(s.model_dump())
    assert s.targets["prod-db"].levels["read"].ttl_cap == 5400
    assert s.server.port == 8600
    assert s.server.host == "127.0.0.1"
    assert s.oidc.effective_client_id == "pcigate"
    assert s.targets["staging-db"].default == "read"


def test_token_from_env_and_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(_toml(tmp_path))
    s = load_settings(cfg, environ={"PCIGATE_BROKER_VAULT_TOKEN": "envtok"})
    assert s.vault.token is not None
    assert s.vault.token.get_secret_value() == "envtok"
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg, environ={})
    assert ei.value.problems == [
        "vault.token_file: no OpenBao token: set token_file or PCIGATE_BROKER_VAULT_TOKEN"]


def test_errors_name_the_key(tmp_path: Path) -> None:
    text = _toml(tmp_path, read_cap="soon").replace('listen = "127.0.0.1:8600"', 'listen = "0.0.0.0:8600"')
    text = text.replace('algorithms = ["RS256", "ES256"]', 'algorithms = ["RS256", "HS256"]')
    text = text.replace('levels = ["read"]\n', 'levels = ["write"]\n', 1)
    cfg = tmp_path / "broker.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg, environ={"PCIGATE_BROKER_VAULT_TOKEN": "x"})
    problems = ei.value.problems
    assert 'targets.prod-db.levels.read.ttl_cap: expected a duration like "30m"' in problems
    assert any(p.startswith("server:") and "non-loopback" in p for p in problems)
    assert any(p.startswith("oidc.algorithms:") and "HS256" in p for p in problems)


def test_cross_checks(tmp_path: Path) -> None:
    text = _toml(tmp_path).replace('levels = ["read"]\n', 'levels = ["write"]\n', 1)
    text += '\n[[access]]\ngroup = "x"\ntarget = "nowhere"\nlevels = ["read"]\n'
    cfg = tmp_path / "broker.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg, environ={"PCIGATE_BROKER_VAULT_TOKEN": "x"})
    assert ei.value.problems == ["access.1.levels: unknown level 'write'",
                                 "access.3.target: unknown target 'nowhere'"]


def test_cli_check_config_bad_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text("bogus = 1\n" + _toml(tmp_path, heartbeat=0))
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "config error: bogus: Extra inputs are not permitted" in err
    cfg.write_text("this is [ not toml")
    assert main(["check-config", "--config", str(cfg)]) == 2
    assert main(["check-config", "--config", str(tmp_path / "missing.toml")]) == 2


def test_cli_subprocess_check_and_migrate(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(_toml(tmp_path))
    env = {"PATH": "/usr/bin:/bin", "PCIGATE_BROKER_VAULT_TOKEN": "x"}
    r = subprocess.run([str(BIN), "check-config", "--config", str(cfg)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(BIN), "migrate", "--config", str(cfg)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b.db").exists()
    r = subprocess.run([str(BIN), "check-config", "--config", str(cfg)], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8vF0bX3s4d1qgYh4Q1fWkqkqz1PbcUq7K3eXnYy8cQ"
SSH_TARGET = f"""
[targets.web-1]
kind = "ssh"
host = "web-1.internal"
host_key = "{HOST_KEY}"
[targets.web-1.levels.ops]
vault_role = "web-ops"
ttl_cap = "1h"
principals = ["webops"]
"""


def _ssh_problems(tmp_path: Path, target: str) -> list[str]:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(_toml(tmp_path) + target)
    try:
        load_settings(cfg, environ={"PCIGATE_BROKER_VAULT_TOKEN": "x"})
    except ConfigError as exc:
        return exc.problems
    return []


def test_an_ssh_target(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text(_toml(tmp_path) + SSH_TARGET)
    s = load_settings(cfg, environ={"PCIGATE_BROKER_VAULT_TOKEN": "x"})
    t = s.targets["web-1"]
    assert (t.effective_port, t.mount) == (22, "ssh")
    assert t.known_hosts() == ["web-1.internal " + t.host_key]  # port 22: the plain host name
    assert not t.levels["ops"].port_forwarding  # off unless allowed: a forward is not recorded
    ca = SSH_TARGET.replace("host_key", "port = 2222\nhost_ca")
    cfg.write_text(_toml(tmp_path) + ca)
    t = load_settings(cfg, environ={"PCIGATE_BROKER_VAULT_TOKEN": "x"}).targets["web-1"]
    assert t.known_hosts() == [f"@cert-authority [web-1.internal]:2222 {t.host_ca}"]


@pytest.mark.parametrize(("change", "problem"), [
    (lambda t: t.replace('principals = ["webops"]', "principals = []"), "needs principals"),
    (lambda t: t.replace('principals = ["webops"]', 'principals = ["root"]'), "bad principal 'root'"),
    (lambda t: t.replace('host_key = "ssh-ed25519', 'host_key = "not-a-key'), "an OpenSSH public key"),
    (lambda t: t.replace("host_key", 'host_ca = "ssh-ed25519 AAAA"\nhost_key'), "exactly one of host_key"),
    (lambda t: t.replace(f'host_key = "{HOST_KEY}"', ""), "exactly one of host_key"),
    (lambda t: t + '[[targets.web-1.guardrails]]\nname = "x"\ndeny = ["ddl"]\n', "not for ssh targets"),
])
def test_ssh_target_mistakes_are_named(tmp_path: Path, change, problem: str) -> None:
    problems = _ssh_problems(tmp_path, change(SSH_TARGET))
    assert any(p.startswith("targets.web-1") and problem in p for p in problems), problems


def test_a_postgres_target_still_needs_its_database(tmp_path: Path) -> None:
    problems = _ssh_problems(tmp_path, SSH_TARGET.replace('kind = "ssh"', 'kind = "postgres"'))
    assert any("a postgres target needs database" in p for p in problems), problems
