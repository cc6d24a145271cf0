"""Benchmark the PostgreSQL tunnel against a direct connection and socat, side by side, in one run.

    .venv/bin/python tests/benchmarks/bench_tunnel.py [--rounds 5] [--seconds 10] [--rows 2000000]
        [--connects 30] [--no-write]

Starts its own SCRAM cluster (tests.stack.postgres), runs ``pgbench -i -s 10``, then per round and per path
(direct; socat; the tunnel with recording on, with recording off, and with recording on but every connection
on the asyncio relay (PCIGATE_TUNNEL_RELAY=python); the order rotates each round):

* ``pgbench -S -c 8 -j 2 -T SECONDS`` (select-only, simple protocol) → tps;
* ``psql -c "COPY (SELECT g, md5(g::text) FROM generate_series(1,ROWS) g) TO STDOUT" > /dev/null`` → MB/s;
* new-connection time: a ``psql -c 'select 1'`` loop → median ms per run.

The tunnel runs in its own process (uvloop policy, as the CLI) so its peak RSS (VmHWM) is measurable.
Results go to stdout and into docs/performance.md, section "Tunnel relay": medians per path, and each ratio as
the median of its per-round ratios (the two paths measured minutes apart at most), with their range.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.stack.ports import free_port, wait_port  # noqa: E402
from tests.stack.postgres import PgCluster, start_cluster  # noqa: E402

from pcigate.tunnel.pg import RELAY_ENV  # noqa: E402

RUNNER = r"""
import asyncio, json, signal, sys
from datetime import UTC, datetime
from pathlib import Path
from pcigate import startup
startup.begin()  # as the CLI: no cyclic GC while starting; what start-up made is frozen once ready
try:
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
except ImportError:
    pass
from pcigate.models import DatabaseCredentials, DataPathPolicy
from pcigate.recording import RecordingHeader, RecordingWriter
from pcigate.tunnel.pg import PgTunnel

cfg = json.loads(sys.stdin.readline())

async def main():
    rec = None
    if cfg["record"]:
        hdr = RecordingHeader("bench", "bench", "bench", "rw", "lease", "0" * 64, datetime.now(UTC))
        rec = RecordingWriter(Path(cfg["recording"]), hdr)
    policy = DataPathPolicy.model_validate(cfg["policy"]) if cfg.get("policy") else None
    t = PgTunnel(DatabaseCredentials(**cfg["creds"]), cfg["secret"], rec, listen_port=cfg["port"],
                 policy=policy)
    await t.check_upstream()
    await t.start()
    startup.end()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await t.close()
    if rec is not None:
        rec.close()
    print(json.dumps({"statements": t.stats.statements, "errors": t.errors[:5]}), flush=True)

asyncio.run(main())
"""


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class Tunnel:
    def __init__(self, cluster: PgCluster, user: str, password: str, workdir: Path,
                 record: bool = True, policy: dict[str, object] | None = None,
                 database: str = "bench", asyncio_relay: bool = False) -> None:
        """``asyncio_relay``: every connection on the asyncio relay (PCIGATE_TUNNEL_RELAY=python)."""
        self.port = free_port()
        self.secret = secrets.token_urlsafe(24)
        self.recording = workdir / f"bench-{self.port}.rec"
        cfg = {"creds": {"host": "127.0.0.1", "port": cluster.port, "database": database, "username": user,
                         "password": password, "sslmode": "disable"},
               "secret": self.secret, "port": self.port, "record": record, "recording": str(self.recording),
               "policy": policy}
        env = os.environ | ({RELAY_ENV: "python"} if asyncio_relay else {})
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"tunnel runner failed: {line!r}")
        self.passfile = workdir / f"pgpass-{self.port}"
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, f"127.0.0.1:{self.port}:*:*:{self.secret}\n".encode())
        os.close(fd)

    def stop(self) -> tuple[int, dict[str, object]]:
        hwm = vm_hwm_kib(self.proc.pid)
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        info = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        return hwm, info


class Socat:
    def __init__(self, cluster: PgCluster) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(["socat", f"TCP-LISTEN:{self.port},fork,reuseaddr,bind=127.0.0.1",
                                      f"TCP:127.0.0.1:{cluster.port}"])
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def bench_database(cluster: PgCluster, seed_sql: str | None = None) -> tuple[str, str]:
    """Database ``bench`` (pgbench scale 10, then ``seed_sql``) and a login role that may read it: (user,
    password)."""
    user, password = "bench_user", secrets.token_urlsafe(18)
    cluster.psql("CREATE DATABASE bench")
    cluster.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
    subprocess.run(["pgbench", "-i", "-s", "10", "-q", "bench"], env=cluster.env, check=True,
                   capture_output=True, timeout=600)
    if seed_sql:
        cluster.psql(seed_sql, database="bench")
    cluster.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {user}", database="bench")
    return user, password


def run_pgbench(env: dict[str, str], port: int, seconds: int) -> float:
    proc = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-n", "-S", "-c", "8", "-j", "2",
                           "-T", str(seconds), "bench"], env=env, capture_output=True, text=True,
                          timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    m = re.search(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections)", proc.stdout)
    if m is None:
        m = re.search(r"tps = ([0-9.]+)", proc.stdout)
    assert m is not None, proc.stdout
    return float(m.group(1))


def run_copy(env: dict[str, str], port: int, rows: int) -> tuple[float, int]:
    sql = f"COPY (SELECT g, md5(g::text) FROM generate_series(1,{rows}) g) TO STDOUT"
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as null:
        subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-d", "bench", "-c", sql], env=env,
                       stdout=null, check=True, timeout=600)
    dt = time.perf_counter() - t0
    size = sum(len(str(g)) + 34 for g in range(1, rows + 1))  # "g\t<32 hex>\n"
    return size / dt / 1e6, size


def run_connect(env: dict[str, str], port: int, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-d", "bench", "-c",
                        "select 1"], env=env, check=True, capture_output=True, timeout=30)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def write_perf_section(heading: str, section: str) -> None:
    """Put ``section`` in place of docs/performance.md's "## heading" section (up to the next heading or
    benchmark marker), or append it."""
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text() if doc.exists() else "# Performance\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |^<!-- bench_|\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.write_text(text)
    print(f"written to {doc}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--connects", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not shutil.which("socat"):
        print("socat is required", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="pcigate-bench-"))
    print(f"starting cluster in {work} ...", flush=True)
    cluster = start_cluster()
    try:
        user, password = bench_database(cluster)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        direct_env = base_env | {"PGUSER": user, "PGPASSWORD": password}

        socat = Socat(cluster)
        tunnel = Tunnel(cluster, user, password, work)
        tunnel_env = base_env | {"PGPASSFILE": str(tunnel.passfile)}
        norec = Tunnel(cluster, user, password, work, record=False)
        norec_env = base_env | {"PGPASSFILE": str(norec.passfile)}
        pyrelay = Tunnel(cluster, user, password, work, asyncio_relay=True)
        pyrelay_env = base_env | {"PGPASSFILE": str(pyrelay.passfile)}
        paths = {"direct": (cluster.port, direct_env), "socat": (socat.port, direct_env),
                 "tunnel": (tunnel.port, tunnel_env), "tunnel, recording off": (norec.port, norec_env),
                 "tunnel, asyncio relay": (pyrelay.port, pyrelay_env)}
        results: dict[str, dict[str, list[float]]] = {p: {"tps": [], "copy": [], "conn": []} for p in paths}
        names = list(paths)
        for r in range(args.rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            for p in order:
                port, env = paths[p]
                tps = run_pgbench(env, port, args.seconds)
                results[p]["tps"].append(tps)
                print(f"round {r + 1} {p:22s} pgbench -S: {tps:9.0f} tps", flush=True)
            for p in order:
                port, env = paths[p]
                mbs, _ = run_copy(env, port, args.rows)
                results[p]["copy"].append(mbs)
                print(f"round {r + 1} {p:22s} COPY {args.rows} rows: {mbs:6.1f} MB/s", flush=True)
            for p in order:
                port, env = paths[p]
                ms = run_connect(env, port, args.connects)
                results[p]["conn"].append(ms)
                print(f"round {r + 1} {p:22s} psql -c 'select 1': {ms:6.1f} ms", flush=True)
        hwm_kib, info = tunnel.stop()
        norec_hwm_kib, _ = norec.stop()
        pyrelay_hwm_kib, _ = pyrelay.stop()
        socat.stop()
        rec_size = tunnel.recording.stat().st_size if tunnel.recording.exists() else 0
    finally:
        cluster.stop()

    med = {p: {k: statistics.median(v) for k, v in d.items()} for p, d in results.items()}

    def per_round(a: str, b: str, key: str, diff: bool = False) -> str:
        """The median over rounds of a's value against b's in the same round, and its range: the machine's
        speed drifts between rounds (other tenants), far more than between two paths of one round."""
        pairs = zip(results[a][key], results[b][key], strict=True)
        vals = sorted((x - y) if diff else (x / y) for x, y in pairs)
        m = statistics.median(vals)
        if diff:
            return f"**{m:+.1f} ms** (rounds {vals[0]:+.1f} to {vals[-1]:+.1f})"
        return f"**{m:.2f}×** (rounds {vals[0]:.2f}–{vals[-1]:.2f})"

    lines = [
        "## Tunnel relay",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `tests/benchmarks/bench_tunnel.py` on this machine "
        f"({os.cpu_count()} cores, shared): its own SCRAM cluster, pgbench scale 10, {args.rounds} rounds "
        "(path order rotated each round). The table gives medians over the rounds; each ratio below is "
        "the median of the per-round ratios (both paths measured in the same round), with their range. "
        "The tunnel runs in its own process with uvloop, the CLI's start-up settings (`pcigate.startup`) "
        "and recording on (one `stmt` event per statement, group-committed fsync), its plain connections on "
        "the C relay "
        "thread (`pcigate._crelay`); a second tunnel process with recording off shows what recording costs, "
        "a third (recording on) with `PCIGATE_TUNNEL_RELAY=python` the asyncio relay of before.",
        "",
        f"| path | pgbench -S -c 8 -j 2 -T {args.seconds} (tps) | COPY {args.rows:,} rows to psql (MB/s) "
        "| psql -c 'select 1' (ms, incl. process start) |",
        "|---|---|---|---|",
    ]
    for p in paths:
        m = med[p]
        lines.append(f"| {p} | {m['tps']:,.0f} | {m['copy']:.1f} | {m['conn']:.1f} |")
    t, o = med["tunnel"], med["tunnel, recording off"]
    lines += [
        "",
        f"* pgbench select-only: tunnel / socat = {per_round('tunnel', 'socat', 'tps')} (goal ≥ 0.9×); "
        f"tunnel / direct = {per_round('tunnel', 'direct', 'tps')}; recording off / socat = "
        f"{per_round('tunnel, recording off', 'socat', 'tps')} (recording costs "
        f"{1 - t['tps'] / o['tps']:.0%} of the tunnel's median rate); asyncio relay / socat = "
        f"{per_round('tunnel, asyncio relay', 'socat', 'tps')}.",
        f"* COPY out: tunnel / direct = {per_round('tunnel', 'direct', 'copy')} (goal ≥ 0.95×); recording "
        f"off {per_round('tunnel, recording off', 'direct', 'copy')}.",
        f"* New connection: tunnel − direct = {per_round('tunnel', 'direct', 'conn', diff=True)} "
        "(goal ≤ +3 ms).",
        f"* Tunnel process peak RSS (VmHWM) over the whole run: **{hwm_kib / 1024:.0f} MiB** recording on, "
        f"{norec_hwm_kib / 1024:.0f} MiB recording off, {pyrelay_hwm_kib / 1024:.0f} MiB asyncio relay; "
        f"statements recorded: {info.get('statements', '?')}, recording size {rec_size / 1e6:.1f} MB.",
        "",
        "Raw per-round values: " + json.dumps(results),
        "",
        "",
    ]
    section = "\n".join(lines)
    print()
    print(section)
    if not args.no_write:
        write_perf_section("Tunnel relay", section)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
