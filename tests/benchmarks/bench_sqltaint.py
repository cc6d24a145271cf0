"""Benchmark: tracing computed columns to rule columns (pcigate.sqltaint), µs per statement the tunnel sees.

Run: .venv/bin/python -m tests.benchmarks.bench_sqltaint [--rounds 5] [--no-write]
In-process, no database; the default masking policy's column rules (cvv, pin, ...) plus a table ``cards``
holding cvv. Per statement, medians over rounds of ``ComputedColumns.statements``:

* ``names none``: text naming no rule column or rule table (pgbench's): the look for the names only;
* ``cold``: a new text each call (a literal changes), so parse + trace every time;
* ``cached``: the same text again (the cache per text).

Also the memory a full cache holds (tracemalloc peak while filling it with 1,024 texts of the largest size it
keeps). Writes a "Computed columns" section into docs/performance.md between its markers (appended if
absent).
"""

from __future__ import annotations

import statistics
import time
import tracemalloc
from collections.abc import Callable

from tests.benchmarks.perfdoc import PERF, bench_args, measured, write_marked

from pcigate.models import MaskingPolicy
from pcigate.sqltaint import CACHE_SIZE, CACHE_TEXT, ComputedColumns, View, trace_views

# {n}: a literal that changes per call (a new text each time)
STATEMENTS: dict[str, str] = {
    "pgbench -S select (names no rule column)": "SELECT abalance FROM pgbench_accounts WHERE aid = {n};",
    "select naming cvv, plain column": "SELECT id, cvv FROM cards WHERE id = {n}",
    "select computed from cvv": "SELECT id, upper(cvv), cvv || '' AS x FROM cards WHERE id = {n}",
    "CTE + UNION + sub-select (~300 chars)": (
        "WITH s(a, b) AS (SELECT id, cvv FROM cards WHERE id > {n}) "
        "SELECT a, (SELECT max(cvv) FROM cards c2 WHERE c2.id = s.a), b || '' FROM s "
        "UNION ALL SELECT id, NULL, note FROM cards WHERE id < 10 ORDER BY 1 LIMIT 50"
    ),
}


def judge() -> ComputedColumns:
    names = MaskingPolicy().sensitive_columns
    return ComputedColumns(names, {"cards": ["cvv"]}, lambda c: 2)


def _per_call(fn: Callable[[int], object], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e6


def measure(rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, sql in STATEMENTS.items():
        cold: list[float] = []
        cached: list[float] = []
        for _ in range(rounds):
            texts = [sql.format(n=100_000 + i).encode() for i in range(3000)]
            j = judge()
            cold.append(_per_call(lambda i, j=j, texts=texts: j.statements(texts[i]), len(texts)))
            one = texts[0]
            cached.append(_per_call(lambda _i, j=j, one=one: j.statements(one), 100_000))
        out[label] = {"cold": statistics.median(cold), "cached": statistics.median(cached)}
    return out


def session_start(views: int, rounds: int) -> float:
    """ms to trace ``views`` views that each compute a column from cvv (as at session start), and to judge
    as many function definitions (half of which name cvv)."""
    defs = [View(i, f"v{i}", ("id", f"u{i}"), f"SELECT cards.id, upper(cards.cvv) AS u{i} FROM cards")
            for i in range(views)]
    bodies = [f"BEGIN RETURN (SELECT {'cvv' if i % 2 else 'note'} FROM cards WHERE id = x); END"
              for i in range(views)]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        found = trace_views(defs, MaskingPolicy().sensitive_columns, {"cards": ["cvv"]}, lambda c: 2)
        j = ComputedColumns(MaskingPolicy().sensitive_columns, {"cards": ["cvv"], **found.tables},
                            lambda c: 2, found.aliases)
        for i, body in enumerate(bodies):
            if j.mentions(body):
                j.learn_function(f"f{i}")
        times.append((time.perf_counter() - t0) * 1000)
        assert len(found.columns) == views
    return statistics.median(times)


def cache_memory() -> float:
    """MiB held by a full cache of the longest texts it keeps."""
    head = "SELECT upper(cvv) FROM cards WHERE id = {:08d} AND note = '"
    pad = "x" * (CACHE_TEXT - len(head.format(0)) - 1)
    j = judge()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(CACHE_SIZE):  # each text made here, as the tunnel makes it from a message
        text = (head.format(i) + pad + "'").encode()
        assert len(text) == CACHE_TEXT
        j.statements(text)
        del text
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held / 2**20


def render(results: dict[str, dict[str, float]], rounds: int, mib: float, start: dict[int, float]) -> str:
    lines = [
        measured("bench_sqltaint", rounds, "the default column rules (cvv, pin, ...), µs per "
                 "`ComputedColumns.statements` call, in-process (no database)"),
        "",
        "| statement | new text each call: look, parse, trace (µs) | same text again (µs) |",
        "|---|---|---|",
    ]
    for label, r in results.items():
        lines.append(f"| {label} | {r['cold']:.1f} | {r['cached']:.2f} |")
    lines += [
        "",
        "* A text that names no rule column, no table holding one and no `U&` identifier is not parsed: the "
        "first row is that look alone. Only sessions with column rules pay any of it; the tunnel calls it "
        "once per simple Query and per Parse.",
        f"* The cache keeps {CACHE_SIZE:,} texts of at most {CACHE_TEXT:,} bytes: {mib:.1f} MiB when full of "
        f"the longest.",
        "* At session start (column rules only), views and functions are read from the catalog and traced: "
        + ", ".join(f"{n} views each computing a column from cvv plus {n} function definitions "
                    f"{ms:.0f} ms" for n, ms in start.items())
        + " (a view or function naming no rule column costs only the look).",
    ]
    return "\n".join(lines)


def main() -> None:
    args = bench_args(__doc__)
    results = measure(args.rounds)
    start = {n: session_start(n, args.rounds) for n in (30, 300)}
    text = render(results, args.rounds, cache_memory(), start)
    print(text)
    if not args.no_write:
        write_marked("sqltaint", text, "Computed columns (masking)",
                     "What tracing a computed result column to the rule columns it is made from costs the "
                     "tunnel (docs/architecture.md, masking).")
        print(f"\nwritten to {PERF}")


if __name__ == "__main__":
    main()
