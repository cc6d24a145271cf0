"""The README demo: the main journey with the real CLI against the real stack.

    bash .ci/demo            # or: .venv/bin/python -m tests.stack.demo [--user alice] [--keep]

Brings the stack up (tests.stack.stack.Stack), then runs, printing each command first:

    pcigate login --device        (the user code it prints is approved headlessly as the demo user)
    pcigate whoami
    pcigate targets
    pcigate connect prod-db -- -c "select id, name from customers"
    pcigate ssh web-1 -- 'echo card 4111 1111 1111 1111 seen by $(id -un)'
    pcigate sessions

and tears everything down (the warm-start helper that login started included: it says whether connect and
ssh ran in it). Exit status: 0 when every step succeeded, else the first failing step's code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests.stack.cli import USER_CODE_RE, CliProcess, CliResult, run_cli
from tests.stack.stack import WARM_DIR_ENV, Stack

JOURNEY: list[list[str]] = [
    ["whoami"],
    ["targets"],
    ["connect", "prod-db", "--", "-c", "select id, name from customers"],
    ["ssh", "web-1", "--", "echo card 4111 1111 1111 1111 seen by $(id -un)"],
    ["sessions"],
]


def say(text: str = "") -> None:
    print(text, flush=True)


def show(result: CliResult) -> None:
    if result.stdout:
        sys.stdout.write(result.stdout if result.stdout.endswith("\n") else result.stdout + "\n")
    if result.stderr:
        sys.stdout.write(result.stderr if result.stderr.endswith("\n") else result.stderr + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.stack.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--user", default="alice", help="IdP user to sign in as (alice, bob, carol, audrey)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, recordings)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    say("== bringing up the stack: PostgreSQL (SCRAM), OpenBao (+ SSH CA), sshd, the IdP (oidc-provider), "
        "pcigate-broker")
    workdir = Path(tempfile.mkdtemp(prefix="pcigate-demo-"))
    # The warm start on, as users have it (pcigate.resident): login starts the helper that runs connect
    # and ssh. Its socket directory is short (a socket path holds 107 bytes); the helper is stopped below.
    warm = Path(tempfile.mkdtemp(prefix="pgd-", dir="/tmp"))
    os.environ[WARM_DIR_ENV] = str(warm)
    try:
        return _journey(args, t0, workdir, warm)
    finally:
        del os.environ[WARM_DIR_ENV]
        _stop_helpers(warm)
        shutil.rmtree(warm, ignore_errors=True)


def _helper(warm: Path) -> tuple[int, int] | None:
    """The warm-start helper's pid and the commands it has served (its lock file), if one runs."""
    for lock in (warm / "pcigate").glob("*.lock"):
        fields = lock.read_text().split()
        if len(fields) == 2 and lock.with_suffix("").exists():
            return int(fields[0]), int(fields[1])
    return None


def _stop_helpers(warm: Path) -> None:
    found = _helper(warm)
    if found is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(found[0], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _helper(warm) is not None and time.monotonic() < deadline:
        time.sleep(0.05)


def _journey(args: argparse.Namespace, t0: float, workdir: Path, warm: Path) -> int:
    with Stack(workdir / "stack", keep_workdir=args.keep) as stack:
        say(f"   up in {time.monotonic() - t0:.1f}s  {stack.timings}")
        say(f"   broker {stack.broker_url}  idp {stack.idp.issuer}  postgres 127.0.0.1:{stack.pg.port}")
        env = stack.cli_env(workdir / "home" / args.user)
        say(f"   a fresh user home: {env['HOME']}  (export PCIGATE_BROKER={stack.broker_url})")
        say()

        say("$ pcigate login --device")
        cli = CliProcess(["login", "--device"], env)
        try:
            m = cli.wait_for(USER_CODE_RE, timeout=60)
            shown_out, shown_err = cli.stdout, cli.stderr
            show(CliResult(0, shown_out, shown_err))
            say(f"   [demo] approving user code {m.group(1)} as {args.user} "
                f"on {stack.idp.device_verification_url}")
            stack.idp.approve_device(m.group(1), args.user)
            res = cli.wait(60)
        finally:
            cli.kill()
        show(CliResult(res.code, res.stdout[len(shown_out):], res.stderr[len(shown_err):]))
        if res.code != 0:
            say(f"!! login failed with exit code {res.code}")
            return res.code

        for cmd in JOURNEY:
            say()
            say("$ " + shlex.join(["pcigate", *cmd]))
            before = _helper(warm)
            res = run_cli(cmd, env, timeout=120)
            show(res)
            after = _helper(warm)
            if cmd[0] in ("connect", "ssh") and res.code == 0:
                if before and after and after[1] > before[1]:
                    say(f"   [demo] it ran in a fork of the warm-start helper (pid {after[0]}) that login "
                        "started")
                else:
                    say("   [demo] it ran in-process (the warm-start helper was still starting)")
            if res.code != 0:
                say(f"!! {shlex.join(['pcigate', *cmd])} failed with exit code {res.code}")
                return res.code
        say()
        say("== tearing down (broker, leases revoked, OpenBao, IdP, PostgreSQL)")
    _stop_helpers(warm)
    left = stack.roles_left_at_teardown
    say(f"   done in {time.monotonic() - t0:.1f}s; dynamic database roles left: {len(left)}")
    if args.keep:
        say(f"   work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
