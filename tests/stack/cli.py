"""Running the real ``pcigate`` console script as a subprocess, and signing it in headlessly.

``run_cli(args, env)`` runs it to completion; ``CliProcess`` runs it in the background while its output is
read (e.g. to pick up the device code it prints); ``login_device()`` / ``login_browser()`` drive the two
sign-in flows through the real IdP with the headless drivers of :mod:`tests.stack.idp`.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple

from tests.stack.broker import venv_bin
from tests.stack.idp import Idp

# oidc-provider user codes: base-20 charset, mask ****-****
USER_CODE_RE = re.compile(r"\b([BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4})\b")


class CliResult(NamedTuple):
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def pcigate_bin() -> Path:
    return venv_bin("pcigate")


def run_cli(args: list[str], env: dict[str, str], input: str | None = None, timeout: float = 60.0,
            cwd: Path | None = None) -> CliResult:
    """Run ``pcigate ARGS`` to completion. ``input=None`` gives the CLI no stdin (like CI)."""
    proc = subprocess.run(
        [str(pcigate_bin()), *args], env=env, input=input, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL if input is None else None, cwd=cwd,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


class CliProcess:
    """``pcigate ARGS`` in the background; its stdout/stderr are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], *, stdin_data: str | None = None,
                 cwd: Path | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [str(pcigate_bin()), *args], env=env, cwd=cwd, text=True, bufsize=1,
            stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self._out: list[str] = []
        self._err: list[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for t in self._threads:
            t.start()
        if stdin_data is not None and self.proc.stdin is not None:
            self.proc.stdin.write(stdin_data)
            self.proc.stdin.close()

    def _pump(self, stream: IO[str] | None, sink: list[str]) -> None:
        if stream is None:
            return
        for line in iter(stream.readline, ""):
            with self._cond:
                sink.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self._err)

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until ``pattern`` shows up in stdout or stderr; raises if the process ends first."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search("".join(self._out) + "\n" + "".join(self._err))
                if m:
                    return m
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise RuntimeError(
                        f"pcigate {' '.join(self.args)} exited with {self.proc.returncode} before printing "
                        f"{rx.pattern!r}\nstdout: {''.join(self._out)}\nstderr: {''.join(self._err)}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"pcigate {' '.join(self.args)} did not print {rx.pattern!r} in {timeout}s\n"
                        f"stdout: {''.join(self._out)}\nstderr: {''.join(self._err)}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float = 60.0) -> CliResult:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        for t in self._threads:
            t.join(5)
        return CliResult(code, self.stdout, self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def login_device(env: dict[str, str], idp: Idp, user: str, password: str | None = None, *,
                 extra_args: list[str] | None = None, timeout: float = 60.0) -> CliResult:
    """``pcigate login --device``: read the user code it prints, approve it as ``user``, wait for the CLI."""
    cli = CliProcess(["login", "--device", *(extra_args or [])], env)
    try:
        m = cli.wait_for(USER_CODE_RE, timeout=timeout)
        idp.approve_device(m.group(1), user, password)
        return cli.wait(timeout)
    finally:
        cli.kill()


def login_browser(env: dict[str, str], idp: Idp, user: str, password: str | None = None, *,
                  timeout: float = 60.0) -> CliResult:
    """``pcigate login --no-browser``: take the authorize URL it prints, walk it through the IdP as ``user``
    and deliver the redirect to the CLI's loopback listener."""
    cli = CliProcess(["login", "--no-browser"], env)
    try:
        m = cli.wait_for(re.compile(re.escape(idp.issuer) + r"/\S*\?\S+"), timeout=timeout)
        idp.complete_auth_code(m.group(0), user, password)
        return cli.wait(timeout)
    finally:
        cli.kill()


def last_session(run_cli: Callable[..., CliResult], env: dict[str, str] | None = None) -> dict[str, Any]:
    """The newest session the signed-in user sees (``pcigate sessions --limit 1 --json``)."""
    r = run_cli(["sessions", "--limit", "1", "--json"], env=env)
    assert r.code == 0, r.output
    items = json.loads(r.stdout)
    assert items, r.output
    return dict(items[0])
