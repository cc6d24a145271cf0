"""Benchmark: the guardrails core, classification cost per statement cold (parse) vs cached.

Run: .venv/bin/python -m tests.benchmarks.bench_guardrails [--rounds 5] [--no-write]
In-process, no database. Per statement kind, medians over rounds of:

* ``cold``: ``Guardrails.check`` with the cache off (parse with libpg_query + walk + judge), µs per call;
* ``cached``: ``Guardrails.check`` of the same text again (LRU hit on the exact text), µs per call;
* ``distinct literals``: pgbench's default simple-query mode puts the values into the text
  (``... WHERE aid = 48213;``), so every text is new to the exact-text cache; the template cache answers it
  (same text but for integer constants): this is the cost the tunnel pays per statement there;
* ``no rules``: the fast path (guardrails off), µs per call.

Writes a "Guardrails core" section into docs/performance.md between its markers (appended if absent).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterator

from tests.benchmarks.perfdoc import PERF, bench_args, measured, write_marked

from pcigate.guardrails import Guardrails
from pcigate.models import GuardrailRule

RULES = [
    GuardrailRule(name="no-drop", deny=["drop_table", "drop_schema", "drop_database", "truncate"]),
    GuardrailRule(name="no-mass-delete", deny=["delete_without_where", "update_without_where"]),
    GuardrailRule(
        name="no-escape", deny=["copy_program", "copy_file", "do_block", "alter_system", "role_admin"]
    ),
    GuardrailRule(name="cards", deny=["write"], relations=["public.cards"]),
]

STATEMENTS: dict[str, str] = {
    "pgbench -S select": "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    "pgbench tpcb update": "UPDATE pgbench_accounts SET abalance = abalance + -2431 WHERE aid = 48213;",
    "join + CTE select (~400 chars)": (
        "WITH recent AS (SELECT customer_id, max(created_at) AS last FROM orders "
        "WHERE created_at > now() - interval '30 days' GROUP BY customer_id) "
        "SELECT c.id, c.name, c.email, r.last, count(o.id) AS n, sum(o.amount) AS total "
        "FROM customers c JOIN recent r ON r.customer_id = c.id LEFT JOIN orders o ON o.customer_id = c.id "
        "WHERE c.country = 'DE' AND c.status IN ('active', 'trial') GROUP BY c.id, c.name, c.email, r.last "
        "ORDER BY total DESC NULLS LAST LIMIT 50"
    ),
    "data-modifying CTE": (
        "WITH d AS (DELETE FROM sessions WHERE expires < now() RETURNING id) SELECT count(*) FROM d"
    ),
    "multi-statement (3)": "BEGIN; UPDATE cards SET last4 = '4242' WHERE id = 7; COMMIT",
}


def _per_call(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _next_check(g: Guardrails, it: Iterator[str]) -> Callable[[], object]:
    return lambda: g.check(next(it))


def measure(rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, sql in STATEMENTS.items():
        cold: list[float] = []
        cached: list[float] = []
        distinct: list[float] = []
        off: list[float] = []
        for _ in range(rounds):
            nocache = Guardrails(RULES, cache_size=0)
            cold.append(_per_call(functools.partial(nocache.check, sql), 2000))
            g = Guardrails(RULES)
            g.check(sql)
            cached.append(_per_call(functools.partial(g.check, sql), 200_000))
            if "48213" in sql:  # the pgbench statements: a new literal each call
                texts = [sql.replace("48213", str(100_000 + i)) for i in range(2000)]
                g2 = Guardrails(RULES)
                distinct.append(_per_call(_next_check(g2, iter(texts)), len(texts)))
            none = Guardrails([])
            off.append(_per_call(functools.partial(none.check, sql), 200_000))
        out[label] = {
            "cold": statistics.median(cold), "cached": statistics.median(cached),
            "distinct": statistics.median(distinct) if distinct else float("nan"),
            "off": statistics.median(off),
        }
    return out


def render(results: dict[str, dict[str, float]], rounds: int) -> str:
    lines = [
        measured("bench_guardrails", rounds,
                 f"{len(RULES)} rules, µs per `Guardrails.check` call, in-process (no database)"),
        "",
        "| statement | cold: parse + classify + judge (µs) | cached, same text (µs) | cold / cached "
        "| distinct literals each call (µs) | no rules (µs) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        ratio = r["cold"] / r["cached"] if r["cached"] else float("inf")
        distinct = "—" if r["distinct"] != r["distinct"] else f"{r['distinct']:.1f}"
        lines.append(
            f"| {label} | {r['cold']:.1f} | {r['cached']:.2f} | {ratio:.0f}× | {distinct} | {r['off']:.2f} |"
        )
    lines += [
        "",
        "* cached = an LRU hit on the exact text (default 4096 entries, texts up to 64 KiB); the verdict is "
        "cached with the classification unless the text contains EXECUTE/DEALLOCATE (those depend on the "
        "connection's prepared statements and are re-judged from the cached classification).",
        "* distinct literals = pgbench's default `-M simple` mode, which puts each value into the text, so "
        "the exact-text cache never hits; the template cache does (the text seen twice with other integer "
        "constants: one regex match and a re-cut of the statement texts, no parser). `-M extended`/"
        "`-M prepared` (and drivers using bind parameters) repeat the text and hit the exact cache.",
    ]
    return "\n".join(lines)


def main() -> None:
    args = bench_args(__doc__)
    results = measure(args.rounds)
    text = render(results, args.rounds)
    print(text)
    if not args.no_write:
        write_marked("guardrails", text, "Guardrails core")
        print(f"\nwritten to {PERF}")


if __name__ == "__main__":
    main()
