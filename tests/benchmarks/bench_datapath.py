"""Benchmark masking and guardrails in the tunnel, side by side with the plain tunnel and a direct connection.

    .venv/bin/python tests/benchmarks/bench_datapath.py [--rounds 3] [--rows 2000000] [--seconds 10]
        [--no-write]

Starts its own SCRAM cluster (tests.stack.postgres) with pgbench's tables (scale 10) and a ``cards`` table of
ROWS rows (id, holder, a Luhn-valid 16-digit PAN, an expiry, a free-text note: ~80 bytes a row, the PAN in
every row). Paths, each its own tunnel process (uvloop, recording on, as the CLI runs it):

* ``direct``: psql/pgbench straight to PostgreSQL;
* ``tunnel``: no masking, no guardrails;
* ``tunnel, masking``: PANs truncated to first 6 / last 4 and track data redacted, without column-name rules
  (the default CVV/PIN column rules make the tunnel refuse COPY TO STDOUT, which has no column names; the
  ``cards`` table has no such column, so a SELECT costs the same with them);
* ``tunnel, guardrails``: five deny rules (drop database/table/schema, truncate, delete/update without
  WHERE) over every statement.

Per round (the order of paths rotates each round):

* bulk SELECT: ``psql -At -c "SELECT * FROM cards" > /dev/null`` (psql reads the whole result) → s and MB/s;
* COPY: ``psql -c "COPY cards TO STDOUT" > /dev/null`` → s;
* pgbench select-only (``-S -c 8 -j 2``, simple protocol: a new literal in every statement text) → tps
  (direct, tunnel, guardrails).

Also the tunnel processes' CPU seconds for the bulk SELECTs and their peak RSS. Results (medians, ratios) go
to stdout and into docs/performance.md, section "Masking and guardrails in the tunnel".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

from bench_tunnel import Tunnel, bench_database, run_pgbench, vm_hwm_kib, write_perf_section  # noqa: E402
from tests.stack.postgres import start_cluster  # noqa: E402

RULES = [
    {"name": "no-drop", "deny": ["drop_database", "drop_table", "drop_schema"]},
    {"name": "no-truncate", "deny": ["truncate"]},
    {"name": "no-unbounded-writes", "deny": ["delete_without_where", "update_without_where"]},
]
POLICIES: dict[str, dict[str, object] | None] = {
    "tunnel": None,
    # PAN + track masking; no column-name rules, which would refuse COPY TO STDOUT (COPY has no column names)
    "tunnel, masking": {"masking": {"sensitive_columns": []}},
    "tunnel, guardrails": {"guardrails": RULES},
}
SEED_SQL = """
CREATE TABLE cards (id bigint PRIMARY KEY, holder text, pan text, expiry text, note text);
CREATE FUNCTION luhn_complete(p text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
  SELECT p || ((10 - (sum(CASE WHEN i % 2 = 1 THEN (CASE WHEN d * 2 > 9 THEN d * 2 - 9 ELSE d * 2 END)
                              ELSE d END) % 10)) % 10)::text
  FROM (SELECT i, substr(reverse(p), i, 1)::int AS d FROM generate_series(1, length(p)) i) s
$$;
INSERT INTO cards
  SELECT g, 'holder ' || g, luhn_complete('4' || lpad((g::bigint * 7919 % 100000000000000)::text, 14, '0')),
         lpad((g % 12 + 1)::text, 2, '0') || '/2' || (g % 10)::text, 'order ' || (g::bigint * 31 % 99991)
  FROM generate_series(1, {rows}) g;
ANALYZE cards;
"""


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def run_psql(env: dict[str, str], port: int, sql: str) -> tuple[float, int]:
    """(seconds, bytes psql printed)."""
    t0 = time.perf_counter()
    cmd = ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-d", "bench", "-c", sql]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    size = 0
    while chunk := proc.stdout.read(1 << 20):
        size += len(chunk)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.wait(600) != 0:
        raise RuntimeError(err)
    return time.perf_counter() - t0, size


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pcigate-bench-"))
    print(f"starting cluster in {work} ...", flush=True)
    cluster = start_cluster()
    tunnels: dict[str, Tunnel] = {}
    try:
        user, password = bench_database(cluster, SEED_SQL.replace("{rows}", str(args.rows)))
        sample = cluster.psql("SELECT pan FROM cards WHERE id = 1", database="bench").strip()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        envs = {"direct": (cluster.port, base_env | {"PGUSER": user, "PGPASSWORD": password})}
        for name, policy in POLICIES.items():
            t = tunnels[name] = Tunnel(cluster, user, password, work, policy=policy)
            envs[name] = (t.port, base_env | {"PGPASSFILE": str(t.passfile)})

        # the masking tunnel really masks: no PAN of the table in what psql prints
        port, env = envs["tunnel, masking"]
        out = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-d", "bench", "-c",
                              "SELECT pan FROM cards WHERE id <= 3"], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert sample not in out, out
        assert sample[:6] + "******" + sample[-4:] in out, out

        names = list(envs)
        res: dict[str, dict[str, list[float]]] = {n: {"select": [], "copy": [], "tps": [], "cpu": []}
                                                 for n in names}
        size = 0
        for r in range(args.rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            for n in order:
                port, env = envs[n]
                pid = tunnels[n].proc.pid if n in tunnels else None
                c0 = cpu_seconds(pid) if pid else 0.0
                secs, size = run_psql(env, port, "SELECT * FROM cards")
                res[n]["select"].append(secs)
                if pid:
                    res[n]["cpu"].append(cpu_seconds(pid) - c0)
                print(f"round {r + 1} {n:20s} SELECT {args.rows} rows: {secs:6.2f} s", flush=True)
            for n in order:
                port, env = envs[n]
                secs, _ = run_psql(env, port, "COPY cards TO STDOUT")
                res[n]["copy"].append(secs)
                print(f"round {r + 1} {n:20s} COPY {args.rows} rows: {secs:6.2f} s", flush=True)
            for n in order:
                if n == "tunnel, masking":
                    continue
                port, env = envs[n]
                tps = run_pgbench(env, port, args.seconds)
                res[n]["tps"].append(tps)
                print(f"round {r + 1} {n:20s} pgbench -S: {tps:9.0f} tps", flush=True)
        hwm = {n: vm_hwm_kib(t.proc.pid) / 1024 for n, t in tunnels.items()}
    finally:
        for t in tunnels.values():
            t.stop()
        cluster.stop()

    def med(n: str, key: str) -> float:
        v = res[n][key]
        return statistics.median(v) if v else float("nan")

    lines = [
        "## Masking and guardrails in the tunnel",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `tests/benchmarks/bench_datapath.py` on this machine "
        f"({os.cpu_count()} cores, shared): its own SCRAM cluster; a `cards` table of {args.rows:,} rows "
        f"with a Luhn-valid PAN in every row ({size / 1e6:.0f} MB as psql prints it); {args.rounds} rounds, "
        "path order rotated, medians. Every tunnel records (as the CLI runs it).",
        "",
        "| path | SELECT * (s) | COPY TO STDOUT (s) | pgbench -S (tps) | tunnel CPU per SELECT (s) "
        "| tunnel peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        cpu = f"{med(n, 'cpu'):.2f}" if res[n]["cpu"] else "—"
        tps = f"{med(n, 'tps'):,.0f}" if res[n]["tps"] else "—"
        rss = f"{hwm[n]:.0f} MiB" if n in hwm else "—"
        lines.append(f"| {n} | {med(n, 'select'):.2f} | {med(n, 'copy'):.2f} | {tps} | {cpu} | {rss} |")
    d, m, t, g = "direct", "tunnel, masking", "tunnel", "tunnel, guardrails"
    lines += [
        "",
        f"* Bulk SELECT with a card column, masking on: **{med(d, 'select') / med(m, 'select'):.2f}× "
        f"direct** (goal ≥ 0.8×); masking off {med(d, 'select') / med(t, 'select'):.2f}× direct.",
        f"* COPY out, masking on: {med(d, 'copy') / med(m, 'copy'):.2f}× direct; masking off "
        f"{med(d, 'copy') / med(t, 'copy'):.2f}× direct.",
        f"* pgbench select-only, guardrails on / off: **{med(g, 'tps') / med(t, 'tps'):.2f}×** "
        "(goal ≥ 0.9×).",
        "",
        "Raw per-round values: " + json.dumps(res),
        "",
    ]
    section = "\n".join(lines)
    print()
    print(section)
    if not args.no_write:
        write_perf_section("Masking and guardrails in the tunnel", section + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
