"""Benchmark: `pcigate connect` to a ready tunnel, against OpenBao's own credential time; `--help` start-up.

Run: .venv/bin/python -m tests.benchmarks.bench_connect [--rounds 15]
Brings up the real stack (SCRAM PostgreSQL, OpenBao dev, the npm IdP, the broker with SQLite), then per round:

* ``vault``: OpenBao's own credential time, ``GET database/creds/prod-db-read`` straight to OpenBao
  (then the lease is revoked);
* ``connect``: wall time from spawning ``pcigate connect prod-db --no-exec --json`` (workload token in
  ``PCIGATE_TOKEN``) to the moment it prints its connection details, i.e. session opened at the broker,
  credentials minted, upstream login checked, tunnel listening; the process is then sent SIGINT and must end
  the session and upload its recording; peak RSS of the CLI process is sampled meanwhile;
* ``help``: wall time of ``pcigate --help``.

The package's bytecode is compiled first, as installing it does (an editable install writes it on first use,
unless PYTHONDONTWRITEBYTECODE is set, as it is in some CI shells: then every start compiles the sources).
Writes the medians into docs/performance.md between the markers of the "Connect and start-up" section
(``--no-write``: only print them).
"""

from __future__ import annotations

import argparse
import compileall
import json
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
from tests.stack.stack import Stack

from pcigate import startup

ROOT = Path(__file__).resolve().parents[2]


def _peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    peak = 0
    try:
        proc = psutil.Process(pid)
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)
    except psutil.Error:
        pass
    out.append(peak)


# connect's start-up phases (pcigate.startup.mark), each from the previous mark (the first from the spawn)
PHASES = (
    ("start", "Python start (interpreter, site, the console script)"),
    ("command", "`import pcigate.app` (pathlib, typer, the commands) and typer's parsing (pydantic)"),
    ("request", "the command's imports (session, models, asyncio, httpx) and the broker client's set-up"),
    ("response", "the broker call, OpenBao's credentials included (the tunnel's imports run meanwhile)"),
    ("ready", "waiting for those imports, spool entry, recording file, upstream login check, listen"),
)


def time_connect(env: dict[str, str]) -> tuple[float, int, dict[str, float]]:
    """Seconds to a ready tunnel, the CLI's peak RSS, and the milliseconds of each of :data:`PHASES`."""
    env = env | {startup.TRACE_ENV: "1"}
    spawned = time.monotonic() * 1000.0
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(pcigate_bin()), "connect", "prod-db", "--no-exec", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    stop, peaks = threading.Event(), []
    sampler = threading.Thread(target=_peak_rss, args=(proc.pid, stop, peaks), daemon=True)
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
    phases, prev = {}, spawned
    for name, _ in PHASES:
        at = float(marks[name])
        phases[name], prev = at - prev, at
    return ready, peaks[0] if peaks else 0, phases


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
    with Stack() as stack, tempfile.TemporaryDirectory() as home:
        env = stack.cli_env(Path(home), token=stack.idp.workload_token())
        time_connect(env)  # warm-up: JWKS fetch and caches at the broker, page cache for imports
        vault, connect, helps, imports, libs, rss = [], [], [], [], [], []
        phases: dict[str, list[float]] = {name: [] for name, _ in PHASES}
        for _ in range(args.rounds):
            vault.append(time_vault(stack))
            ready, peak, took = time_connect(env)
            connect.append(ready)
            rss.append(peak)
            for name, ms in took.items():
                phases[name].append(ms)
            helps.append(time_help(env))
            imports.append(time_imports())
            libs.append(time_imports(LIBRARIES))
    series = (("vault", vault), ("connect", connect), ("help", helps), ("imports", imports), ("libs", libs))
    med = {k: statistics.median(v) * 1000 for k, v in series}
    overhead = med["connect"] - med["vault"]
    text = (
        f"Measured {time.strftime('%Y-%m-%d')} on this 2-core machine, {args.rounds} rounds, medians "
        f"(`python -m tests.benchmarks.bench_connect`).\n\n"
        "| measure | median | target |\n|---|---|---|\n"
        f"| OpenBao credential issue (direct API call) | {med['vault']:.1f} ms | — |\n"
        f"| `pcigate connect prod-db` → tunnel ready (process start, token, broker, OpenBao, upstream login "
        f"check, listen) | {med['connect']:.1f} ms | — |\n"
        f"| connect beyond OpenBao's own time | {overhead:.1f} ms | ≤ 150 ms "
        f"({'met' if overhead <= 150 else 'not met'}) |\n"
        "| Python start + every import `connect` needs, one after the other (typer, pydantic, httpx, "
        "asyncio, uvloop, the tunnel, pglast; part of it overlaps the broker call) | "
        f"{med['imports']:.1f} ms | — |\n"
        "| of which the floor: Python start + `import typer, httpx` + pydantic's `BaseModel` (no pcigate "
        f"code) | {med['libs']:.1f} ms | — |\n"
        f"| `pcigate --help` | {med['help']:.1f} ms | ≤ 150 ms "
        f"({'met' if med['help'] <= 150 else 'not met'}) |\n"
        f"| peak RSS of the `pcigate connect` process | {statistics.median(rss) / 2**20:.1f} MiB | — |\n"
        "\nWhere `connect` spends it, phase by phase (`PCIGATE_TRACE_STARTUP=1`, marks on the monotonic "
        "clock from the spawn; medians of each phase, so they need not add up to the median above):\n\n"
        "| phase | median |\n|---|---|\n"
        + "".join(f"| {label} | {statistics.median(phases[name]):.1f} ms |\n" for name, label in PHASES)
    )
    if not args.no_write:
        write_marked("connect", text, "Connect and start-up")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
