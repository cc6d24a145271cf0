"""``python -m tests.stack up``: run the whole stack for a human and wait for Ctrl-C.

Prints the environment lines to use the CLI against it (a fresh home with a headless keyring), the IdP's
users and passwords and the workload clients' secrets.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

from tests.stack.stack import Stack


def up(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pcigate-stack-"))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with Stack(workdir / "stack", id_token_ttl=args.id_token_ttl, keep_workdir=True) as stack:
        home = workdir / "home"
        env = stack.cli_env(home, inherit=False)
        print(stack.describe())
        print(f"timings      {stack.timings}")
        print("\n# Use the CLI against this stack as a fresh user:")
        keys = ["HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME",
                "XDG_RUNTIME_DIR", "PCIGATE_BROKER", "PCIGATE_STATE_DIR", "KEYRING_CRYPTFILE_PASSWORD",
                "PATH"]
        for k in keys:
            print(f"export {k}={shlex.quote(env[k])}")
        print("# then: pcigate login --device   (sign in at the printed URL, e.g. as alice)")
        print(f"# workload: export PCIGATE_TOKEN=$(curl -s -u ci-bot:{stack.idp.workload_clients['ci-bot']} "
              f"-d grant_type=client_credentials {stack.idp.token_endpoint} | jq -r .access_token)")
        print("\nCtrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        print("\nstopping...", flush=True)
    print(f"stopped; logs in {workdir}; dynamic roles left: {len(stack.roles_left_at_teardown)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.stack")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("up", help="start the stack and wait for Ctrl-C")
    p.add_argument("--workdir", help="where to keep everything (default: a new temporary directory)")
    p.add_argument("--id-token-ttl", type=int, default=3600)
    args = ap.parse_args(argv)
    if args.cmd == "up":
        return up(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
