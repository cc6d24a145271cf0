"""Benchmark: `pcigate connect` to a ready tunnel, against OpenBao's own credential time; `--help` start-up.

Run: .venv/bin/python -m tests.benchmarks.bench_connect [--rounds 15]
Brings up the real stack (SCRAM PostgreSQL, OpenBao dev, the npm IdP, the broker with SQLite), then per round:

* ``vault``: OpenBao's own credential time, ``GET database/creds/prod-db-read`` straight to OpenBao
  (then the lease is revoked);
* ``connect``: wall time from spawning ``pcigate connect prod-db --no-exec --json`` (workload token in
  ``PCIGATE_TOKEN``) to the moment it prints its connection details, i.e. session opened at the broker,
  credentials minted, upstream login checked, tunnel listening; the process is then sent SIGINT and must end
  the session and upload its recording; peak RSS of the CLI process (and, warm, of its worker) is sampled
  meanwhile. Three ways each round (``pcigate.resident``): **cold** (``PCIGATE_RESIDENT=0``: everything in
  the process started), **first** (the warm start on, but no helper running: runs in-process, then starts
  one), **warm** (a helper running: the command runs in a fork of it);
* ``help``: wall time of ``pcigate --help``.

The package's bytecode is compiled first, as installing it does (an editable install writes it on first use,
unless PYTHONDONTWRITEBYTECODE is set, as it is in some CI shells: then every start compiles the sources).
Writes the medians into docs/performance.md between the markers of the "Connect and start-up" section
(``--no-write``: only print them).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from tests.benchmarks.perfdoc import write_marked
from tests.stack.cli import pcigate_bin
from tests.stack.stack import WARM_DIR_ENV, Stack

from pcigate import startup

ROOT = Path(__file__).resolve().parents[2]


def _peak_rss(pid: int, helper: int | None, stop: threading.Event, out: list[tuple[int, int]]) -> None:
    """Peak RSS of the process ``pid`` and of the worker the ``helper`` forked meanwhile (0 if none)."""
    peak = worker = 0
    try:
        proc = psutil.Process(pid)
        parent = psutil.Process(helper) if helper else None
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            if parent is not None:
                for child in parent.children():
                    with contextlib.suppress(psutil.Error):
                        worker = max(worker, child.memory_info().rss)
            time.sleep(0.005)
    except psutil.Error:
        pass
    out.append((peak, worker))


# connect's start-up phases (pcigate.startup.mark), each from the previous mark (the first from the spawn):
# in-process (cold), and handed to a helper (warm)
PHASES = (
    ("start", "Python start (interpreter, site, the console script)"),
    ("command", "`import pcigate.app` (pathlib, typer, the commands) and typer's parsing (pydantic)"),
    ("request", "the command's imports (session, models, asyncio, httpx) and the broker client's set-up"),
    ("response", "the broker call, OpenBao's credentials included (the tunnel's imports run meanwhile)"),
    ("ready", "waiting for those imports, spool entry, recording file, upstream login check, listen"),
)
WARM_PHASES = (
    ("start", "Python start (interpreter, site, the console script)"),
    ("worker", "the hand-off: the code's fingerprint, the helper's socket, argv, environment and fds, fork"),
    ("command", "typer's parsing, in the worker (everything is imported already)"),
    ("request", "the command's set-up (settings, token, broker client)"),
    ("response", "the broker call, OpenBao's credentials included"),
    ("ready", "spool entry, recording file, upstream login check, listen"),
)


def time_connect(env: dict[str, str], phases: tuple[tuple[str, str], ...] = PHASES,
                 helper: int | None = None) -> tuple[float, tuple[int, int], dict[str, float]]:
    """Seconds to a ready tunnel, peak RSS (the CLI process, its worker), and the ms of each of ``phases``."""
    env = env | {startup.TRACE_ENV: "1"}
    spawned = time.monotonic() * 1000.0
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(pcigate_bin()), "connect", "prod-db", "--no-exec", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    stop, peaks = threading.Event(), []
    sampler = threading.Thread(target=_peak_rss, args=(proc.pid, helper, stop, peaks), daemon=True)
    sampler.start()
    assert proc.stdout is not None
    text = ""
    while True:  # the JSON object may span lines; ready when it is complete
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"connect did not become ready: {text!r} {err}")
        text += line
        try:
            json.loads(text)
            break
        except ValueError:
            continue
    ready = time.perf_counter() - t0
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    stop.set()
    sampler.join()
    err = proc.stderr.read() if proc.stderr else ""
    if rc not in (0, 130):  # 130: ended by Ctrl-C, after a clean session end
        raise RuntimeError(f"connect exited {rc}: {err}")
    prefix = startup.TRACE_PREFIX + " "
    marks = dict(line.split()[1:3] for line in err.splitlines() if line.startswith(prefix))
    took, prev = {}, spawned
    for name, _ in phases:
        at = float(marks[name])
        took[name], prev = at - prev, at
    return ready, peaks[0] if peaks else (0, 0), took


def helper_pid(warm_dir: Path) -> int | None:
    for lock in (warm_dir / "pcigate").glob("*.lock"):
        fields = lock.read_text().split()
        if fields and lock.with_suffix("").exists():
            with contextlib.suppress(psutil.Error):
                if psutil.Process(int(fields[0])).status() != psutil.STATUS_ZOMBIE:
                    return int(fields[0])
    return None


def wait_helper(warm_dir: Path, up: bool) -> int | None:
    deadline = time.monotonic() + 30
    while (helper_pid(warm_dir) is not None) != up:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the helper in {warm_dir} is {'not ' if up else ''}up")
        time.sleep(0.02)
    return helper_pid(warm_dir)


def stop_helper(warm_dir: Path) -> None:
    pid = helper_pid(warm_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        wait_helper(warm_dir, up=False)


def time_vault(stack: Stack) -> float:
    t0 = time.perf_counter()
    r = stack.bao.api("GET", "database/creds/prod-db-read")
    elapsed = time.perf_counter() - t0
    stack.bao.api("PUT", "sys/leases/revoke", {"lease_id": r["lease_id"]})
    return elapsed


def time_help(env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(pcigate_bin()), "--help"], env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# What `connect` imports, with the start-up settings of `pcigate.app.main` (no GC, httpx without its CLI).
IMPORTS = (
    "from pcigate import startup; startup.begin(); "
    "import pcigate.app, pcigate.session, pcigate.client, pcigate.auth.credentials, pcigate.spool, "
    "pcigate.tunnel.pg, uvloop"
)


# The floor on this machine: the three libraries the CLI is built on, nothing of pcigate, with the start-up
# settings the CLI uses for them (GC off; httpx without its own command-line client, see pcigate.startup).
LIBRARIES = ("import gc, sys; gc.disable(); sys.modules['httpx._main'] = None; "
             "import typer, httpx; from pydantic import BaseModel")


def time_imports(code: str = IMPORTS) -> float:
    """Interpreter start + every import `connect` needs, one after the other (connect hides part of them
    behind its broker call)."""
    import sys as _sys

    t0 = time.perf_counter()
    subprocess.run([_sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-write", action="store_true", help="print the results, leave docs/performance.md")
    args = ap.parse_args()
    compileall.compile_dir(ROOT / "cli" / "pcigate", quiet=1)
    warm_dir = Path(tempfile.mkdtemp(prefix="pgb-", dir="/tmp"))
    with Stack() as stack, tempfile.TemporaryDirectory() as home:
        env = stack.cli_env(Path(home), token=stack.idp.workload_token())
        os.environ[WARM_DIR_ENV] = str(warm_dir)
        try:
            warm_env = stack.cli_env(Path(home), token=stack.idp.workload_token())
        finally:
            del os.environ[WARM_DIR_ENV]
        time_connect(env)  # warm-up: JWKS fetch and caches at the broker, page cache for imports
        time_connect(warm_env)  # and the first helper
        wait_helper(warm_dir, up=True)
        runs: dict[str, list[float]] = {k: [] for k in
                                        ("vault", "cold", "first", "warm", "help", "imports", "libs")}
        rss: dict[str, list[int]] = {"cold": [], "client": [], "worker": [], "helper": []}
        phases: dict[str, list[float]] = {name: [] for name, _ in PHASES}
        warm_phases: dict[str, list[float]] = {name: [] for name, _ in WARM_PHASES}
        try:
            for _ in range(args.rounds):
                runs["vault"].append(time_vault(stack))
                ready, (peak, _), took = time_connect(env)
                runs["cold"].append(ready)
                rss["cold"].append(peak)
                for name, ms in took.items():
                    phases[name].append(ms)
                stop_helper(warm_dir)
                runs["first"].append(time_connect(warm_env)[0])  # runs in-process, then starts a helper
                helper = wait_helper(warm_dir, up=True)
                time.sleep(0.5)  # the helper's own start-up is over (imports, then it listens)
                ready, (client, worker), took = time_connect(warm_env, WARM_PHASES, helper)
                runs["warm"].append(ready)
                rss["client"].append(client)
                rss["worker"].append(worker)
                assert helper is not None
                rss["helper"].append(psutil.Process(helper).memory_info().rss)
                for name, ms in took.items():
                    warm_phases[name].append(ms)
                runs["help"].append(time_help(env))
                runs["imports"].append(time_imports())
                runs["libs"].append(time_imports(LIBRARIES))
        finally:
            stop_helper(warm_dir)
            shutil.rmtree(warm_dir, ignore_errors=True)
    med = {k: statistics.median(v) * 1000 for k, v in runs.items()}
    mib = {k: statistics.median(v) / 2**20 for k, v in rss.items()}
    cold, warm = med["cold"] - med["vault"], med["warm"] - med["vault"]
    text = (
        f"Measured {time.strftime('%Y-%m-%d')} on this 2-core machine, {args.rounds} rounds, medians "
        f"(`python -m tests.benchmarks.bench_connect`).\n\n"
        "| measure | median | target |\n|---|---|---|\n"
        f"| OpenBao credential issue (direct API call) | {med['vault']:.1f} ms | — |\n"
        f"| **warm**: `pcigate connect prod-db` → tunnel ready, a helper running (`pcigate.resident`) | "
        f"{med['warm']:.1f} ms | — |\n"
        f"| warm connect beyond OpenBao's own time | **{warm:.1f} ms** | ≤ 150 ms "
        f"({'met' if warm <= 150 else 'not met'}) |\n"
        f"| **cold**: the same in one process (`PCIGATE_RESIDENT=0`) | {med['cold']:.1f} ms | — |\n"
        f"| cold connect beyond OpenBao's own time | {cold:.1f} ms | — |\n"
        f"| **first**: the warm start on, no helper running yet (in-process; starts one once ready) | "
        f"{med['first']:.1f} ms | — |\n"
        "| Python start + every import a cold `connect` needs, one after the other (typer, pydantic, httpx, "
        "asyncio, uvloop, the tunnel, pglast; part of it overlaps the broker call) | "
        f"{med['imports']:.1f} ms | — |\n"
        "| of which the floor: Python start + `import typer, httpx` + pydantic's `BaseModel` (no pcigate "
        f"code) | {med['libs']:.1f} ms | — |\n"
        f"| `pcigate --help` | {med['help']:.1f} ms | ≤ 150 ms "
        f"({'met' if med['help'] <= 150 else 'not met'}) |\n"
        f"| peak RSS: the cold `pcigate connect` process | {mib['cold']:.1f} MiB | — |\n"
        f"| peak RSS, warm: the process the user started / its worker (shares the helper's pages) / the idle "
        f"helper | {mib['client']:.1f} / {mib['worker']:.1f} / {mib['helper']:.1f} MiB | — |\n"
        "\nWhere `connect` spends it, phase by phase (`PCIGATE_TRACE_STARTUP=1`, marks on the monotonic "
        "clock from the spawn; medians of each phase, so they need not add up to the medians above).\n\n"
        "Warm:\n\n| phase | median |\n|---|---|\n"
        + "".join(f"| {label} | {statistics.median(warm_phases[name]):.1f} ms |\n"
                  for name, label in WARM_PHASES)
        + "\nCold:\n\n| phase | median |\n|---|---|\n"
        + "".join(f"| {label} | {statistics.median(phases[name]):.1f} ms |\n" for name, label in PHASES)
    )
    if not args.no_write:
        write_marked("connect", text, "Connect and start-up")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
