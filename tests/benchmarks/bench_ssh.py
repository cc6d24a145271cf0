"""Benchmark: terminal sessions through `pcigate ssh` against the same system `ssh` run directly.

Run: .venv/bin/python -m tests.benchmarks.bench_ssh [--rounds 3] [--no-write]
Brings up the real stack (OpenBao with its SSH CA, the private sshd, the IdP, the broker), signs in with a
workload token, then per round and per workload runs the remote command

* through ``pcigate ssh web-1 -- CMD``: session opened at the broker, key signed by OpenBao, ssh under
  pcigate, every byte decoded, masked (screen and recording) and recorded, the recording uploaded at the end;
* straight through ``ssh`` with a certificate signed beforehand (no broker, no masking, no recording),

both without a terminal (pipes: ``ssh -T``) and on a pseudo-terminal (``ssh -tt``, pcigate's interactive
relay), output drained and counted by the benchmark. Reports medians of wall time and the peak RSS of the
pcigate process, and writes them into docs/performance.md ("SSH terminal sessions").
"""

from __future__ import annotations

import argparse
import os
import pty
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.benchmarks.bench_connect import _peak_rss
from tests.benchmarks.bench_tunnel import write_perf_section
from tests.stack.cli import pcigate_bin
from tests.stack.sshd import new_client_key, ssh_command
from tests.stack.stack import Stack

WORKLOADS = {
    "80 MB of base64 text": "head -c 60000000 /dev/urandom | base64 -w 100",
    "2M lines of numbers (seq)": "seq 1 2000000",
    "1M lines, a card number in each": "yes 'card 4111 1111 1111 1111 ok' | head -n 1000000",
}


def _drain(fd: int, counted: list[int], last: list[float]) -> None:
    n = 0
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            break
        if not data:
            break
        n += len(data)
        if len(data) > 200:  # output, not the closing lines
            last[:] = [time.perf_counter()]
    counted.append(n)


def run(argv: list[str], env: dict[str, str], *, tty: bool) -> tuple[float, float, int, int]:
    """(seconds until the output was through, seconds until the process ended, bytes shown, peak RSS)."""
    t0 = time.perf_counter()
    if tty:
        master, slave = pty.openpty()
        proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)
        os.close(slave)
        read_fd = master
    else:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        read_fd = proc.stdout.fileno()
    stop, peaks, counted, last = threading.Event(), [], [], [t0]
    sampler = threading.Thread(target=_peak_rss, args=(proc.pid, stop, peaks), daemon=True)
    drainer = threading.Thread(target=_drain, args=(read_fd, counted, last), daemon=True)
    sampler.start()
    drainer.start()
    rc = proc.wait(600)
    drainer.join(60)
    elapsed = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if tty:
        os.close(master)
    if rc != 0:
        raise RuntimeError(f"{argv[:3]} exited {rc}")
    return last[0] - t0, elapsed, counted[0] if counted else 0, peaks[0] if peaks else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows: list[str] = []
    with Stack() as stack, tempfile.TemporaryDirectory() as home:
        env = stack.cli_env(Path(home), token=stack.idp.workload_token())
        key = new_client_key(Path(home) / "direct")
        cert = key.write_cert(stack.ssh_ca.sign("web-ops", key.public_key, ["webops"], "1h"))
        kh = stack.sshd.write_known_hosts(Path(home) / "known_hosts")
        ssh_env = {"HOME": home, "PATH": "/usr/bin:/bin", "TERM": "xterm"}
        for tty in (False, True):
            for name, cmd in WORKLOADS.items():
                via, total, direct, rss, sizes = [], [], [], [], []
                for _ in range(args.rounds):
                    direct_argv = ssh_command(stack.sshd.port, "webops", key.path, kh, cmd, cert=cert)
                    if tty:  # ssh_command is -T; -tt after it wins
                        direct_argv.insert(direct_argv.index("-T") + 1, "-tt")
                    _, d, n_direct, _ = run(direct_argv, ssh_env, tty=tty)
                    p, whole, n_via, peak = run([str(pcigate_bin()), "ssh", "web-1", "--", cmd],
                                                {**env, "TERM": "xterm"}, tty=tty)
                    direct.append(d)
                    via.append(p)
                    total.append(whole)
                    rss.append(peak)
                    sizes.append((n_direct, n_via))
                md, mp, mt = statistics.median(direct), statistics.median(via), statistics.median(total)
                mb = sizes[0][0] / 1e6
                rows.append(f"| {name} | {'pty (-tt)' if tty else 'pipes (-T)'} | {mb:.0f} MB | {md:.2f} s "
                            f"({mb / md:.0f} MB/s) | {mp:.2f} s ({mb / mp:.0f} MB/s) | {mt:.2f} s | "
                            f"{statistics.median(rss) / 2**20:.0f} MiB |")
                print(rows[-1], flush=True)
    section = (
        "## SSH terminal sessions\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} on this 2-core machine, {args.rounds} rounds, medians "
        "(`python -m tests.benchmarks.bench_ssh`). *pcigate* is the whole `pcigate ssh web-1 -- CMD` "
        "(session, certificate signed by OpenBao, masking for the screen and the recording, recording "
        "written and uploaded); *direct* is the system ssh with a certificate signed beforehand. Output is "
        "drained by the benchmark; RSS is the pcigate process's peak (ssh itself not included).\n\n"
        "| remote output | mode | size | direct | pcigate: output through | pcigate: session closed and "
        "recording uploaded | pcigate peak RSS |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(section)
    if not args.no_write:
        write_perf_section("SSH terminal sessions", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
