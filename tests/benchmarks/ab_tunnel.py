"""A/B diagnosis of the tunnel's pgbench rate: variants side by side, interleaved, with the tunnel's CPU per
round trip (docs/performance.md, "Tunnel relay: method, profile and status").

    .venv/bin/python tests/benchmarks/ab_tunnel.py [--variants socat,tunnel,recq,norec] [--rounds 4]
        [--seconds 10] [--perf]

Each variant runs in its own process (bench_tunnel's runner, uvloop) against one SCRAM cluster; per round
every variant runs ``pgbench -S -c 8 -j 2 -T SECONDS`` (the order rotates each round), and the tunnel
process's user and system CPU (/proc) is divided by the transactions. Variants:

* ``socat``: the bare C relay;
* ``tunnel``: the tunnel, recording on (as the CLI runs it: plain connections on the C relay thread);
* ``norec``: recording off;
* ``py`` / ``pynorec``: recording on / off, every connection on the asyncio relay
  (PCIGATE_TUNNEL_RELAY=python);
* ``recq``: recording on, but the writer thread discards what is queued (what recording costs the event
  loop, without the writer's share);
* ``stmt``: recording on, statements through ``RecordingWriter.stmt()`` (time stamp and rounding on the
  loop) instead of ``stmt_sink`` (raw values, the writer rounds): what the sink saves;
* ``stub``: recording on, ``MessageScanner.feed`` replaced by a stub that knows the exact shape of pgbench
  -S's messages (valid for this traffic only): the most a faster framer could gain.

The last two patch pcigate's internals in the runner process; they are diagnostics, not configurations.
``--perf`` also records a ``perf`` profile of each tunnel process during the first round (perf-VARIANT.data).
Prints the medians; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks import bench_tunnel as bt  # noqa: E402
from tests.stack.postgres import start_cluster  # noqa: E402

STUB_FEED = r'''
from pcigate.wire import pg as _pg
_orig_feed = _pg.MessageScanner.feed
_Msg = _pg.Message
def _feed(self, chunk):
    n = len(chunk)
    if n > 20 and chunk[0] == 81 and int.from_bytes(chunk[1:5], "big") == n - 1:  # one whole Query
        self.offset += n
        return [_Msg(81, bytes(chunk[5:]), n - 5)]
    if n > 30 and chunk[0] == 84 and chunk[n - 6] == 90 and chunk[n - 20] == 67:  # T D "SELECT 1" Z
        self.offset += n
        return [_Msg(67, bytes(chunk[n - 15:n - 6]), 9), _Msg(90, bytes(chunk[n - 1:]), 1)]
    return _orig_feed(self, chunk)
_pg.MessageScanner.feed = _feed
'''

DISCARD_QUEUE = r'''
from pcigate import recording as _rec
def _drain(self):
    q = self._q
    for _ in range(len(q)):
        q.popleft()
_rec.RecordingWriter._drain = _drain
'''

NO_SINK = r'''
from pcigate import recording as _rec
_orig_init = _rec.RecordingWriter.__init__
def _init(self, *a, **k):
    _orig_init(self, *a, **k)
    self.stmt_sink = None
_rec.RecordingWriter.__init__ = _init
'''

PATCHES = {"stub": STUB_FEED, "recq": DISCARD_QUEUE, "stmt": NO_SINK}


def cpu_seconds(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="socat,tunnel,recq,norec")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--perf", action="store_true")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - {"socat", "tunnel", "norec", "py", "pynorec", *PATCHES}
    if unknown:
        ap.error(f"unknown variants: {sorted(unknown)}")

    work = Path(tempfile.mkdtemp(prefix="pcigate-ab-"))
    cluster = start_cluster()
    running: dict[str, tuple[object, int, dict[str, str], int | None]] = {}
    try:
        user, password = bt.bench_database(cluster)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        direct_env = base_env | {"PGUSER": user, "PGPASSWORD": password}
        runner = bt.RUNNER
        for v in variants:
            if v == "socat":
                s = bt.Socat(cluster)
                running[v] = (s, s.port, direct_env, None)
                continue
            bt.RUNNER = PATCHES.get(v, "") + runner
            try:
                t = bt.Tunnel(cluster, user, password, work, record=v not in ("norec", "pynorec"),
                              asyncio_relay=v in ("py", "pynorec"))
            finally:
                bt.RUNNER = runner
            running[v] = (t, t.port, base_env | {"PGPASSFILE": str(t.passfile)}, t.proc.pid)
        tps: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                _, port, env, pid = running[v]
                perf = None
                if args.perf and pid is not None and r == 0:
                    perf = subprocess.Popen(["perf", "record", "-F", "2000", "-g", "-o", f"perf-{v}.data",
                                             "-p", str(pid), "--", "sleep", str(max(1, args.seconds - 2))],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                before = cpu_seconds(pid) if pid is not None else (0.0, 0.0)
                rate = bt.run_pgbench(env, port, args.seconds)
                after = cpu_seconds(pid) if pid is not None else (0.0, 0.0)
                if perf is not None:
                    perf.wait()
                n = rate * args.seconds
                tps[v].append(rate)
                cpu[v].append(((after[0] - before[0]) / n * 1e6, (after[1] - before[1]) / n * 1e6))
                print(f"round {r + 1} {v:7s} {rate:8.0f} tps  user {cpu[v][-1][0]:5.1f} µs  "
                      f"system {cpu[v][-1][1]:5.1f} µs per round trip", flush=True)
        ref = statistics.median(tps["socat"]) if "socat" in tps else None
        print("\n| variant | tps | / socat | user µs | system µs |\n|---|---|---|---|---|")
        for v in variants:
            m = statistics.median(tps[v])
            ratio = f"{m / ref:.2f}" if ref else "—"
            user_us = statistics.median(u for u, _ in cpu[v]) if v != "socat" else None
            sys_us = statistics.median(s for _, s in cpu[v]) if v != "socat" else None
            print(f"| {v} | {m:,.0f} | {ratio} | {'—' if user_us is None else f'{user_us:.1f}'} | "
                  f"{'—' if sys_us is None else f'{sys_us:.1f}'} |")
    finally:
        for proc, *_ in running.values():
            proc.stop()  # type: ignore[attr-defined]
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
