"""The whole stack comes up, is wired together, and tears down cleanly."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import psutil
from tests.stack.broker import write_broker_config
from tests.stack.idp import WORKLOAD_AUDIENCE
from tests.stack.stack import Stack


def test_broker_answers(stack: Stack) -> None:
    assert stack.broker is not None
    assert stack.broker.alive()
    r = httpx.get(f"{stack.broker_url}/healthz", timeout=5)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    r = httpx.get(f"{stack.broker_url}/v1/config/oidc", timeout=5)
    assert r.status_code == 200, r.text
    cfg = r.json()
    assert cfg["issuer"] == stack.idp.issuer
    assert cfg["client_id"] == "pcigate"
    assert "openid" in cfg["scopes"]


def test_broker_accepts_real_tokens(stack: Stack) -> None:
    """The IdP's ID token (human) and workload JWT are both accepted by the broker's /v1/whoami."""
    human = httpx.get(f"{stack.broker_url}/v1/whoami", timeout=10,
                      headers={"Authorization": f"Bearer {stack.idp.id_token('alice')}"})
    assert human.status_code == 200, human.text
    assert human.json()["subject"] == "alice"
    assert human.json()["groups"] == ["dba"]
    assert human.json()["client_kind"] == "human"
    workload = httpx.get(f"{stack.broker_url}/v1/whoami", timeout=10,
                         headers={"Authorization": f"Bearer {stack.idp.workload_token('ci-bot')}"})
    assert workload.status_code == 200, workload.text
    assert workload.json()["subject"] == "ci-bot"
    assert workload.json()["client_kind"] == "workload"
    no = httpx.get(f"{stack.broker_url}/v1/whoami", timeout=10)
    assert no.status_code == 401


def test_broker_config_is_valid(stack: Stack) -> None:
    from pcigate_broker.settings import load_settings

    settings = load_settings(stack.broker_config_path)
    assert settings.oidc.issuer == stack.idp.issuer
    assert WORKLOAD_AUDIENCE in settings.oidc.extra_audiences
    assert set(settings.targets["prod-db"].levels) == {"read", "admin"}


def test_openbao_issues_working_credentials(stack_base: Stack) -> None:
    bao = stack_base.bao
    with httpx.Client(base_url=bao.address, timeout=10,
                      headers={"X-Vault-Token": stack_base.vault_token_file.read_text().strip()}) as c:
        r = c.get("/v1/database/creds/prod-db-read")
        assert r.status_code == 200, r.text
        data = r.json()
        user, password = data["data"]["username"], data["data"]["password"]
        assert stack_base.pg.can_login(user, password, database="prod")
        assert not stack_base.pg.can_login(user, password + "x", database="prod")
        r = c.put("/v1/sys/leases/revoke", json={"lease_id": data["lease_id"]})
        assert r.status_code == 204, r.text
    assert not stack_base.pg.can_login(user, password, database="prod")
    assert user not in stack_base.leftover_roles()


def test_cli_env_is_a_fresh_user(stack: Stack, tmp_path: Path) -> None:
    env = stack.cli_env(tmp_path / "home")
    assert env["HOME"] == str(tmp_path / "home")
    assert env["PCIGATE_BROKER"] == stack.broker_url
    assert env["PCIGATE_STATE_DIR"].startswith(env["HOME"])
    assert "PCIGATE_TOKEN" not in env
    # the keyring the CLI will load: real, encrypted, headless, shared across processes
    py = Path(__import__("sys").executable)
    put = subprocess.run([str(py), "-c", "import keyring; keyring.set_password('pcigate', 'k', 'v1')"],
                         env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert put.returncode == 0, put.stderr
    get = subprocess.run([str(py), "-c", "import keyring; print(type(keyring.get_keyring()).__name__, "
                          "keyring.get_password('pcigate', 'k'))"],
                         env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert get.returncode == 0, get.stderr
    assert get.stdout.split() == ["EnvCryptFileKeyring", "v1"]
    stored = (tmp_path / "home" / ".local" / "share" / "python_keyring" / "cryptfile_pass.cfg").read_text()
    assert "v1" not in stored


def test_stack_lifecycle_leaves_nothing(tmp_path: Path) -> None:
    """A second, complete stack: up, a credential issued, down — no process, no v- role left."""
    t0 = time.monotonic()
    st = Stack(tmp_path / "stack2")
    with st:
        up = time.monotonic() - t0
        pids = [p for p in (st.bao.proc, st.idp.proc, st.broker.proc if st.broker else None) if p]
        pg_pid = int((st.pg.datadir / "postmaster.pid").read_text().split()[0])
        st.bao.api("GET", "database/creds/prod-db-admin")
        assert len(st.leftover_roles()) == 1
        pg = st.pg
    assert up < 30, st.timings
    for p in pids:
        assert p.poll() is not None
    assert not psutil.pid_exists(pg_pid) or psutil.Process(pg_pid).status() == psutil.STATUS_ZOMBIE
    assert not pg.datadir.exists()
    assert st.roles_left_at_teardown == []


def test_broker_restart(stack: Stack) -> None:
    assert stack.broker is not None
    stack.broker.restart()
    assert httpx.get(f"{stack.broker_url}/healthz", timeout=5).status_code == 200


def test_broker_refuses_invalid_config(stack: Stack, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    write_broker_config(cfg, issuer="not-a-url", vault_addr=stack.bao.address,
                        vault_token_file=stack.vault_token_file, pg_port=stack.pg.port,
                        db_url="sqlite:///x.db", recordings_dir=tmp_path / "rec", port=1,
                        read_ttl_cap="soon")
    from tests.stack.broker import venv_bin

    r = subprocess.run([str(venv_bin("pcigate-broker")), "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert "oidc.issuer" in r.stderr + r.stdout
    assert "ttl_cap" in r.stderr + r.stdout
