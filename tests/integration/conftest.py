"""Fixtures for tests against the real stack (one stack per test session).

* ``stack_base`` (session): PostgreSQL + OpenBao (+ SSH CA) + sshd + IdP, broker config written but the
  broker not started.
* ``stack`` (session): the whole :class:`tests.stack.stack.Stack`, broker running (fails if it cannot start).
* ``idp`` (session): the IdP alone (needs no broker).
* ``ssh_ca`` (session): OpenBao's SSH CA of ``stack_base`` (mount ``ssh``, roles web-ops/web-admin/web-any);
  ``ssh_ca.sign(role, public_key, principals, ttl, key_id=...)`` signs with the root token.
* ``sshd`` (session): the stack's sshd (127.0.0.1, users webops and deploy) trusting that CA.
* ``ssh_key`` (test): a fresh ed25519 key pair in the test's tmp_path (``.path`` 0600, ``.public_key``).
* ``cli_home`` (test): a fresh, empty home directory for a CLI user.
* ``cli_env`` (test): ``stack.cli_env(cli_home)``: environment for the real ``pcigate`` as that fresh user.
* ``run_cli`` (test): ``run_cli(args, env=None, input=None, timeout=60) -> CliResult(code, stdout, stderr)``
  runs ``.venv/bin/pcigate`` as a subprocess (``env=None``: ``cli_env``).
* ``login`` (test): ``login(user="alice", env=None, device=True) -> CliResult``: signs the CLI in through the
  real IdP (device flow, or the browser flow with ``device=False``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.stack.cli import CliResult, login_browser, login_device
from tests.stack.cli import run_cli as _run_cli
from tests.stack.idp import Idp
from tests.stack.loopthread import LoopThread
from tests.stack.sshd import ClientKey, SshCa, Sshd, new_client_key
from tests.stack.stack import Stack

RunCli = Callable[..., CliResult]
Login = Callable[..., CliResult]


@pytest.fixture(scope="session")
def stack_base(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Stack]:
    keep = bool(pytestconfig.getoption("--keep-stack"))
    workdir = tmp_path_factory.mktemp("stack")
    st = Stack(workdir, start_broker=False, keep_workdir=keep)
    st.start()
    try:
        yield st
    finally:
        st.stop()
        if keep:
            print(f"\nstack work directory kept: {workdir}", file=sys.stderr)


@pytest.fixture(scope="session")
def stack(stack_base: Stack) -> Stack:
    """The whole stack with the broker running."""
    stack_base.start_broker()
    return stack_base


@pytest.fixture(scope="session")
def idp(stack_base: Stack) -> Idp:
    return stack_base.idp


@pytest.fixture(scope="session")
def ssh_ca(stack_base: Stack) -> SshCa:
    return stack_base.ssh_ca


@pytest.fixture(scope="session")
def sshd(stack_base: Stack) -> Sshd:
    return stack_base.sshd


@pytest.fixture
def ssh_key(tmp_path: Path) -> ClientKey:
    return new_client_key(tmp_path / "ssh-client")


@pytest.fixture
def cli_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home


@pytest.fixture
def cli_env(stack: Stack, cli_home: Path) -> dict[str, str]:
    return stack.cli_env(cli_home)


@pytest.fixture
def run_cli(request: pytest.FixtureRequest) -> RunCli:
    def run(args: list[str], env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 60.0) -> CliResult:
        if env is None:
            env = request.getfixturevalue("cli_env")
        return _run_cli(args, env, input=input, timeout=timeout)

    return run


@pytest.fixture
def login(request: pytest.FixtureRequest, stack: Stack) -> Login:
    def do(user: str = "alice", env: dict[str, str] | None = None, *, device: bool = True,
           password: str | None = None, timeout: float = 60.0) -> CliResult:
        if env is None:
            env = request.getfixturevalue("cli_env")
        if device:
            return login_device(env, stack.idp, user, password, timeout=timeout)
        return login_browser(env, stack.idp, user, password, timeout=timeout)

    return do


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    """An event loop in a thread for driving the tunnel in-process (tests/stack/loopthread.py)."""
    lt = LoopThread()
    yield lt
    lt.stop()
